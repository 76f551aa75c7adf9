"""`flagsim models`: the registry table and offline availability of each model's weights."""

from __future__ import annotations

import json

import pytest

from flagsim.cli import main
from flagsim.models import get_spec, list_models


@pytest.fixture(autouse=True)
def _empty_caches(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-empty"))


def _json_rows(capsys, *args: str) -> dict[str, dict]:
    assert main(["models", "--json", *args]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {r["name"]: r for r in rows}


def test_models_table_lists_every_registered_model(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells:
            rows[cells[0]] = cells
    assert [n for n in rows if n in list_models()] == list_models()
    for name in list_models():
        spec = get_spec(name)
        _, family, weights, dim, pooling, offline = rows[name]
        assert (family, dim, pooling) == (spec.family, str(spec.dim), spec.pooling)
        assert weights == (spec.weights or "none (weight-free)")
    assert rows["efficientnet-lite0"][-1] == "yes" and rows["pixels"][-1] == "yes"
    assert rows["vit"][-1] == "no"  # an empty Hugging Face cache


def test_models_json_reports_offline_availability_and_reasons(capsys):
    rows = _json_rows(capsys)
    assert list(rows) == list_models()
    assert rows["efficientnet-lite0"]["available_offline"] is True
    assert rows["pixels"]["available_offline"] is True and rows["pixels"]["weights"] is None
    vit = rows["vit"]
    assert vit["available_offline"] is False and vit["dim"] == 1024
    assert vit["reason"].startswith("vit: weights google/vit-large-patch16-224-in21k are not in")


def test_models_checks_configured_weights(capsys, tmp_path):
    from flagsim.models.testing import tiny_embedder

    e = tiny_embedder("vit")
    e.model.save_pretrained(tmp_path)
    e.processor.save_pretrained(tmp_path)
    rows = _json_rows(capsys, "--set", f"embed.settings.vit.weights={tmp_path}",
                      "--set", f"embed.settings.clip.weights={tmp_path / 'missing'}")
    assert rows["vit"]["available_offline"] is True and rows["vit"]["weights"] == str(tmp_path)
    assert rows["clip"]["available_offline"] is False
    assert "does not exist" in rows["clip"]["reason"]


def test_models_details_prints_one_line_per_unavailable_model(capsys):
    assert main(["models", "--details"]) == 0
    out = capsys.readouterr().out
    reasons = [line for line in out.splitlines() if line.startswith(tuple(f"{n}: " for n in list_models()))]
    assert {r.split(":")[0] for r in reasons} == {
        n for n, r in _json_rows(capsys).items() if not r["available_offline"]
    }
