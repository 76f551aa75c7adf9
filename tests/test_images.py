"""Images table: bundled set, folders, seed-format CSVs; stable ids and safe file names."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, features

from flagsim.cli import main
from flagsim.errors import DataError
from flagsim.images import (
    IMAGE_SUFFIXES,
    bundled_table,
    from_folder,
    read_images_table,
    safe_stem,
    unique_stems,
)
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


def test_a_run_of_the_bundled_flags_holds_its_own_copies(tmp_path, capsys):
    """The package's folder can be temporary (a Ray job's unpacked working dir, gone with its
    session): a run pointing into it lost every image. `images --bundled` and an embed of
    the bundled source copy them into RUN/images/ and point there; a rerun rewrites none."""
    from flagsim.config import load_config
    from flagsim.pipeline.embed import resolve_images
    from flagsim.rundir import RunDir

    assert main(["images", "--bundled", "--out", str(tmp_path / "a")]) == 0
    run = RunDir.at(tmp_path / "b")
    resolve_images(load_config(None), run, None)
    for root in (tmp_path / "a", tmp_path / "b"):
        table = read_images_table(root)
        assert table.num_rows == 197
        paths = [Path(p) for p in table.column("path").to_pylist()]
        assert all(p.parent == root / "images" for p in paths)
        want = {r["image_id"]: r["sha256"] for r in bundled_table().to_pylist()}
        got = {r["image_id"]: hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest()
               for r in table.to_pylist()}
        assert got == want
    chad = tmp_path / "a" / "images" / "Chad.png"
    before = chad.stat().st_mtime_ns
    assert main(["images", "--bundled", "--out", str(tmp_path / "a")]) == 0
    assert chad.stat().st_mtime_ns == before


def test_an_images_table_is_found_by_its_contents_and_a_csv_is_named_as_one(tmp_path):
    """`embed --images flags.csv` said `images table not found: flags.csv/images.parquet`; a
    Parquet table under another suffix (.pq) was not read at all."""
    from flagsim.images import images_table_location
    from flagsim.imagestable import ImagesTable

    pq.write_table(bundled_table().slice(0, 3), tmp_path / "t.pq")
    assert ImagesTable(str(tmp_path / "t.pq")).num_rows == 3
    assert read_images_table(tmp_path / "t.pq").num_rows == 3
    (tmp_path / "flags.csv").write_text("Country,Flag Image\nChad,Chad.png\n")
    with pytest.raises(DataError, match=r"flags.csv is a CSV file, not an images table: make one "
                                        r"with `flagsim images --from-csv"):
        images_table_location(str(tmp_path / "flags.csv"))
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(DataError, match="notes.md is not an images table"):
        ImagesTable(str(tmp_path / "notes.md"))


@pytest.mark.parametrize(("csv_text", "image_dir", "expected"), [
    # each said "none of the images named in X were found in DIR" (or Python's csv advice)
    ("Country,Flag Image\n", "images", r"names no image \(no row with a Country under its"),
    ("Country,Flag Image\nChad,Chad.png\n", "nowhere", "image directory .*nowhere not found"),
    ("Country,Flag Image\rChad,Chad.png\rPeru,Peru.png\r", "images",
     "its lines end in a bare CR"),
])
def test_csv_problems_are_named_for_what_they_are(tmp_path, bundled_dir, capsys, csv_text,
                                                  image_dir, expected):
    (tmp_path / "list.csv").write_bytes(csv_text.encode())
    folder = bundled_dir / "images" if image_dir == "images" else tmp_path / image_dir
    assert main(["images", "--from-csv", str(tmp_path / "list.csv"), "--image-dir", str(folder),
                 "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(expected, err[0]), err


def test_a_huge_image_in_a_folder_prints_no_raw_pillow_warning(tmp_path):
    """Pillow's DecompressionBombWarning printed `.../PIL/Image.py:NNNN: DecompressionBombWarning
    ... warnings.warn(` when the folder was listed; the limit is the decoder's to enforce."""
    import subprocess
    import sys

    from imagegen import bomb_png

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "huge.png").write_bytes(bomb_png(10000, 10000))  # 100M px: a warning
    proc = subprocess.run([sys.executable, "-m", "flagsim", "images", "--from-folder",
                           str(tmp_path / "imgs"), "--out", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "DecompressionBombWarning" not in proc.stderr and "warnings.warn" not in proc.stderr
    assert read_images_table(tmp_path / "d").column("width").to_pylist() == [10000]


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


def _one_error_line(capsys) -> str:
    """The single stderr line of a refused `flagsim -q ...` command."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flagsim: error: "), lines
    return lines[0]


def test_long_names_get_stems_within_180_bytes_that_stay_distinct():
    a, b = "Республика" * 15 + "А", "Республика" * 15 + "Б"  # 151 letters, 302 bytes each
    sa, sb = safe_stem(a), safe_stem(b)
    assert sa != sb and len(sa.encode()) <= 180 and len(sb.encode()) <= 180
    assert sa.startswith("Республика") and safe_stem(a) == sa  # stable
    assert safe_stem("x" * 180) == "x" * 180  # short enough: unchanged
    stems = unique_stems([a, a])
    assert stems[1] == stems[0] + "_2" and len(f"{stems[1]}.jpeg".encode()) <= 200


def test_folder_symlink_loops_end_and_list_each_file_once(tmp_path, bundled_dir):
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    shutil.copy(bundled_dir / "images" / "Chad.png", src / "Chad.png")
    shutil.copy(bundled_dir / "images" / "Romania.png", src / "sub" / "Romania.png")
    (src / "sub" / "up").symlink_to("..")  # two loops: walking both is exponential
    (src / "sub" / "here").symlink_to(".")
    (src / "alias").symlink_to("sub")  # the same folder under a second name
    (src / "Chad_too.png").symlink_to("Chad.png")  # the same file under a second name
    ids = from_folder(src).column("image_id").to_pylist()
    assert ids == ["Chad", "sub/Romania"]
    # a folder reached only through a symlink is walked, once
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(bundled_dir / "images" / "Peru.png", outside / "Peru.png")
    (outside / "back").symlink_to(src)
    (src / "more").symlink_to(outside)
    assert from_folder(src).column("image_id").to_pylist() == ["Chad", "more/Peru", "sub/Romania"]


def test_fifos_are_never_opened(tmp_path, bundled_dir, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(bundled_dir / "images" / "Romania.png", d / "Romania.png")
    os.mkfifo(d / "Chad.png")  # opening it for reading would block forever
    csv = tmp_path / "flags.csv"
    csv.write_text("Country,Flag Image\nChad,\nRomania,\n")
    out = tmp_path / "run"
    assert main(["-q", "images", "--from-csv", str(csv), "--image-dir", str(d), "--out", str(out)]) == 0
    assert read_images_table(out).column("image_id").to_pylist() == ["Romania"]
    errs = pq.read_table(out / "errors" / "images" / "part-00000.parquet").to_pylist()
    assert [(e["image_id"], e["reason"]) for e in errs] == [
        ("Chad", "not a regular file (a FIFO, socket or device)")
    ]
    assert from_folder(d).column("image_id").to_pylist() == ["Romania"]
    os.mkfifo(tmp_path / "fifo.csv")
    capsys.readouterr()
    rc = main(["-q", "images", "--from-csv", str(tmp_path / "fifo.csv"), "--image-dir", str(d),
               "--out", str(out)])
    assert rc == 2 and "not a regular file" in _one_error_line(capsys)


def test_folder_takes_every_format_pillow_opens_avif_included(tmp_path, bundled_dir):
    if not features.check("avif"):
        pytest.skip("this Pillow cannot write AVIF")
    d = tmp_path / "imgs"
    d.mkdir()
    with Image.open(bundled_dir / "images" / "Chad.png") as im:
        im.convert("RGB").save(d / "Chad.avif", format="AVIF")
        im.convert("RGB").save(d / "Peru.qoi", format="QOI")
    rows = {r["image_id"]: r for r in from_folder(d).to_pylist()}
    assert {k: v["format"] for k, v in rows.items()} == {"Chad": "AVIF", "Peru": "QOI"}
    assert rows["Chad"]["width"] == Image.open(bundled_dir / "images" / "Chad.png").width
    assert ".avif" in IMAGE_SUFFIXES and ".svg" in IMAGE_SUFFIXES and ".pdf" not in IMAGE_SUFFIXES


def test_csv_with_a_byte_order_mark_is_read(tmp_path, bundled_dir):
    csv = tmp_path / "bom.csv"
    csv.write_bytes("Country,Flag Image\r\nChad,http://x/Chad.png\r\n".encode("utf-8-sig"))
    out = tmp_path / "run"
    rc = main(["-q", "images", "--from-csv", str(csv), "--image-dir", str(bundled_dir / "images"),
               "--out", str(out)])
    assert rc == 0
    assert read_images_table(out).column("source_url").to_pylist() == ["http://x/Chad.png"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("Country\nChad\nC\xf4te d'Ivoire\n".encode("latin-1"),
         r"bad\.csv: line 3 is not UTF-8 text \(byte 0xf4 at column 2\)"),
        (b"Country,Flag Image\nChad," + b"x" * (17 * 2**20) + b"\n",
         r"bad\.csv: line 2 is longer than 16 MiB"),
        (b'Country,Flag Image\nChad,"' + (b"x" * 1000 + b"\n") * 17_000 + b'"\n',
         r"bad\.csv: line \d+: not valid CSV \(a field is larger than the limit of 16 MiB\)"),
        # the lenient reader read Peru's opened quote to the end of the file: Cyprus vanished
        # into Peru's name, with one "no readable image file" warning, and the command exited 0
        (b'Country,Flag Image\nChad,Chad.png\n"Peru,Peru.png\nCyprus,Cyprus.png\n',
         r"bad\.csv: line 3: not valid CSV \(a quoted field opened on this line is never closed; "
         r"the 1 line\(s\) after it would be read as part of it\)"),
        # ... and one closed by a later quoted field: four rows became one field, exit 0
        (b'Country,Flag Image\nChad,Chad.png\n"Peru,Peru.png\nCyprus,Cyprus.png\n'
         b'Denmark,Denmark.png\n"Korea, South",Korea.png\nJapan,Japan.png\n',
         r"bad\.csv: line 3: not valid CSV \(a quoted field opened on this line runs over 4 "
         r"lines into a row of 3 fields, where the header has 2: a stray quote\?\)"),
    ],
    ids=["latin-1", "long-line", "big-field", "unclosed-quote", "stray-quote"],
)
def test_unreadable_csv_is_one_line_naming_file_and_line(tmp_path, bundled_dir, capsys,
                                                         content, message):
    (tmp_path / "bad.csv").write_bytes(content)
    rc = main(["-q", "images", "--from-csv", str(tmp_path / "bad.csv"), "--image-dir",
               str(bundled_dir / "images"), "--out", str(tmp_path / "run")])
    assert rc == 2
    assert re.search(message, _one_error_line(capsys))
    assert not (tmp_path / "run" / "images.parquet").exists()


def test_from_folder_given_a_file_is_one_line(tmp_path, bundled_dir, capsys):
    rc = main(["-q", "images", "--from-folder", str(bundled_dir / "images" / "Chad.png"),
               "--out", str(tmp_path / "run")])
    assert rc == 2
    assert _one_error_line(capsys).endswith("Chad.png is not a directory")


def test_a_one_file_images_table_is_copied_into_the_run_in_batches(tmp_path) -> None:
    """`--images TABLE` of one big file: streamed a batch at a time, equal to the source."""
    import pyarrow.parquet as pq

    from flagsim.errors import DataError
    from flagsim.images import bundled_table, read_images_table
    from flagsim.pipeline.embed import _stream_copy
    from flagsim.rundir import RunDir
    from flagsim.storage import Location

    table = bundled_table()
    src = tmp_path / "big.parquet"
    pq.write_table(table, src, row_group_size=50)
    run = RunDir.at(str(tmp_path / "run"))
    _stream_copy(Location.parse(str(src)), run, batch_rows=7)
    copied = read_images_table(run.images_table)
    assert copied.num_rows == table.num_rows == 197
    assert copied.column("image_id").to_pylist() == table.column("image_id").to_pylist()
    assert copied.column("path").to_pylist() == table.column("path").to_pylist()
    assert pq.ParquetFile(str(run.images_table.path)).metadata.num_row_groups > 1  # written in batches
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.drop_columns(["path"]), bad)
    with pytest.raises(DataError, match="path"):
        _stream_copy(Location.parse(str(bad)), RunDir.at(str(tmp_path / "run2")))
    assert not (tmp_path / "run2" / "images.parquet").exists()  # nothing half-written


def test_folder_names_that_are_not_utf8_and_dangling_symlinks_are_skipped_with_a_warning(
        tmp_path, bundled_dir, caplog):
    """One file named with undecodable bytes used to end the whole listing in a traceback."""
    folder = tmp_path / "odd"
    folder.mkdir()
    src = next(iter(sorted((bundled_dir / "images").glob("*.png"))))
    shutil.copy(src, folder / "good.png")
    shutil.copy(src, os.path.join(os.fsencode(folder), b"bad\xffname.png"))
    os.symlink(tmp_path / "nothing.png", folder / "dangling.png")
    with caplog.at_level("WARNING"):
        table = from_folder(str(folder))
    assert table.column("image_id").to_pylist() == ["good"]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 1 names that are not UTF-8 text" in said and "bad\\udcffname.png" in said
    assert "skipped 1 symlinks to nothing" in said
