"""Input sources: webdataset shards, Parquet image columns, URL lists and s3 prefixes, end to end."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flagsim.config import load_config
from flagsim.errors import ConfigError, DataError
from flagsim.images import from_folder, images_table_hash, read_images_table, write_images_table
from flagsim.pipeline.embed import run_embed
from flagsim.pipeline.plan import plan_shards
from flagsim.pipeline.reader import decode_batch, shard_tables
from flagsim.refs import process_reader
from flagsim.rundir import RunDir
from flagsim.shards import read_embeddings
from flagsim.sources import expand_braces, from_parquet, from_webdataset

PNGS = ["Chad", "Japan", "Peru"]
JPEGS = ["Romania", "Italy"]
WEBPS = ["Ireland", "Mali"]


def _encoded(bundled_dir: Path, stem: str, fmt: str) -> bytes:
    data = (bundled_dir / "images" / f"{stem}.png").read_bytes()
    if fmt == "png":
        return data
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, {"jpg": "JPEG", "webp": "WEBP"}[fmt],
                                                     quality=95)
    return buf.getvalue()


def _good(bundled_dir: Path) -> dict[str, tuple[str, bytes]]:
    """stem -> (extension, bytes) of the good images of every test here."""
    out = {s: ("png", _encoded(bundled_dir, s, "png")) for s in PNGS}
    out |= {s: ("jpg", _encoded(bundled_dir, s, "jpg")) for s in JPEGS}
    out |= {s: ("webp", _encoded(bundled_dir, s, "webp")) for s in WEBPS}
    return out


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def make_shards(root: Path, bundled_dir: Path) -> dict[str, tuple[str, bytes]]:
    """Two tar shards of the good images (a caption each), one corrupt image member and one
    sample without an image; returns the good images."""
    good = _good(bundled_dir)
    root.mkdir(parents=True, exist_ok=True)
    stems = list(good)
    for n, part in enumerate((stems[:4], stems[4:])):
        with tarfile.open(root / f"shard-{n:05d}.tar", "w") as tf:
            for stem in part:
                ext, data = good[stem]
                _add(tf, f"{stem}.{ext}", data)
                _add(tf, f"{stem}.json", json.dumps({"caption": f"Flag of {stem}"}).encode())
            if n == 1:
                _add(tf, "broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
                _add(tf, "textonly.txt", b"a sample without an image")
    return good


def folder_of(root: Path, good: dict[str, tuple[str, bytes]]) -> Path:
    root.mkdir(parents=True)
    for stem, (ext, data) in good.items():
        (root / f"{stem}.{ext}").write_bytes(data)
    return root


def _cfg(*sets: str):
    return load_config(None, ["ray.read_cpus=1", "embed.models=[pixels]", *sets])


def _errors(run: Path, stage: str) -> pd.DataFrame:
    files = sorted((run / "errors" / stage).glob("*.parquet"))
    return pd.concat(pd.read_parquet(f) for f in files) if files else pd.DataFrame()


def assert_same_embeddings(run: Path, reference: Path, ids: list[str]) -> None:
    a = read_embeddings(RunDir.at(run), "pixels")
    b = read_embeddings(RunDir.at(reference), "pixels")
    assert sorted(a.ids) == sorted(b.ids) == sorted(ids)
    for i, image_id in enumerate(a.ids):
        np.testing.assert_array_equal(a.vectors[i], b.vectors[b.ids.index(image_id)])


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, bundled_dir, ray_local) -> Path:
    """The good images as plain files in a folder, embedded with `pixels` (the reference)."""
    tmp = tmp_path_factory.mktemp("folder")
    d = folder_of(tmp / "imgs", _good(bundled_dir))
    run = tmp / "run"
    write_images_table(from_folder(d), RunDir.at(run))
    run_embed(_cfg(), run_dir=str(run), show_progress=False)
    return run


# --- webdataset ------------------------------------------------------------------------------

def test_brace_patterns_expand_with_padding_and_lists():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x-{1..2}.tar") == ["a/x-1.tar", "a/x-2.tar", "b/x-1.tar", "b/x-2.tar"]
    with pytest.raises(DataError, match="backwards"):
        expand_braces("s-{5..1}.tar")
    with pytest.raises(DataError, match="neither"):
        expand_braces("s-{x}.tar")


def test_webdataset_table_points_into_the_shards(tmp_path, bundled_dir):
    good = make_shards(tmp_path / "wds", bundled_dir)
    run = RunDir.at(tmp_path / "run")
    writer = from_webdataset(str(tmp_path / "wds" / "shard-{00000..00001}.tar"), run)
    table = read_images_table(run.root)
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert set(rows) == set(good) | {"broken"}
    chad = rows["Chad"]
    assert chad["container"] == "tar" and chad["member"] == "Chad.png"
    assert chad["path"] == str(tmp_path / "wds" / "shard-00000.tar")
    assert chad["name"] == "Flag of Chad" and chad["format"] == "PNG"
    assert rows["Romania"]["format"] == "JPEG" and rows["Mali"]["format"] == "WEBP"
    with open(chad["path"], "rb") as f:  # the reference is the member's bytes, nothing unpacked
        f.seek(chad["offset"])
        assert f.read(chad["size"]) == good["Chad"][1]
    assert not (tmp_path / "run" / "images").exists()
    (err,) = writer.errors
    assert err["image_id"] == "textonly" and "no image member" in err["reason"]
    assert err["path"].endswith("shard-00001.tar#textonly.txt")


def test_webdataset_keys_in_two_shards_both_take_the_shard_stem(tmp_path, bundled_dir):
    d = tmp_path / "wds"
    d.mkdir()
    for n, stem in enumerate(["Chad", "Peru"]):
        with tarfile.open(d / f"s{n}.tar", "w") as tf:
            _add(tf, "flag.png", _encoded(bundled_dir, stem, "png"))
            _add(tf, f"{stem}.png", _encoded(bundled_dir, stem, "png"))
    run = RunDir.at(tmp_path / "run")
    from_webdataset(str(d), run)  # a folder of shards
    ids = read_images_table(run.root).column("image_id").to_pylist()
    assert ids == ["s0/flag", "Chad", "s1/flag", "Peru"]


def test_read_task_opens_each_shard_once(tmp_path, bundled_dir):
    make_shards(tmp_path / "wds", bundled_dir)
    run = RunDir.at(tmp_path / "run")
    from_webdataset(str(tmp_path / "wds" / "shard-{00000..00001}.tar"), run)
    table = read_images_table(run.root)
    (block,) = shard_tables(table, plan_shards(table.num_rows, 100))
    reader = process_reader()
    reader.close()
    before = reader.opened
    out = decode_batch({c: block.column(c).to_numpy(zero_copy_only=False) for c in block.column_names},
                       max_pixels=10**8)
    assert reader.opened - before == 2  # two shards, one open each for the 8 rows
    assert out["ok"].sum() == 7
    bad = [p for p, ok in zip(out["path"], out["ok"], strict=True) if not ok]
    assert bad == [str(tmp_path / "wds" / "shard-00001.tar") + "#broken.jpg"]


def test_webdataset_embeds_every_good_image_once_like_a_folder(tmp_path, bundled_dir, folder_run):
    good = make_shards(tmp_path / "wds", bundled_dir)
    run = tmp_path / "run"
    cfg = _cfg("images.source=webdataset", f"images.path={tmp_path}/wds/shard-{{00000..00001}}.tar")
    summary = run_embed(cfg, run_dir=str(run), show_progress=False)
    assert summary.result("pixels").images == len(good) and summary.decode_errors == 1
    errs = _errors(run, "embed")
    assert errs["image_id"].tolist() == ["broken"]
    assert errs["path"].iloc[0].endswith("shard-00001.tar#broken.jpg")
    assert _errors(run, "images")["path"].iloc[0].endswith("shard-00001.tar#textonly.txt")
    assert_same_embeddings(run, folder_run, list(good))
    again = run_embed(cfg, run_dir=str(run), show_progress=False)
    assert again.result("pixels").status == "up to date"


# --- Parquet ---------------------------------------------------------------------------------

def _parquet(path: Path, good: dict[str, tuple[str, bytes]], struct: bool) -> None:
    ids = list(good) + ["nullcell"]
    cells = [good[s][1] for s in good] + [None]
    if struct:
        col = pa.array([None if c is None else {"bytes": c, "path": f"{i}.img"}
                        for i, c in zip(ids, cells, strict=True)],
                       pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        col = pa.array(cells, pa.binary())
    table = pa.table({"key": ids, "label": [f"Flag of {i}" for i in ids], "image": col,
                      "n": list(range(len(ids)))})
    pq.write_table(table, path, row_group_size=3)


@pytest.mark.parametrize("struct", [False, True], ids=["binary", "hf-struct"])
def test_parquet_column_embeds_like_a_folder(tmp_path, bundled_dir, folder_run, struct):
    good = _good(bundled_dir)
    _parquet(tmp_path / "imgs.parquet", good, struct)
    run = tmp_path / "run"
    cfg = _cfg("images.source=parquet", f"images.path={tmp_path}/imgs.parquet",
               "images.image_column=image", "images.id_column=key", "images.name_column=label")
    summary = run_embed(cfg, run_dir=str(run), show_progress=False)
    assert summary.result("pixels").images == len(good) and summary.decode_errors == 0
    table = read_images_table(run)
    assert table.num_rows == len(good)  # the null cell is an error row, not an image
    row = table.to_pylist()[1]
    assert (row["container"], row["member"], row["offset"]) == ("parquet", "image", 1)
    assert row["name"] == "Flag of Japan"
    (err,) = _errors(run, "images").to_dict("records")
    assert err["image_id"] == "nullcell" and "null image cell" in err["reason"]
    assert err["path"].endswith("imgs.parquet#row=7")
    assert_same_embeddings(run, folder_run, list(good))


def test_parquet_bad_columns_are_one_line_errors(tmp_path, bundled_dir):
    _parquet(tmp_path / "imgs.parquet", _good(bundled_dir), struct=False)
    run = RunDir.at(tmp_path / "run")
    with pytest.raises(DataError, match=r"column 'n' of .* is int64, not image bytes") as e1:
        from_parquet(str(tmp_path / "imgs.parquet"), "n", run)
    with pytest.raises(DataError, match=r"has no column 'pixels' \(columns: key, label") as e2:
        from_parquet(str(tmp_path / "imgs.parquet"), "pixels", run)
    with pytest.raises(DataError, match="has no column 'nope'"):
        from_parquet(str(tmp_path / "imgs.parquet"), "image", run, id_column="nope")
    assert "\n" not in str(e1.value) + str(e2.value)
    assert not run.images_table.exists()
    with pytest.raises(ConfigError, match="image_column"):
        _cfg("images.source=parquet", "images.path=x.parquet")


def test_parquet_id_and_name_cells_are_text_whatever_their_type(tmp_path, bundled_dir):
    """Binary id/name cells (byte arrays written without the UTF-8 annotation) are decoded, not
    `b'Chad'`; an id 0 stays "0"; an empty id is named as empty (it said null); a list id
    column or bytes that are not text are one line."""
    chad = _encoded(bundled_dir, "Chad", "png")
    table = pa.table({"image": pa.array([chad] * 4),
                      "key": pa.array([b"Chad", b"", b"Mali", None], pa.binary()),
                      "n": [0, 1, 2, 3]})
    pq.write_table(table, tmp_path / "k.parquet")
    run = RunDir.at(tmp_path / "run")
    writer = from_parquet(str(tmp_path / "k.parquet"), "image", run, id_column="key",
                          name_column="key")
    got = read_images_table(tmp_path / "run")
    assert got.column("image_id").to_pylist() == ["Chad", "Mali"]
    assert got.column("name").to_pylist() == ["Chad", "Mali"]
    assert [e["reason"] for e in writer.errors] == ["empty 'key' (the id column)",
                                                    "null 'key' (the id column)"]
    run2 = RunDir.at(tmp_path / "run2")
    from_parquet(str(tmp_path / "k.parquet"), "image", run2, id_column="n")
    assert read_images_table(tmp_path / "run2").column("image_id").to_pylist() == ["0", "1", "2", "3"]
    with pytest.raises(DataError, match=r"column 'image' holds bytes that are not UTF-8 text"):
        from_parquet(str(tmp_path / "k.parquet"), "image", RunDir.at(tmp_path / "r3"),
                     id_column="image")
    pq.write_table(pa.table({"image": [chad], "ids": [[1, 2]]}), tmp_path / "l.parquet")
    with pytest.raises(DataError, match=r"column 'ids' holds lists, not text"):
        from_parquet(str(tmp_path / "l.parquet"), "image", RunDir.at(tmp_path / "r4"),
                     id_column="ids")


def test_duplicate_ids_are_named(tmp_path, bundled_dir):
    # it said "duplicate image_id(s) in Parquet ... even as <stem>/<key>", naming none
    chad = _encoded(bundled_dir, "Chad", "png")
    pq.write_table(pa.table({"image": [chad] * 3, "n": [10, 11, 10]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"even as <stem>/<key>: d/10$"):
        from_parquet(str(tmp_path / "d.parquet"), "image", RunDir.at(tmp_path / "r"),
                     id_column="n")


def test_parquet_default_ids_and_a_corrupt_cell(tmp_path, bundled_dir, ray_local):
    table = pa.table({"image": pa.array([_encoded(bundled_dir, "Chad", "png"), b"garbage"])})
    pq.write_table(table, tmp_path / "two.parquet")
    run = tmp_path / "run"
    writer = from_parquet(str(tmp_path / "two.parquet"), "image", RunDir.at(run))
    assert writer.rows == 2
    assert read_images_table(run).column("image_id").to_pylist() == ["two/0", "two/1"]
    summary = run_embed(_cfg(), run_dir=str(run), show_progress=False)
    assert summary.result("pixels").images == 1 and summary.decode_errors == 1
    assert _errors(run, "embed")["path"].tolist() == [f"{tmp_path}/two.parquet#row=1"]


# --- the images table in parts ---------------------------------------------------------------

def test_streamed_table_in_parts_reads_back_in_order(tmp_path, bundled_dir):
    make_shards(tmp_path / "wds", bundled_dir)
    pattern = str(tmp_path / "wds" / "shard-{00000..00001}.tar")
    whole, parts = RunDir.at(tmp_path / "one"), RunDir.at(tmp_path / "parts")
    from_webdataset(pattern, whole)
    from_webdataset(pattern, parts, part_rows=3)
    assert whole.images_table.is_file()
    assert [p.name for p in parts.images_table.list()] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    a, b = read_images_table(whole.root), read_images_table(parts.root)
    assert a.equals(b) and images_table_hash(a) == images_table_hash(b)
    assert not list((tmp_path / "parts" / "_tmp").glob("images-*"))  # staging cleaned up
    write_images_table(a, parts)  # a single-file table replaces the folder
    assert parts.images_table.is_file() and read_images_table(parts.root).equals(a)


def test_old_tables_without_reference_columns_still_read(tmp_path, bundled_dir):
    d = folder_of(tmp_path / "imgs", {s: v for s, v in _good(bundled_dir).items() if s in PNGS})
    table = from_folder(d)
    old = table.drop_columns(["container", "member", "offset", "size"])
    pq.write_table(old, tmp_path / "images.parquet")
    back = read_images_table(tmp_path / "images.parquet")
    assert back.column("container").null_count == back.num_rows
    assert images_table_hash(back) == images_table_hash(old.append_column(
        "member", pa.nulls(old.num_rows, pa.string())))


# --- the CLI ---------------------------------------------------------------------------------

def test_cli_builds_tables_from_every_source(tmp_path, bundled_dir, capsys):
    from flagsim.cli import main

    make_shards(tmp_path / "wds", bundled_dir)
    _parquet(tmp_path / "imgs.parquet", _good(bundled_dir), struct=True)
    pattern = str(tmp_path / "wds" / "shard-{00000..00001}.tar")
    assert main(["images", "--from-webdataset", pattern, "--out", str(tmp_path / "a")]) == 0
    assert "8 images" in capsys.readouterr().out
    assert main(["images", "--from-parquet", str(tmp_path / "imgs.parquet"), "--image-column",
                 "image", "--id-column", "key", "--out", str(tmp_path / "b")]) == 0
    assert "7 images" in capsys.readouterr().out
    assert main(["images", "--from-parquet", str(tmp_path / "imgs.parquet"), "--out",
                 str(tmp_path / "c")]) != 0
    assert "--image-column" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "wds")
    assert main(["images", "--from-webdataset", pattern, "--out", str(tmp_path / "d")]) != 0
    err = capsys.readouterr().err
    assert "webdataset shard not found" in err and len(err.strip().splitlines()) == 1


# --- URL lists -------------------------------------------------------------------------------

def test_url_list_downloads_records_failures_and_resumes(tmp_path, bundled_dir, ray_local, capsys):
    from flagserver import Reply, flag_server

    from flagsim.cli import main

    ok = ["Chad", "Japan", "Peru"]
    with flag_server() as server:
        url = {s: f"{server.base}/files/{s}.png" for s in [*ok, "Nowhere", "Mali", "Italy"]}
        pd.DataFrame({"link": list(url.values()), "country": list(url)}).to_csv(
            tmp_path / "urls.csv", index=False)
        server.script("/files/Mali.png", *[Reply(delay=3.0)] * 2)  # slower than the timeout
        server.script("/files/Italy.png", Reply(body=b"\x89PNG\r\n\x1a\n" + bytes(300_000)))
        run = tmp_path / "run"
        cfg = _cfg("images.source=urls", f"images.path={tmp_path}/urls.csv", "images.url_column=link",
                   "images.name_column=country", "images.download.timeout=1",
                   "images.download.retries=0", "images.download.max_bytes=200000",
                   "images.download.allow_hosts=[127.0.0.1]")
        summary = run_embed(cfg, run_dir=str(run), show_progress=False)
        assert summary.result("pixels").images == 3
        reasons = dict(zip(*_errors(run, "images")[["image_id", "reason"]].T.values, strict=True))
        assert set(reasons) == {"Nowhere", "Mali", "Italy"}
        assert reasons["Nowhere"].startswith("http 404")
        assert reasons["Mali"].startswith("timeout") and reasons["Italy"].startswith("too large")
        assert all(h.headers.get("User-Agent", "").startswith("flagsim") for h in server.flag_hits())
        table = read_images_table(run)
        assert table.column("image_id").to_pylist() == ok
        assert table.column("source_url").to_pylist() == [url[s] for s in ok]

        server.clear()
        assert main(["images", "--from-urls", str(tmp_path / "urls.csv"), "--url-column", "link",
                     "--name-column", "country", "--allow-host", "127.0.0.1", "--timeout", "1",
                     "--retries", "0", "--max-bytes", "200000", "--out", str(run)]) == 0
        assert "already present 3" in capsys.readouterr().out
        assert not [h for h in server.flag_hits() if any(s in h.path for s in ok)]
    emb = read_embeddings(RunDir.at(run), "pixels")
    from flagsim.decode import decode_image
    from flagsim.models import create_embedder

    pixels = create_embedder("pixels")
    for i, image_id in enumerate(emb.ids):
        ref = pixels([decode_image((bundled_dir / "images" / f"{image_id}.png").read_bytes())])[0]
        np.testing.assert_allclose(emb.vectors[i], ref, rtol=0, atol=1e-6)


def _url_list(tmp_path, server, stems) -> Path:
    path = tmp_path / "urls.csv"
    pd.DataFrame({"url": [f"{server.base}/files/{s}.png" for s in stems], "name": stems}).to_csv(
        path, index=False)
    return path


def _wait_for(cond, what: str, proc, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {limit} s"
        time.sleep(0.05)


def test_sigterm_during_downloads_keeps_what_finished_without_waiting_for_the_rest(tmp_path):
    """SIGTERM (a scheduler, `kill`) while one download is in flight for a minute and another
    waits a minute to retry: exit 143 at once with the finished rows written (before, the
    process died with nothing written; Ctrl-C waited out the slow download and the back-off)."""
    import signal
    import subprocess
    import sys

    from flagserver import Reply, flag_server

    done = ["Chad", "Japan", "Peru"]
    run = tmp_path / "data"
    with flag_server() as server:
        server.script("/files/Mali.png", Reply(delay=60.0))
        server.script("/files/Italy.png", *[Reply(status=500, body=b"busy")] * 4)
        urls = _url_list(tmp_path, server, [*done, "Mali", "Italy"])
        proc = subprocess.Popen(
            [sys.executable, "-m", "flagsim", "images", "--from-urls", str(urls),
             "--allow-host", "127.0.0.1", "--timeout", "120", "--retries", "3", "--backoff", "60",
             "--max-wait", "60", "--concurrency", "5", "--out", str(run)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(lambda: all((run / "images" / f"{s}.png").exists() for s in done)
                      and server.hits_for("Mali.png") and server.hits_for("Italy.png"),
                      "the three quick downloads", proc)
            time.sleep(0.5)  # the quick ones' rows are recorded just after their files
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
            waited = time.monotonic() - t0
        finally:
            proc.kill()
        assert proc.returncode == 143, err
        assert err.strip().splitlines()[-1] == (
            "flagsim: terminated; rerun the same command to resume")
        assert waited < 30  # not the minute of the slow download nor the back-off
        assert read_images_table(run).column("image_id").to_pylist() == done
        assert len(server.hits_for("Italy.png")) == 1  # no retry after the signal

        server.clear()
        from flagsim.cli import main
        assert main(["images", "--from-urls", str(urls), "--allow-host", "127.0.0.1",
                     "--out", str(run)]) == 0
        fetched = {h.path.rsplit("/", 1)[-1] for h in server.flag_hits()}
    assert fetched == {"Mali.png", "Italy.png"}  # the rerun fetches only the rest
    assert read_images_table(run).column("image_id").to_pylist() == [*done, "Mali", "Italy"]


def test_a_killed_download_keeps_the_rows_of_its_last_checkpoint(tmp_path):
    """SIGKILL (or the OOM killer) cannot be caught: the images table written every
    CHECKPOINT_S is what a rerun starts from (before, it downloaded everything again)."""
    import signal
    import subprocess
    import sys

    from flagserver import Reply, flag_server

    done = ["Chad", "Japan", "Peru"]
    run = tmp_path / "data"
    with flag_server() as server:
        server.script("/files/Mali.png", Reply(delay=60.0))
        urls = _url_list(tmp_path, server, [*done, "Mali"])
        script = ("import sys; import flagsim.scrape as s; s.CHECKPOINT_S = 0.2; "
                  "from flagsim.cli import main; sys.exit(main(sys.argv[1:]))")
        proc = subprocess.Popen(
            [sys.executable, "-c", script, "images", "--from-urls", str(urls), "--allow-host",
             "127.0.0.1", "--timeout", "120", "--concurrency", "4", "--out", str(run)])
        try:
            table = run / "images.parquet"
            _wait_for(lambda: table.exists() and len(read_images_table(run)) == 3,
                      "a checkpoint with the three quick downloads", proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        server.clear()
        from flagsim.cli import main
        assert main(["images", "--from-urls", str(urls), "--allow-host", "127.0.0.1",
                     "--out", str(run)]) == 0
        fetched = {h.path.rsplit("/", 1)[-1] for h in server.flag_hits()}
    assert fetched == {"Mali.png"}
    assert read_images_table(run).column("image_id").to_pylist() == [*done, "Mali"]


def test_url_table_without_its_column_is_one_line(tmp_path):
    from flagsim.sources import read_url_table

    (tmp_path / "u.csv").write_text("href\nhttp://x/a.png\n")
    with pytest.raises(DataError, match=r"has no column 'url' \(columns: href\)"):
        read_url_table(str(tmp_path / "u.csv"))
    rows = read_url_table(str(tmp_path / "u.csv"), url_column="href")
    assert rows == [{"url": "http://x/a.png", "image_id": "a", "name": "a"}]


@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_url_rows_without_a_url_are_error_rows(tmp_path, fmt, with_ids, capsys):
    """A blank (CSV) or null (Parquet) URL is reported, not dropped silently; with
    --id-column the error row carries the row's id (it was null)."""
    from flagserver import flag_server

    from flagsim.cli import main

    with flag_server() as server:
        table = pd.DataFrame({"url": [f"{server.base}/files/Chad.png", None],
                              "name": ["Chad", "Peru"], "key": ["k 1", "k[2]"]})
        path = tmp_path / f"u.{fmt}"
        table.to_csv(path, index=False) if fmt == "csv" else table.to_parquet(path)
        run = tmp_path / "data"
        ids = ["--id-column", "key"] if with_ids else []
        assert main(["images", "--from-urls", str(path), "--allow-host", "127.0.0.1", *ids,
                     "--out", str(run)]) == 0
    assert read_images_table(run).column("name").to_pylist() == ["Chad"]
    errors = _errors(run, "images")
    assert errors[["name", "stage"]].values.tolist() == [["Peru", "download"]]
    ids_said = [None if pd.isna(v) else v for v in errors["image_id"]]
    assert ids_said == (["k2"] if with_ids else [None])  # as the images table spells ids
    if with_ids:
        assert read_images_table(run).column("image_id").to_pylist() == ["k_1"]
    assert errors["reason"][0] == f"row 2 of {path}: no URL in column 'url'"
    out = capsys.readouterr()
    assert "1 row(s) of" in out.err and "(first: row 2, no URL" in out.err
    assert "1 of 2 images" in out.out and "failed 1: see errors/images/" in out.out


