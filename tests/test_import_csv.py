"""`flagsim import-csv`: the original notebook's embedding CSVs become validated shards."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
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
    for reserved in ("all", "ALL"):  # the ensemble's name: as a model it broke index and neighbours
        with pytest.raises(DataError, match="reserved for the ensemble"):
            import_csv(str(path), reserved, str(tmp_path / "run"))
    from flagsim.importemb import import_embeddings

    pq_path = tmp_path / "v.parquet"
    pa.table({"image_id": ["a", "b"], "embedding": [[1.0, 0.0], [0.0, 1.0]]}).to_pandas().to_parquet(pq_path)
    with pytest.raises(DataError, match="reserved for the ensemble"):
        import_embeddings(str(pq_path), "all", str(tmp_path / "run2"))
    assert not (tmp_path / "run2").exists()


def test_reimporting_the_same_file_is_up_to_date_and_another_needs_force(tmp_path) -> None:
    rows = [(f"L{i}", np.full(3, i + 1.0, np.float32)) for i in range(3)]
    path = _write_csv(tmp_path / "a.csv", rows)
    run = RunDir.at(str(tmp_path / "run"))
    first = import_csv(str(path), "ext", str(tmp_path / "run"))
    assert not first.up_to_date
    manifest = json.loads(run.manifest("ext").read_text())
    assert manifest["processor"] == {
        "source_file": "a.csv",
        "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "source_bytes": path.stat().st_size,
    }
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "embeddings").rglob("*")}
    again = import_csv(str(path), "ext", str(tmp_path / "run"))
    assert again.up_to_date and (again.rows, again.dim, again.shards) == (3, 3, 1)
    assert {p.name: p.stat().st_mtime_ns
            for p in (tmp_path / "run" / "embeddings").rglob("*")} == written  # nothing rewritten
    # other bytes (one value changed), or other weights, still need --force
    other = _write_csv(tmp_path / "b.csv", [*rows[:2], ("L2", np.full(3, 9.0, np.float32))])
    with pytest.raises(DataError, match="already holds embeddings of ext; pass --force"):
        import_csv(str(other), "ext", str(tmp_path / "run"))
    with pytest.raises(DataError, match="pass --force"):
        import_csv(str(path), "ext", str(tmp_path / "run"), checkpoint="org/model")
    res = import_csv(str(other), "ext", str(tmp_path / "run"), force=True)
    assert res.rows == 3 and not res.up_to_date
    assert read_embeddings(run, "ext").vectors[2].tolist() == [9.0, 9.0, 9.0]


def test_reference_import_twice_through_the_cli_is_up_to_date(tmp_path, capsys) -> None:
    files = [str(REFERENCE / f"national_flag_embeddings_{x}.csv.gz") for x in ("clip", "vit")]
    args = ["-q", "import-csv", *files, "--run", str(tmp_path / "r")]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("up to date" in line for line in out)
    assert out[0].startswith("195 x 512 embeddings of clip")


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


def test_a_gzip_that_expands_a_thousandfold_is_streamed_not_loaded(tmp_path) -> None:
    pad = "0" * 200_000
    path = tmp_path / "padded.csv.gz"
    with gzip.open(path, "wt", compresslevel=1, newline="") as f:
        f.write("Country,padding,features\n")
        for i in range(500):
            f.write(f"L{i},{pad},[{i} 1. 2. 3.]\n")
    expanded = 500 * len(pad)  # 100 MB of text in a file of about 100 KB
    assert path.stat().st_size < expanded / 100
    tracemalloc.start()
    try:
        res = import_csv(str(path), "ext", str(tmp_path / "run"), shard_size=200)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (res.rows, res.dim, res.shards) == (500, 4, 3)
    assert peak < expanded / 10  # a few MB: the file's text is never held whole
    emb = read_embeddings(RunDir.at(str(tmp_path / "run")), "ext")
    assert emb.ids[-1] == "L499" and emb.vectors[-1].tolist() == [499.0, 1.0, 2.0, 3.0]


def test_csv_with_a_byte_order_mark_imports(tmp_path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("Country,features\r\nAland,[1 2]\r\n".encode("utf-8-sig"))
    assert main(["-q", "import-csv", str(path), "--model", "ext", "--run", str(tmp_path / "r")]) == 0
    assert read_embeddings(RunDir.at(str(tmp_path / "r")), "ext").ids == ["Aland"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("Country,features\nAland,[1 2]\nÅland,[3 4]\n".encode("latin-1"),
         r"bad\.csv: line 3 is not UTF-8 text \(byte 0xc5 at column 1\)"),
        (b'Country,features\nAland,"[' + (b"1 " * 500 + b"\n") * 17_500 + b']"\n',
         r"bad\.csv: line \d+: not valid CSV \(a field is larger than the limit of 16 MiB\)"),
        (b"Country,features\nAland,[" + b"1 " * (9 * 2**20) + b"]\n",
         r"bad\.csv: line 2 is longer than 16 MiB"),
        (b"\x1f\x8b\x08\x00 not really gzip",
         r"bad\.csv is not a readable gzip file"),
    ],
    ids=["latin-1", "big-field", "long-line", "bad-gzip"],
)
def test_unreadable_files_are_one_line_naming_file_and_line(tmp_path, capsys, content,
                                                            message) -> None:
    (tmp_path / "bad.csv").write_bytes(content)
    rc = main(["-q", "import-csv", str(tmp_path / "bad.csv"), "--model", "ext", "--run",
               str(tmp_path / "r")])
    assert rc == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flagsim: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "r" / "embeddings").exists()
