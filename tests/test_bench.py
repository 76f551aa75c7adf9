"""The benchmark and GPU-check harness measures flagsim's own code, and computes its verdicts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import targets
from bench.checkpoints import save_random_checkpoint
from flagsim.models import create_embedder
from flagsim.pipeline.mapper import EmbedActor

REPO = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test",
                                                  REPO / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _images(n: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (90 + 10 * i, 140, 3), dtype=np.uint8) for i in range(n)]


def test_verdicts_follow_the_numbers() -> None:
    t = targets.EFFICIENCY
    assert t.text == "steady-state efficiency >= 0.9"
    assert (t.verdict(0.95), t.verdict(0.9), t.verdict(0.89), t.verdict(None)) == (
        "met", "met", "not met", "n/a")
    assert targets.ORIGINAL.verdict(1.0) == "not met"  # strictly faster
    assert targets.SCALE_MEMORY.verdict(1.3) == "not met"
    assert targets.verdict_of([True, None]) == "met"
    assert targets.verdict_of([True, False]) == "not met"


@pytest.mark.parametrize("model", ["vit", "blip2"])
def test_random_checkpoint_loads_through_flagsims_local_weights_path(model: str,
                                                                     tmp_path: Path) -> None:
    weights = save_random_checkpoint(model, tmp_path / model, tiny=True)
    emb = create_embedder(model, weights=weights, device="cpu", dtype="float32")
    info = emb.describe()
    assert info["checkpoint"] == weights and "tiny" not in info  # loaded as a real checkpoint
    vecs = emb(_images())
    assert vecs.shape == (4, emb.dim) and np.isfinite(vecs).all()
    assert np.std(vecs) > 0  # random weights, not a degenerate constant
    actor = EmbedActor(model, weights=weights, device="cpu", dtype="float32")
    pix = np.empty(4, dtype=object)
    for i, im in enumerate(_images()):
        pix[i] = im
    out = actor({"ok": np.ones(4, bool), "pixels": pix, "image_id": np.arange(4)})
    np.testing.assert_allclose(out[f"emb:{model}"], vecs, rtol=1e-5, atol=1e-5)


def test_gpu_check_knn_searches_through_flagsim_index(tmp_path: Path) -> None:
    gc = _gpu_check()
    rec: dict = {}
    gc.knn_check(rec, n=600, d=64, k=5, device="cpu", budget=gc.Budget(120), n_check=50,
                 q_tile=256, workdir=tmp_path)
    assert rec["index_kind"] == "flat" and rec["index_device"] == "cpu"
    assert rec["complete"] and rec["queries_done"] == 600
    assert rec["identical_rows"] == 1.0 and rec["exact"]
    manifest = json.loads((tmp_path / "knn-run" / "index" / "model=random" /
                           "_manifest.json").read_text())
    assert manifest["count"] == 600


def test_gpu_check_model_section_runs_the_registry_entry(tmp_path: Path) -> None:
    gc = _gpu_check()
    rec: dict = {}
    gc.check_model("vit", rec, _images(8), "cpu", True, gc.Budget(300), 0.0, tmp_path)
    assert rec["parity_ok"] and rec["parity_min_cosine"] >= gc.PARITY_MIN_COSINE
    assert rec["processor"]["image_mean"] == [0.5, 0.5, 0.5]  # the registry's ViT processor
    assert rec["forward_img_s"] > 0 and rec["actor_img_s"] > 0


def test_gpu_check_jpeg_section_compares_pil_and_torchvision_on_the_cpu() -> None:
    gc = _gpu_check()
    rec: dict = {}
    gc.jpeg_check(rec, _images(8), "cpu", smoke=True)
    (case,) = rec["cases"]
    assert case["images"] == 8 and case["pil_img_s"] > 0 and case["torchvision_cpu_img_s"] > 0
    assert case["torchvision_cpu_max_abs_diff"] == 0  # the same libjpeg-turbo decode as PIL
    assert "torchvision_cuda_img_s" not in case and "no GPU" in rec["note"]
    md = gc.render_markdown({"meta": {}, "sections": {"jpeg_decode": {"status": "ok", **rec}}})
    assert "| 320 | 8 |" in md
