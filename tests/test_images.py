"""Images table: bundled set, folders, seed-format CSVs; stable ids and safe file names."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from flagsim.cli import main
from flagsim.errors import DataError
from flagsim.images import bundled_table, from_folder, read_images_table, safe_stem, unique_stems
from flagsim.schema import IMAGES_SCHEMA


def test_bundled_table_has_all_197_real_flags():
    t = bundled_table()
    assert t.num_rows == 197
    assert t.schema == IMAGES_SCHEMA
    rows = {r["image_id"]: r for r in t.to_pylist()}
    assert rows["New_Zealand"]["name"] == "New Zealand"
    assert rows["Denmarki"]["name"] == "Denmark"  # seed file name kept, footnote dropped from the name
    assert rows["São_Tomé_and_Príncipe"]["format"] == "PNG"
    assert rows["Kosovo"]["width"] == 320
    assert len(rows["Chad"]["sha256"]) == 64


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("New Zealand", "New_Zealand"),
        ("Denmark[i]", "Denmarki"),
        ("São Tomé and Príncipe", "São_Tomé_and_Príncipe"),
        ("../../etc/passwd", "etcpasswd"),
        ("a/b\\c", "abc"),
        ("..", "image"),
        ("\x00\x1b[31mred", "31mred"),
    ],
)
def test_safe_stem(name, stem):
    assert safe_stem(name) == stem
    assert "/" not in safe_stem(name) and ".." not in safe_stem(name)


def test_unique_stems_disambiguates():
    assert unique_stems(["Congo", "Congo", "congo"]) == ["Congo", "Congo_2", "congo_3"]


def test_images_from_folder_cli(tmp_path, bundled_dir):
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    shutil.copy(bundled_dir / "images" / "Chad.png", src / "Chad.png")
    shutil.copy(bundled_dir / "images" / "Romania.png", src / "sub" / "Romania.png")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "run"
    assert main(["images", "--from-folder", str(src), "--out", str(out)]) == 0
    t = pq.read_table(out / "images.parquet")
    assert sorted(t.column("image_id").to_pylist()) == ["Chad", "sub/Romania"]
    assert t.schema.equals(IMAGES_SCHEMA)


def test_images_from_seed_csv_reports_missing_files(tmp_path, bundled_dir):
    csv = tmp_path / "flags.csv"
    csv.write_text("Country,Flag Image\nChad,http://x/Chad.png\nDenmark[i],\nAtlantis,\n")
    out = tmp_path / "run"
    rc = main(["images", "--from-csv", str(csv), "--image-dir", str(bundled_dir / "images"),
               "--out", str(out)])
    assert rc == 0
    t = read_images_table(out)
    assert t.column("image_id").to_pylist() == ["Chad", "Denmarki"]
    assert t.column("source_url").to_pylist()[0] == "http://x/Chad.png"
    errs = pq.read_table(out / "errors" / "images" / "part-00000.parquet").to_pylist()
    assert [(e["image_id"], e["reason"]) for e in errs] == [("Atlantis", "file not found")]


def test_images_table_missing_column_is_one_line_error(tmp_path):
    import pyarrow as pa

    p = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "name": ["a"]}), p)
    with pytest.raises(DataError, match="missing column.*path"):
        read_images_table(p)


def test_csv_without_country_column(tmp_path, bundled_dir, capsys):
    csv = tmp_path / "bad.csv"
    csv.write_text("Name,Url\nChad,x\n")
    rc = main(["images", "--from-csv", str(csv), "--image-dir", str(bundled_dir), "--out",
               str(tmp_path / "r")])
    assert rc == 2
    assert "no 'Country' column" in capsys.readouterr().err


def test_folder_ids_keep_the_extension_only_when_stems_clash(tmp_path, bundled_dir):
    d = tmp_path / "d"
    d.mkdir()
    for name in ("a.png", "a.jpg", "b.png"):
        shutil.copy(bundled_dir / "images" / "Chad.png", d / name)
    ids = sorted(from_folder(d).column("image_id").to_pylist())
    assert ids == ["a.jpg", "a.png", "b"]