def test_url_table_cells_are_read_as_text_whatever_their_type(tmp_path):
    """An id 0 stays "0" (it was taken as missing), binary cells are UTF-8 text (they were
    `b'...'` reprs), an unparseable URL is a rejected row (it was a traceback), a list column
    is one line."""
    from flagsim.sources import read_url_table

    table = pa.table({
        "url": pa.array([b"http://x/a.png", b"http://[::1:80/b.png", b"http://x/c.png"]),
        "id": [0, 1, 2],
        "name": pa.array([b"Zero", b"One", b"Two"], pa.binary()),
    })
    pq.write_table(table, tmp_path / "u.parquet")
    rejected: list[dict] = []
    rows = read_url_table(str(tmp_path / "u.parquet"), id_column="id", rejected=rejected)
    assert rows == [{"url": "http://x/a.png", "image_id": "0", "name": "Zero"},
                    {"url": "http://x/c.png", "image_id": "2", "name": "Two"}]
    assert [(r["row"], r["name"]) for r in rejected] == [(2, "One")]
    assert "is not a URL (Invalid IPv6 URL)" in rejected[0]["reason"]
    pq.write_table(pa.table({"url": ["http://x/a.png"], "id": [[1, 2]]}), tmp_path / "l.parquet")
    with pytest.raises(DataError, match=r"column 'id' holds lists, not text"):
        read_url_table(str(tmp_path / "l.parquet"), id_column="id")


