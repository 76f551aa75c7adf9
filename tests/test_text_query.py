"""Text queries (`flagsim query --text`): CLIP's text tower alone equals get_text_features, and
models without a text tower give one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from flagsim.cli import main
from flagsim.decode import decode_image
from flagsim.errors import DataError, WeightsUnavailableError
from flagsim.images import bundled_table, write_images_table
from flagsim.models import create_embedder, create_text_encoder, has_text_tower, text_models
from flagsim.models.sources import TOKENIZER_FILES
from flagsim.models.testing import write_random_checkpoint
from flagsim.rundir import RunDir
from flagsim.search.query import query_text
from flagsim.shards import Manifest, embeddings_table, write_manifest, write_shard

FLAGS = ["Chad", "Romania", "Andorra", "Moldova", "Belgium", "France", "Italy", "Ireland",
         "Japan", "Bangladesh", "Denmarki", "Sweden"]
TEXTS = ["a red flag with a white cross", "blue", "three vertical bands of blue yellow and red "
         "with a coat of arms in the middle"]  # the last is longer than the tiny tower's 16 tokens


def _reference(directory: Path, texts: list[str]) -> np.ndarray:
    """What CLIPModel.get_text_features gives for each text, one at a time (the whole model)."""
    import transformers

    model = transformers.CLIPModel.from_pretrained(str(directory)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    out = []
    with torch.inference_mode():
        for t in texts:
            feats = model.get_text_features(**tokenizer(t, truncation=True, return_tensors="pt"))
            feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
            out.append(feats[0].float().numpy())
    return np.stack(out)


def _write_model(run: RunDir, model: str, ids, names, vectors, **manifest) -> None:
    write_shard(run, model, 0, embeddings_table(ids, names, model, vectors))
    write_manifest(run, Manifest(model=model, dim=vectors.shape[1], rows=len(ids),
                                 images_hash="test", shards={"part-00000.parquet": len(ids)},
                                 **manifest))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP checkpoint (small text and vision towers, a letter tokenizer)."""
    return write_random_checkpoint("clip", tmp_path_factory.mktemp("tiny-clip") / "clip", seed=3)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, clip_dir) -> dict:
    """12 bundled flags embedded with the tiny CLIP (its manifest records the checkpoint, as
    `flagsim embed` does) and with the weight-free `pixels` model (no text tower)."""
    root = tmp_path_factory.mktemp("text-run")
    run = RunDir.at(str(root))
    bundled = bundled_table()
    ids_all = bundled.column("image_id").to_pylist()
    table = bundled.take(pa.array([ids_all.index(i) for i in FLAGS]))
    write_images_table(table, run)
    names = table.column("name").to_pylist()
    images = [decode_image(Path(p).read_bytes()) for p in table.column("path").to_pylist()]
    clip = create_embedder("clip", weights=str(clip_dir))
    vectors = clip(images)
    _write_model(run, "clip", FLAGS, names, vectors, checkpoint=str(clip_dir), source="test")
    _write_model(run, "pixels", FLAGS, names, create_embedder("pixels")(images), source="test")
    return {"root": str(root), "vectors": vectors, "names": names}


def _brute_force(stored: np.ndarray, query: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    s = stored.astype(np.float64)
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    q = query.astype(np.float64) / np.linalg.norm(query)
    scores = s @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return list(order), scores[order]


def test_registry_knows_which_models_have_a_text_tower() -> None:
    assert text_models() == ["clip"]
    assert has_text_tower("clip") and not has_text_tower("vit") and not has_text_tower("pixels")
    assert not has_text_tower("not-a-model")
    with pytest.raises(DataError) as info:
        create_text_encoder("dinov2")
    assert str(info.value) == "model dinov2 has no text tower (text queries work with: clip)"


def test_text_tower_alone_equals_get_text_features(clip_dir) -> None:
    encoder = create_text_encoder("clip", weights=str(clip_dir))
    assert encoder.dim == 24
    params = dict(encoder.model.named_parameters())
    assert params and all(k.startswith(("text_model.", "text_projection.")) for k in params)
    expected = _reference(clip_dir, TEXTS)
    batch = encoder.text_features(TEXTS)  # padded to the longest
    assert batch.shape == (3, 24) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, expected, rtol=1e-5, atol=1e-5)
    for i, t in enumerate(TEXTS):  # and one at a time, as a query does
        np.testing.assert_allclose(encoder.text_features([t])[0], expected[i], rtol=1e-5, atol=1e-5)
    # different texts give different vectors (the test would pass on a constant tower otherwise)
    assert np.abs(expected[0] - expected[1]).max() > 1e-2
    assert encoder.text_features([]).shape == (0, 24)


