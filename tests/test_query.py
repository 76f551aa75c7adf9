"""`flagsim query`: names (with close matches for unknown ones) and image files, per model and ensemble."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from flagsim.cli import main
from flagsim.decode import decode_image
from flagsim.errors import UnknownNameError
from flagsim.images import bundled_table, write_images_table
from flagsim.rundir import RunDir
from flagsim.search.query import query
from flagsim.shards import Manifest, embeddings_table, write_manifest, write_shard

FLAGS = ["Chad", "Romania", "Andorra", "Moldova", "Belgium", "France", "Italy", "Ireland",
         "Japan", "Bangladesh", "Indonesia", "Monaco", "Poland", "Australia", "New_Zealand"]


def _write_model(run: RunDir, model: str, ids, names, vectors, **manifest) -> None:
    table = embeddings_table(ids, names, model, vectors)
    write_shard(run, model, 0, table)
    write_manifest(run, Manifest(model=model, dim=vectors.shape[1], rows=len(ids),
                                 images_hash="test", shards={"part-00000.parquet": len(ids)},
                                 **manifest))


@pytest.fixture(scope="module")
def flag_run(tmp_path_factory) -> dict:
    """15 bundled flags embedded with the weight-free `pixels` model, plus an `ext` model whose
    embeddings were imported without a checkpoint (so images cannot be embedded for it)."""
    from flagsim.models import create_embedder

    root = tmp_path_factory.mktemp("flags")
    run = RunDir.at(str(root))
    bundled = bundled_table()
    ids_all = bundled.column("image_id").to_pylist()
    table = bundled.take(pa.array([ids_all.index(i) for i in FLAGS]))
    write_images_table(table, run)
    paths = table.column("path").to_pylist()
    names = table.column("name").to_pylist()
    embedder = create_embedder("pixels")
    pixels = embedder([decode_image(Path(p).read_bytes()) for p in paths])
    _write_model(run, "pixels", FLAGS, names, pixels, checkpoint=None, source="test")
    ext = np.random.default_rng(0).normal(size=(len(FLAGS), 12)).astype(np.float32)
    _write_model(run, "ext", FLAGS, names, ext, source="flagsim import-csv ext.csv")
    return {"root": str(root), "paths": dict(zip(FLAGS, paths, strict=True)), "names": names,
            "vectors": {"pixels": pixels, "ext": ext}, "embedder": embedder}


def _cosine(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def _top(scores: np.ndarray, k: int, skip: int | None) -> list[int]:
    s = scores.astype(np.float64).copy()
    if skip is not None:
        s[skip] = -np.inf
    return list(np.argsort(-s, kind="stable")[:k])


def test_unknown_name_prints_close_matches_and_exits_non_zero(flag_run, capsys) -> None:
    code = main(["-q", "query", "Chadd", "--run", flag_run["root"]])
    assert code != 0
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and captured.out == ""
    assert err.startswith("flagsim: error: unknown name 'Chadd'; did you mean: ")
    assert "Chad" in err.split("did you mean: ")[1]
    with pytest.raises(UnknownNameError, match="did you mean: .*New Zealand"):
        query(flag_run["root"], "new zeeland")


def test_name_query_equals_brute_force_case_insensitively(flag_run) -> None:
    res = query(flag_run["root"], "cHaD", k=4)
    assert res.kind == "name" and res.query_id == "Chad" and res.query_name == "Chad"
    sims = _cosine(flag_run["vectors"]["pixels"])
    want = _top(sims[0], 4, skip=0)
    got = res.results["pixels"]
    assert [h.image_id for h in got] == [FLAGS[j] for j in want]
    assert [h.rank for h in got] == [1, 2, 3, 4]
    np.testing.assert_allclose([h.score for h in got], sims[0, want], atol=1e-5)
    # by image id too (New_Zealand is the id of "New Zealand")
    assert query(flag_run["root"], "new_zealand", k=2).query_id == "New_Zealand"


def test_ensemble_is_the_mean_cosine_over_models(flag_run) -> None:
    res = query(flag_run["root"], "Japan", k=5)
    assert set(res.results) == {"pixels", "ext", "all"}
    q = FLAGS.index("Japan")
    mean = (_cosine(flag_run["vectors"]["pixels"]) + _cosine(flag_run["vectors"]["ext"])) / 2
    want = _top(mean[q], 5, skip=q)
    assert [h.image_id for h in res.results["all"]] == [FLAGS[j] for j in want]
    np.testing.assert_allclose([h.score for h in res.results["all"]], mean[q, want], atol=1e-5)


def test_image_path_returns_the_same_neighbours_as_the_stored_embedding(flag_run) -> None:
    by_name = query(flag_run["root"], "Chad", k=5, models=["pixels"])
    by_image = query(flag_run["root"], flag_run["paths"]["Chad"], k=5, models=["pixels"])
    assert by_image.kind == "image" and by_image.query_id == "Chad"  # same bytes as the run's Chad
    a, b = by_name.results["pixels"], by_image.results["pixels"]
    assert [h.image_id for h in b] == [h.image_id for h in a]
    np.testing.assert_allclose([h.score for h in b], [h.score for h in a], atol=1e-5)


def test_new_image_is_embedded_with_the_models_preprocessing(flag_run, tmp_path) -> None:
    buf = io.BytesIO()
    Image.open(flag_run["paths"]["Romania"]).convert("RGB").save(buf, "JPEG", quality=70)
    path = tmp_path / "photo of a flag.jpg"
    path.write_bytes(buf.getvalue())
    res = query(flag_run["root"], str(path), k=3, models=["pixels"])
    assert res.query_id is None  # not one of the run's files: nothing excluded
    vec = flag_run["embedder"]([decode_image(path.read_bytes())])[0]
    stored = flag_run["vectors"]["pixels"]
    sims = _cosine(np.vstack([vec[None, :], stored]))[0, 1:]
    want = _top(sims, 3, skip=None)
    assert [h.image_id for h in res.results["pixels"]] == [FLAGS[j] for j in want]
    assert res.results["pixels"][0].image_id == "Romania"
    np.testing.assert_allclose([h.score for h in res.results["pixels"]], sims[want], atol=1e-5)


def test_image_query_skips_a_model_without_known_weights_with_a_note(flag_run, capsys,
                                                                    tmp_path) -> None:
    photo = tmp_path / "chad.jpg"  # not one of the run's files: each model must embed it
    Image.open(flag_run["paths"]["Chad"]).convert("RGB").save(photo, "JPEG", quality=90)
    code = main(["-q", "query", str(photo), "--run", flag_run["root"], "-k", "3"])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "note: ext skipped: embeddings were imported without --checkpoint, so the weights that "
        "made them are unknown"
    )
    assert "pixels" in captured.out and "Romania" in captured.out


def test_json_output_side_by_side(flag_run, capsys) -> None:
    assert main(["-q", "query", "Indonesia", "--run", flag_run["root"], "-k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["query_id"] == "Indonesia" and data["k"] == 2
    assert set(data["results"]) == {"pixels", "ext", "all"}
    for hits in data["results"].values():
        assert [h["rank"] for h in hits] == [1, 2]
        assert all(h["image_id"] != "Indonesia" for h in hits)
    assert main(["-q", "query", "Indonesia", "--run", flag_run["root"], "-k", "2", "--json",
                 "--model", "pixels"]) == 0
    assert set(json.loads(capsys.readouterr().out)["results"]) == {"pixels"}


@pytest.fixture()
def subfolder_run(flag_run, tmp_path) -> str:
    """Like flag_run (pixels only) but Chad and Romania came from sub-folders a/ and b/ of an
    images folder, both named `x`: their ids are `a/x` and `b/x`."""
    root = tmp_path / "run"
    ids = ["a/x", "b/x", *FLAGS[2:]]
    names = ["x", "x", *flag_run["names"][2:]]
    _write_model(RunDir.at(str(root)), "pixels", ids, names, flag_run["vectors"]["pixels"],
                 checkpoint=None, source="test")
    return str(root)


def test_an_id_with_a_slash_is_the_runs_image_not_a_path(subfolder_run, capsys) -> None:
    assert main(["-q", "query", "a/x", "--run", subfolder_run, "-k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["kind"], data["query_id"]) == ("name", "a/x")
    assert data["results"]["pixels"][0]["image_id"] == "b/x"  # Chad's nearest: Romania
    # the ambiguous name suggests exactly these ids, and each of them works
    assert main(["-q", "query", "x", "--run", subfolder_run]) == 2
    assert "use one of the ids a/x, b/x" in capsys.readouterr().err
    assert query(subfolder_run, "B/X", k=1).query_id == "b/x"


def test_every_image_is_reachable_by_its_exact_id_and_names_fold_alike_on_both_sides() -> None:
    """The shared-name check ran before the exact id (`red` and `sub/red`, both named `red`:
    typing the id `red` was "ambiguous"), ids folded to the first hit (`CASE`/`case`: neither
    reachable), and the query was folded by Python while the names were folded by Arrow
    (` Padded `, `ΣΑΣ`, `İstanbul` each "unknown; did you mean" itself), without NFC."""
    from flagsim.errors import AmbiguousNameError
    from flagsim.search.catalog import Catalogue

    cat = Catalogue({"red": "red", "sub/red": "red", "CASE": "CASE", "case": "case",
                     "i5": " Padded ", "i6": "ΣΑΣ", "i7": "İstanbul", "i8": "e\u0301clair"})
    assert cat.resolve("red") == "red" and cat.resolve("sub/red") == "sub/red"
    assert cat.resolve("CASE") == "CASE" and cat.resolve("case") == "case"
    with pytest.raises(AmbiguousNameError, match="'Case' names 2 images; use one of the ids CASE, case"):
        cat.resolve("Case")
    assert cat.resolve(" Padded ") == "i5" and cat.resolve("padded") == "i5"
    assert cat.resolve("ΣΑΣ") == "i6" and cat.resolve("σας") == "i6" and cat.resolve("σασ") == "i6"
    assert cat.resolve("İstanbul") == "i7" and cat.resolve("istanbul") == "i7"
    assert cat.resolve("\u00e9clair") == "i8" and cat.resolve("ÉCLAIR") == "i8"  # NFC both sides
    assert cat.knows("ΣΑΣ") and cat.count_named("Case") == 2 and not cat.knows("blue")
    with pytest.raises(UnknownNameError, match="unknown name 'blue'"):
        cat.resolve("blue")


def test_an_image_query_that_cannot_be_read_is_one_line_naming_the_file(flag_run, tmp_path, capsys):
    """`not a recognised image format` and `empty file (0 bytes)` did not say which file; a
    directory was "image file not found"."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    for name, why in (("empty.png", "empty file (0 bytes)"), ("text.png", "not a recognised image"),
                      ("folder.png", "is a directory")):
        path = str(tmp_path / name)
        assert main(["query", path, "--run", flag_run["root"]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and path in err[0] and why in err[0], err


def test_a_file_at_an_ids_path_needs_dot_slash_or_image(flag_run, subfolder_run, tmp_path,
                                                       monkeypatch) -> None:
    """The documented rule: an id of the run wins; `./a/x` (or --image) is the file."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(Path(flag_run["paths"]["Japan"]).read_bytes())
    monkeypatch.chdir(tmp_path)
    assert query(subfolder_run, "a/x", k=1).kind == "name"
    by_file = query(subfolder_run, "./a/x", k=1)
    assert by_file.kind == "image" and by_file.query_id is None
    assert by_file.results["pixels"][0].image_id == "Japan"  # the file's own bytes, embedded
    assert query(subfolder_run, "a/x", k=1, as_image=True).kind == "image"


def _in_subprocess(probe: str) -> list:
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_image_query_by_a_runs_own_file_builds_no_model(flag_run) -> None:
    """A file with the bytes of one of the run's images takes its stored embeddings: no torch,
    the same neighbours as the name, and even `ext` (imported without weights) answers."""
    probe = ("import json, sys\nfrom flagsim.search.query import query\n"
             f"r = query({flag_run['root']!r}, {flag_run['paths']['Chad']!r}, k=3)\n"
             "print(json.dumps([{m: [h.image_id for h in hits] for m, hits in r.results.items()}, "
             "[m for m in ('torch', 'transformers', 'timm', 'ray') if m in sys.modules]]))")
    hits, heavy = _in_subprocess(probe)
    assert heavy == []
    by_name = query(flag_run["root"], "Chad", k=3)
    assert hits == {m: [h.image_id for h in v] for m, v in by_name.results.items()}
    assert set(hits) == {"pixels", "ext", "all"} and hits["pixels"][0] == "Romania"


def test_image_query_with_only_pixels_builds_no_network_model(flag_run, tmp_path) -> None:
    """Only the queried models' embedders are built: pixels needs torchvision's resize (the
    stored vectors were made with it), never transformers or timm."""
    root = tmp_path / "run"
    _write_model(RunDir.at(str(root)), "pixels", FLAGS, flag_run["names"],
                 flag_run["vectors"]["pixels"], checkpoint=None, source="test")
    probe = ("import json, sys\nfrom flagsim.search.query import query\n"
             f"r = query({str(root)!r}, {flag_run['paths']['Chad']!r}, k=1)\n"
             "print(json.dumps([r.results['pixels'][0].image_id, "
             "[m for m in ('transformers', 'timm', 'ray') if m in sys.modules]]))")
    top, heavy = _in_subprocess(probe)
    assert heavy == []
    assert top == "Chad"  # itself: this run has no images table to recognise its bytes by


def test_a_name_that_is_not_utf8_in_a_shard_is_one_line_naming_the_file(tmp_path, capsys) -> None:
    """Parquet does not check UTF-8: a flipped byte inside a name used to surface as a pyarrow
    traceback from the catalogue's case folding. Every Parquet read now validates its strings."""
    import pyarrow.parquet as pq
    from runs import make_run

    from flagsim.errors import DataError
    from flagsim.storage import Location

    make_run(tmp_path, "m", np.random.default_rng(3).normal(size=(20, 4)).astype(np.float32))
    shard = tmp_path / "embeddings" / "model=m" / "part-00000.parquet"
    pq.write_table(pq.read_table(shard), shard, compression="none", use_dictionary=False)
    data = bytearray(shard.read_bytes())
    data[data.index(b"Image img00003")] = 0xFF  # no longer UTF-8, same length
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="part-00000.parquet is not a readable Parquet file: .*UTF"):
        Location.parse(str(shard)).read_parquet(columns=["image_id", "name"])
    capsys.readouterr()
    assert main(["query", "img00001", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flagsim: error:") and "part-00000.parquet" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_an_image_query_skips_a_model_whose_weights_are_unavailable_without_loading_it(
        tmp_path, monkeypatch) -> None:
    """The same check as `flagsim models` (seconds), not a load that retries an unreachable hub
    for half a minute and then blames the repository; the reason is named once per model."""
    import dataclasses

    from runs import make_run

    import flagsim.models
    from flagsim.errors import DataError
    from flagsim.shards import read_manifest

    run = make_run(tmp_path, "vit", np.random.default_rng(2).normal(size=(5, 1024)).astype(np.float32))
    man = read_manifest(run, "vit")
    write_manifest(run, dataclasses.replace(man, checkpoint="google/vit-large-patch16-224-in21k",
                                            source="flagsim import-csv x.csv"))
    image = tmp_path / "q.png"
    Image.new("RGB", (30, 20), (200, 10, 10)).save(image)

    def no_load(*args, **kwargs):
        raise AssertionError("weights that are not there must not be loaded")

    monkeypatch.setattr(flagsim.models, "create_embedder", no_load)
    with pytest.raises(DataError) as info:
        query(str(tmp_path), str(image), k=2)
    msg = str(info.value)
    assert "vit: weights google/vit-large-patch16-224-in21k are not in the local Hugging Face cache" in msg
    assert "vit: vit:" not in msg and "\n" not in msg


def test_scores_of_identical_vectors_are_clipped_to_1(tmp_path, capsys) -> None:
    """FAISS's float32 sums over 6,375 dims scored identical unit vectors 1.00001 (and printed
    it in --json); cosine scores are clipped to [-1, 1] where hits are made."""
    from flagsim.search.neighbours import read_neighbours, write_neighbours

    dim = 6375
    x = np.concatenate([np.ones((3, dim)), -np.ones((1, dim)),
                        np.random.default_rng(0).random((3, dim))]).astype(np.float32)
    run = RunDir.at(str(tmp_path))
    ids = [f"img{i}" for i in range(len(x))]
    _write_model(run, "m", ids, ids, x)
    assert main(["-q", "query", "img0", "--run", str(tmp_path), "-k", "6", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]["m"]
    scores = {h["image_id"]: h["score"] for h in hits}
    assert scores["img1"] == scores["img2"] == 1.0 and scores["img3"] == -1.0
    write_neighbours(str(tmp_path), k=6, models=["m"])
    table = read_neighbours(str(tmp_path), "m").to_pydict()
    assert max(table["score"]) == 1.0 and min(table["score"]) == -1.0
