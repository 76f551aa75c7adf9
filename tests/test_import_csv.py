"""`flagsim import-csv`: the original notebook's embedding CSVs become validated shards."""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flagsim.cli import main
from flagsim.errors import DataError
from flagsim.images import read_images_table, safe_stem
from flagsim.importcsv import import_csv, model_from_filename, model_from_label, parse_features
from flagsim.rundir import RunDir
from flagsim.shards import read_embeddings

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"


def _write_csv(path: Path, rows: list[tuple[str, np.ndarray]]) -> Path:
    """A CSV in the original format: features as numpy prints a 1xD array (with line breaks)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Country", "Flag Image", "features"])
        for name, vec in rows:
            w.writerow([name, f"https://example.org/{name}.png", str(vec.reshape(1, -1))])
    return path


def test_parse_features_reads_numpy_printed_text() -> None:
    vec = np.random.default_rng(0).normal(size=(1, 37)).astype(np.float32)
    with np.printoptions(threshold=sys.maxsize, precision=10):
        text = str(vec)
    assert "\n" in text and text.startswith("[[")
    np.testing.assert_allclose(parse_features(text, "x"), vec[0], rtol=1e-7)
    np.testing.assert_array_equal(parse_features("[1.5, -2e-3,\n 4]", "x"), [1.5, -0.002, 4.0])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[1. 2. ... 9.]]", "summarised by numpy"),
        ("[[1. nan 2.]]", "NaN or Inf"),
        ("[[1. abc]]", "not numbers"),
        ("[[]]", "no numbers"),
        ("[[1. 2.]\n [3. 4.]]", "more than one row"),
    ],
)
def test_parse_features_rejects_bad_text(text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_features(text, "f.csv: row 2 (X)")


def test_original_labels_and_file_names_map_to_model_names() -> None:
    labels = ["ViT", "EfficientNet", "DINO-v2", "clip", "blip", "VGG16"]
    assert [model_from_label(x) for x in labels] == ["vit", "efficientnet", "dinov2", "clip",
                                                      "blip2", "vgg16"]
    assert model_from_filename("a/national_flag_embeddings_DINO-v2.csv.gz") == "dinov2"
    assert model_from_filename("national_flag_embeddings_blip.csv") == "blip2"
    assert model_from_filename("mine.csv") is None


def test_import_reference_file_keeps_every_vector_and_id(tmp_path) -> None:
    src = REFERENCE / "national_flag_embeddings_clip.csv.gz"
    res = import_csv(str(src), "clip", str(tmp_path))
    assert (res.rows, res.dim, res.shards, res.images_table) == (195, 512, 1, "written")
    run = RunDir.at(str(tmp_path))
    emb = read_embeddings(run, "clip")
    original = pd.read_csv(src)
    assert emb.ids == [safe_stem(c) for c in original["Country"]]
    assert "Denmarki" in emb.ids and emb.names[emb.ids.index("Denmarki")] == "Denmark"
    want = np.stack([parse_features(t, "") for t in original["features"]]).astype(np.float32)
    np.testing.assert_array_equal(emb.vectors, want)
    assert emb.manifest.source == "flagsim import-csv national_flag_embeddings_clip.csv.gz"
    assert emb.manifest.checkpoint is None and emb.manifest.dim == 512
    # the images table of the bundled flags, for the same ids, with files that exist
    images = read_images_table(run.images_table)
    assert images.column("image_id").to_pylist() == emb.ids
    assert all(Path(p).is_file() for p in images.column("path").to_pylist())


def test_dimension_disagreeing_with_the_registry_is_refused(tmp_path) -> None:
    src = REFERENCE / "national_flag_embeddings_clip.csv.gz"
    import_csv(str(REFERENCE / "national_flag_embeddings_vit.csv.gz"), "vit", str(tmp_path))
    with pytest.raises(DataError) as err:
        import_csv(str(src), "vit", str(tmp_path), force=True)
    msg = str(err.value)
    assert "512-d embeddings, but model vit is 1024-d" in msg and "\n" not in msg
    # the refused --force left the existing embeddings alone
    assert read_embeddings(RunDir.at(str(tmp_path)), "vit").dim == 1024


def test_unregistered_model_name_is_imported_as_external(tmp_path) -> None:
    rng = np.random.default_rng(1)
    rows = [(f"Land {i}", rng.normal(size=6).astype(np.float32)) for i in range(5)]
    path = _write_csv(tmp_path / "mine.csv", rows)
    res = import_csv(str(path), "my-model", str(tmp_path / "run"), shard_size=2)
    assert (res.rows, res.dim, res.shards) == (5, 6, 3)
    assert res.images_table == "none"  # not bundled flags: no images table invented
    emb = read_embeddings(RunDir.at(str(tmp_path / "run")), "my-model")
    assert emb.ids == [f"Land_{i}" for i in range(5)]
    np.testing.assert_allclose(emb.vectors, np.stack([v for _, v in rows]), rtol=1e-6)
    with pytest.raises(DataError, match="invalid model name"):
        import_csv(str(path), "../evil", str(tmp_path / "run"))


def test_existing_embeddings_need_force(tmp_path) -> None:
    rows = [(f"L{i}", np.full(3, i + 1.0, np.float32)) for i in range(3)]
    path = _write_csv(tmp_path / "a.csv", rows)
    import_csv(str(path), "ext", str(tmp_path / "run"))
    with pytest.raises(DataError, match="already holds embeddings of ext; pass --force"):
        import_csv(str(path), "ext", str(tmp_path / "run"))
    assert import_csv(str(path), "ext", str(tmp_path / "run"), force=True).rows == 3


def test_bad_files_give_one_line_errors_naming_the_row(tmp_path) -> None:
    rows = [("A", np.ones(4, np.float32)), ("B", np.ones(3, np.float32))]
    path = _write_csv(tmp_path / "ragged.csv", rows)
    with pytest.raises(DataError, match=r"ragged.csv: row 3 \(B\): 3 values, but the first row has 4"):
        import_csv(str(path), "ext", str(tmp_path / "run"))
    dup = _write_csv(tmp_path / "dup.csv", [("A B", np.ones(2)), ("A_B", np.ones(2))])
    with pytest.raises(DataError, match=r"same image id 'A_B' as row 2"):
        import_csv(str(dup), "ext", str(tmp_path / "run"))
    (tmp_path / "cols.csv").write_text("name,vector\nA,[1 2]\n")
    with pytest.raises(DataError, match="no 'Country' column"):
        import_csv(str(tmp_path / "cols.csv"), "ext", str(tmp_path / "run"))
    assert not (tmp_path / "run" / "embeddings").exists()


def test_gzipped_file_and_cli_with_model_from_the_file_name(tmp_path, capsys) -> None:
    rows = [(f"L{i}", np.arange(4, dtype=np.float32) + i) for i in range(4)]
    plain = _write_csv(tmp_path / "x.csv", rows)
    gz = tmp_path / "national_flag_embeddings_clip-like.csv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    assert main(["-q", "import-csv", str(gz), "--model", "ext", "--run", str(tmp_path / "r")]) == 0
    assert "4 x 4 embeddings of ext" in capsys.readouterr().out
    # the original files need no --model: their label names it
    files = [str(REFERENCE / f"national_flag_embeddings_{x}.csv.gz") for x in ("blip", "DINO-v2")]
    assert main(["-q", "import-csv", *files, "--run", str(tmp_path / "r")]) == 0
    run = RunDir.at(str(tmp_path / "r"))
    assert sorted(run.embedded_models()) == ["blip2", "dinov2", "ext"]
    manifest = json.loads(run.manifest("dinov2").read_text())
    assert manifest["dim"] == 768 and manifest["rows"] == 195
    # a file name that does not say the model needs --model
    assert main(["-q", "import-csv", str(plain), "--run", str(tmp_path / "r")]) == 2
    assert "pass --model NAME" in capsys.readouterr().err


def test_features_column_may_hold_commas(tmp_path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["Country", "features"])
    w.writerow(["Aland", "[0.5, 1.5, 2.5]"])
    w.writerow(["Bland", "[1.0, 0.0, 0.0]"])
    (tmp_path / "c.csv").write_text(buf.getvalue())
    res = import_csv(str(tmp_path / "c.csv"), "ext", str(tmp_path / "run"))
    assert (res.rows, res.dim) == (2, 3)