def test_text_query_equals_brute_force_over_the_stored_vectors(text_run, clip_dir) -> None:
    text = TEXTS[0]
    result = query_text(text_run["root"], text, k=5)
    assert result.kind == "text" and result.query == text and result.query_id is None
    assert result.models == ["clip"] and list(result.results) == ["clip"]  # pixels: no tower
    assert result.skipped == {}
    order, scores = _brute_force(text_run["vectors"], _reference(clip_dir, [text])[0], 5)
    hits = result.results["clip"]
    assert [h.image_id for h in hits] == [FLAGS[i] for i in order]
    assert [h.name for h in hits] == [text_run["names"][i] for i in order]
    np.testing.assert_allclose([h.score for h in hits], scores, rtol=1e-5, atol=1e-5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    # k may be the whole collection: the text is not one of the images
    assert len(query_text(text_run["root"], text, k=len(FLAGS), models=["clip"]).results["clip"]) \
        == len(FLAGS)


def test_cli_text_query_json(text_run, clip_dir, capsys) -> None:
    text = TEXTS[1]
    code = main(["-q", "query", "--text", text, "--run", text_run["root"], "-k", "3", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "text" and out["query"] == text and out["k"] == 3
    assert list(out["results"]) == ["clip"]
    order, scores = _brute_force(text_run["vectors"], _reference(clip_dir, [text])[0], 3)
    assert [h["image_id"] for h in out["results"]["clip"]] == [FLAGS[i] for i in order]
    np.testing.assert_allclose([h["score"] for h in out["results"]["clip"]], scores, atol=1e-5)
    # the table names the text and the model
    assert main(["-q", "query", "--text", text, "--run", text_run["root"], "-k", "2"]) == 0
    table = capsys.readouterr().out
    assert "'blue'" in table and "clip" in table and FLAGS[order[0]].split("_")[0] in table


def _one_line_error(capsys) -> str:
    """The error is one line, the last on stderr (progress lines of loading may precede it)."""
    lines = capsys.readouterr().err.splitlines()
    err = [ln for ln in lines if ln.startswith("flagsim: error:")]
    assert len(err) == 1 and lines[-1] == err[0] and "Traceback" not in "".join(lines), lines
    return err[0]


@pytest.mark.parametrize("models", ["pixels", "clip,pixels"])
def test_a_named_model_without_a_text_tower_is_one_line(text_run, capsys, models) -> None:
    code = main(["-q", "query", "--text", "a flag", "--model", models, "--run", text_run["root"]])
    assert code == 2
    assert _one_line_error(capsys) == (
        "flagsim: error: model pixels has no text tower (text queries work with: clip)"
    )


def test_a_run_without_text_towers_is_one_line(text_run, tmp_path, capsys) -> None:
    run = RunDir.at(str(tmp_path / "run"))
    rng = np.random.default_rng(0)
    _write_model(run, "pixels", FLAGS, FLAGS, rng.normal(size=(len(FLAGS), 8)).astype(np.float32),
                 source="test")
    assert main(["-q", "query", "--text", "a flag", "--run", str(tmp_path / "run")]) == 2
    assert _one_line_error(capsys) == (
        f"flagsim: error: no model of {tmp_path / 'run'} has a text tower (text queries work "
        "with: clip; models present: pixels)"
    )


def test_text_and_a_name_are_exclusive(text_run, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["query", "Chad", "--text", "a flag", "--run", text_run["root"]])
    assert info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
    assert main(["-q", "query", "--text", "a flag", "--image", "--run", text_run["root"]]) == 2
    assert _one_line_error(capsys) == "flagsim: error: --image and --text cannot be used together"
    assert main(["-q", "query", "--text", "  ", "--run", text_run["root"]]) == 2
    assert _one_line_error(capsys) == "flagsim: error: the text query is empty"


def test_a_checkpoint_without_tokenizer_is_skipped_with_its_reason(text_run, clip_dir, tmp_path,
                                                                  capsys) -> None:
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(clip_dir, bare, ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    run = RunDir.at(str(tmp_path / "run"))
    _write_model(run, "clip", FLAGS, text_run["names"], text_run["vectors"], checkpoint=str(bare),
                 source="test")
    with pytest.raises(WeightsUnavailableError, match="has no tokenizer"):
        create_text_encoder("clip", weights=str(bare))
    assert main(["-q", "query", "--text", "a flag", "--run", str(tmp_path / "run")]) == 2
    line = _one_line_error(capsys)
    assert line.startswith("flagsim: error: no model could embed the text 'a flag': clip: ")
    assert "clip: clip:" not in line  # the model is named once
    assert "has no tokenizer" in line


def _fake_hub_cache(root: Path, repo: str, files_from: Path, commit: str, skip=()) -> None:
    """The Hugging Face cache layout (models--org--name/{refs/main, snapshots/<commit>/...}), as
    `hf download` leaves it: files absent from the repo have no marker."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        if f.name not in skip:
            shutil.copy(f, snap / f.name)


def test_text_tower_from_the_hub_cache_offline(clip_dir, tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "flagsim-test/tiny-clip", clip_dir, "c" * 40)
    _fake_hub_cache(cache, "flagsim-test/clip-no-tokenizer", clip_dir, "d" * 40,
                    skip=TOKENIZER_FILES)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    encoder = create_text_encoder("clip", weights="flagsim-test/tiny-clip")
    assert encoder.revision == "c" * 40
    np.testing.assert_allclose(encoder.text_features(TEXTS[:1]), _reference(clip_dir, TEXTS[:1]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(WeightsUnavailableError) as info:
        create_text_encoder("clip", weights="flagsim-test/clip-no-tokenizer")
    assert str(info.value) == (
        "clip: weights flagsim-test/clip-no-tokenizer are not in the local Hugging Face cache and "
        "the hub is offline; set embed.settings.clip.weights to a local directory or run "
        "`hf download flagsim-test/clip-no-tokenizer`"
    )