def test_a_parquet_url_list_is_read_whatever_its_suffix_or_as_a_folder(tmp_path):
    """`URLS.PARQUET` and `urls.pq` were read as CSV ("line 1 is not UTF-8 text"), a folder of
    parts was "a directory"."""
    from flagsim.sources import read_url_table

    table = pa.table({"url": ["http://x/a.png", "http://x/b.png"], "name": ["A", "B"]})
    for name in ("URLS.PARQUET", "urls.pq", "urls.bin"):
        pq.write_table(table, tmp_path / name)
        assert [r["name"] for r in read_url_table(str(tmp_path / name))] == ["A", "B"], name
    (tmp_path / "parts").mkdir()
    pq.write_table(table.slice(0, 1), tmp_path / "parts" / "part-00000.parquet")
    pq.write_table(table.slice(1, 1), tmp_path / "parts" / "part-00001.parquet")
    assert [r["name"] for r in read_url_table(str(tmp_path / "parts"))] == ["A", "B"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_url_table_names_come_from_its_name_column_by_default(tmp_path, fmt):
    """As import-embeddings reads `name`; --name-column still picks another one."""
    from flagsim.sources import read_url_table

    table = pd.DataFrame({"url": ["http://x/chad_flag.png"], "name": ["Chad"], "label": ["TD"]})
    path = tmp_path / f"u.{fmt}"
    table.to_csv(path, index=False) if fmt == "csv" else table.to_parquet(path)
    assert read_url_table(str(path)) == [{"url": "http://x/chad_flag.png", "image_id": "Chad",
                                          "name": "Chad"}]
    assert read_url_table(str(path), name_column="label")[0]["name"] == "TD"


# --- object stores ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_server():
    from s3server import patched_environ, running_s3

    with running_s3() as s3, patched_environ(s3.env):
        yield s3


def test_s3_folder_and_webdataset_shards(tmp_path, bundled_dir, s3_server):
    """An s3:// folder and tar shards on the store: the table points at the objects, and the
    decode stage reads each member with ranged reads (one open per shard), decoding exactly
    what the local files decode to. (Ray's workers of the shared test Ray do not see the
    store's endpoint, so the stage runs in this process.)"""
    from flagsim.decode import decode_image
    from flagsim.storage import Location

    bucket = s3_server.new_bucket()
    good = make_shards(tmp_path / "wds", bundled_dir)
    for f in (tmp_path / "wds").iterdir():
        Location.parse(f"s3://{bucket}/wds/{f.name}").write_bytes(f.read_bytes())
    for stem, (ext, data) in good.items():
        Location.parse(f"s3://{bucket}/imgs/sub/{stem}.{ext}").write_bytes(data)
    folder = from_folder(f"s3://{bucket}/imgs")
    assert sorted(folder.column("image_id").to_pylist()) == sorted(f"sub/{s}" for s in good)
    assert all(p.startswith(f"s3://{bucket}/imgs/sub/") for p in folder.column("path").to_pylist())

    run = RunDir.at(f"s3://{bucket}/run")
    writer = from_webdataset(f"s3://{bucket}/wds/shard-{{00000..00001}}.tar", run)
    assert [e["image_id"] for e in writer.errors] == ["textonly"]
    table = read_images_table(run.root)
    assert table.column("path").to_pylist()[0] == f"s3://{bucket}/wds/shard-00000.tar"
    for t in (table, folder):
        (block,) = shard_tables(t, plan_shards(t.num_rows, 100))
        reader = process_reader()
        reader.close()
        before = reader.opened
        out = decode_batch({c: block.column(c).to_numpy(zero_copy_only=False)
                            for c in block.column_names}, max_pixels=10**8)
        if t is table:
            assert reader.opened - before == 2
        got = {str(i).rsplit("/", 1)[-1]: px for i, px, ok in
               zip(out["image_id"], out["pixels"], out["ok"], strict=True) if ok}
        assert sorted(got) == sorted(good)
        for stem, (_, data) in good.items():
            np.testing.assert_array_equal(got[stem], decode_image(data))


# --- JPEG decoding with torchvision (the GPU path, on the CPU here) --------------------------

def test_torchvision_jpeg_decoder_matches_pil_and_falls_back(bundled_dir):
    from flagsim.decode import DecodeError, decode_batch_torchvision, decode_image

    good = _good(bundled_dir)
    cmyk = io.BytesIO()
    Image.open(bundled_dir / "images" / "Chad.png").convert("CMYK").save(cmyk, "JPEG")
    jpeg = good["Romania"][1]
    datas = [jpeg, good["Chad"][1], good["Mali"][1], cmyk.getvalue(),
             b"\xff\xd8\xff\xe0 not a jpeg", jpeg[: len(jpeg) // 2], good["Italy"][1]]
    out = decode_batch_torchvision(datas, device="cpu", max_pixels=10**8)
    for data, got in zip(datas, out, strict=True):
        try:
            ref = decode_image(data)
        except DecodeError as exc:
            assert isinstance(got, DecodeError) and type(got) is type(exc)
            continue
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, ref)
    assert [isinstance(o, DecodeError) for o in out] == [False] * 4 + [True, True, False]


def test_torchvision_decoder_in_the_pipeline_embeds_like_pil(tmp_path, bundled_dir, folder_run):
    good = make_shards(tmp_path / "wds", bundled_dir)
    run = tmp_path / "run"
    cfg = _cfg("images.source=webdataset", f"images.path={tmp_path}/wds",
               "embed.jpeg_decoder=torchvision")
    summary = run_embed(cfg, run_dir=str(run), show_progress=False)
    assert summary.result("pixels").images == len(good) and summary.decode_errors == 1
    assert _errors(run, "embed")["path"].iloc[0].endswith("#broken.jpg")
    assert_same_embeddings(run, folder_run, list(good))


def test_gpu_decoding_needs_a_gpu_share_beside_the_actors():
    from flagsim.pipeline.plan import ResourcePlan
    from flagsim.pipeline.runner import decode_options

    res = ResourcePlan("cuda", {"pixels": "float16"}, {"pixels": 1.0}, {"pixels": 1.0},
                       {"pixels": 1}, {"pixels": 8})
    todo = {"pixels": {0}}
    assert decode_options(_cfg(), res, {"GPU": 1}, todo) == {}
    cfg = _cfg("embed.jpeg_decoder=torchvision")
    with pytest.raises(DataError, match="num_gpus to 0.9"):
        decode_options(cfg, res, {"GPU": 1}, todo)
    share = ResourcePlan("cuda", {"pixels": "float16"}, {"pixels": 1.0}, {"pixels": 0.9},
                         {"pixels": 1}, {"pixels": 8})
    assert decode_options(cfg, share, {"GPU": 1}, todo) == {
        "jpeg_decoder": "torchvision", "decode_device": "cuda", "decode_gpus": 0.1}
    cpu = ResourcePlan("cpu", {"pixels": "float32"}, {"pixels": 1.0}, {"pixels": 0.0},
                       {"pixels": 1}, {"pixels": 8})
    assert decode_options(cfg, cpu, {}, todo)["decode_device"] == "cpu"


# --- the images table as a handle (what an embed's driver holds) -----------------------------

def test_streamed_scan_gives_the_in_memory_hashes_and_rows(tmp_path, bundled_dir):
    from flagsim.imagestable import ImagesTable, read_positions, read_rows
    from flagsim.pipeline.plan import rows_hashes

    make_shards(tmp_path / "wds", bundled_dir)
    parts = RunDir.at(tmp_path / "parts")
    from_webdataset(str(tmp_path / "wds"), parts, part_rows=3)
    whole = read_images_table(parts.root)
    handle = ImagesTable(parts.root)
    assert handle.num_rows == whole.num_rows == 8 and len(handle.parts) == 3
    for size in (1, 3, 5, 100):
        scan = handle.scan(size)
        assert scan.images_hash == images_table_hash(whole)
        assert scan.shard_hashes == rows_hashes(whole, plan_shards(whole.num_rows, size))
    for start, stop in ((0, 8), (2, 7), (3, 6), (5, 6)):
        assert read_rows(handle.parts, start, stop).equals(whole.slice(start, stop - start))
    pos = np.array([7, 0, 3, 4, 2])
    assert read_positions(handle.parts, pos).equals(whole.take(pa.array(pos)))
    # an old single-file table (no reference columns) scans to its old hash
    old = tmp_path / "old.parquet"
    folder = from_folder(folder_of(tmp_path / "f", {"Chad": ("png", _good(bundled_dir)["Chad"][1])}))
    pq.write_table(folder.drop_columns(["container", "member", "offset", "size"]), old)
    assert ImagesTable(old).scan(10).images_hash == images_table_hash(folder)
    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.concat_tables([whole.slice(0, 2), whole.slice(0, 1)]), dup)
    with pytest.raises(DataError, match="duplicate image_id"):
        ImagesTable(dup).scan(10)


def test_report_thumbnails_read_tar_members(tmp_path, bundled_dir):
    from flagsim.report.sheet import Thumbnails

    make_shards(tmp_path / "wds", bundled_dir)
    run = RunDir.at(tmp_path / "run")
    from_webdataset(str(tmp_path / "wds"), run)
    thumbs = Thumbnails.for_run(run, width=64)
    assert thumbs.image("Chad").width == 64 and thumbs.decoded == 1
    thumbs.image("broken")
    assert thumbs._placeholder_of["broken"] == "cannot decode image"


def test_embed_command_builds_from_the_configured_source(tmp_path, bundled_dir, ray_local, capsys):
    """`flagsim embed` (the same stages as `jobs/embed.py`) with images.source=parquet set."""
    from flagsim.cli import main

    good = _good(bundled_dir)
    _parquet(tmp_path / "imgs.parquet", good, struct=False)
    rc = main(["embed", "--set", "images.source=parquet", "--set", f"images.path={tmp_path}/imgs.parquet",
               "--set", "images.image_column=image", "--set", "images.id_column=key",
               "--set", "ray.read_cpus=1", "--models", "pixels", "--run", str(tmp_path / "run"),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(read_embeddings(RunDir.at(tmp_path / "run"), "pixels").ids) == sorted(good)
