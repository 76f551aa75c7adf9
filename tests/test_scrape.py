"""`flagsim scrape` against a real HTTP server on 127.0.0.1 serving a page fixture (no internet)."""

from __future__ import annotations

import csv
import email.utils
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from bs4 import BeautifulSoup
from flagserver import FILE_MAP, FIXTURE, Reply, bundled_png, flag_server
from imagegen import DECODABLE, bad_corpus
from PIL import Image

from flagsim.cli import main
from flagsim.decode import decode_image
from flagsim.images import read_images_table
from flagsim.scrape import (
    DE_FACTO,
    ERRORS_CSV_COLUMNS,
    SOVEREIGN,
    Fetcher,
    FetchError,
    HostPolicy,
    MalformedTable,
    ScrapeOptions,
    check_image,
    clean_image_url,
    errors_csv_text,
    parse_flag_tables,
    parse_retry_after,
    plan_images,
    read_errors_csv,
    retry_delay,
    scrape,
    select_entries,
    table_grid,
    thumbnail_url,
)

UA = "flagsim-tests/1.0 (flagsim test suite; nobody@example.invalid)"
PAGE = "https://en.wikipedia.org/wiki/List_of_national_flags_of_sovereign_states"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SOVEREIGN_NAMES = [
    "Afghanistan", "Albania", "The Bahamas", "Chad", "Denmark", "Guinea", "Ireland", "Italy",
    "Ivory Coast", "Japan", "Mali", "Nauru", "Nepal", "New Zealand", "Peru", "Romania",
    "São Tomé and Príncipe", "Test/Slash Republic", "../Dot..Land", "Vatican City",
]  # fmt: skip
DE_FACTO_NAMES = ["Kosovo", "Northern Cyprus", "Taiwan"]
#: What the first (scripted) run must download, in page order: image_id -> Commons file.
FIRST_RUN_OK = {
    "Afghanistan": "Flag_of_Afghanistan_(2013–2021).svg",
    "Albania": "Flag_of_Albania.svg",
    "Chad": "Flag_of_Chad.svg",
    "Denmark": "Flag_of_Denmark.svg",
    "Guinea": "Flag_of_Guinea.svg",
    "Ivory_Coast": "Flag_of_Côte_d'Ivoire.svg",
    "Peru": "Flag_of_Peru.svg",
    "Romania": "Flag_of_Romania.svg",
    "São_Tomé_and_Príncipe": "Flag_of_Sao_Tome_and_Principe.svg",
    "TestSlash_Republic": "Flag_of_Test_Slash_Republic.svg",
    "Dot.Land": "Flag_of_Dot_Land.svg",
    "Vatican_City": "Flag_of_the_Vatican_City.svg",
}
#: What the first run must fail on: name -> (reason, HTTP status or "", attempts).
FIRST_RUN_ERRORS = {
    "The Bahamas": ("http 404", "404", "1"),
    "Ireland": ("timeout", "", "3"),
    "Italy": ("not an image", "200", "1"),
    "Japan": ("bad image", "200", "1"),
    "Mali": ("too large", "200", "1"),
    "Nauru": ("too large", "200", "1"),
    "Nepal": ("redirect refused", "302", "1"),
    "New Zealand": ("host refused", "302", "1"),
}
FAILED_FILES = {
    "Flag_of_the_Bahamas.svg", "Flag_of_Ireland.svg", "Flag_of_Italy.svg", "Flag_of_Japan.svg",
    "Flag_of_Mali.svg", "Flag_of_Nauru.svg", "Flag_of_Nepal.svg", "Flag_of_New_Zealand.svg",
}  # fmt: skip


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scrape_args(server, out: Path, *extra: str) -> list[str]:
    """Fast, bounded settings: small backoff, 2 s timeout, 127.0.0.1 allowed explicitly."""
    return [
        "scrape", "--out", str(out), "--url", server.page_url, "--allow-host", "127.0.0.1",
        "--retries", "2", "--backoff", "0.05", "--max-wait", "2", "--timeout", "2",
        "--concurrency", "8", "--user-agent", UA, "--width", "300", "--max-bytes", "64K", *extra,
    ]  # fmt: skip


def file_of(hit_path: str) -> str:
    """Commons file name of a thumbnail request path (`.../<file>/<N>px-<file>.png`)."""
    parts = hit_path.split("/")
    return parts[-2] if "/thumb/" in hit_path else hit_path


def snapshot(images: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in images.iterdir()}


# --------------------------------------------------------------------------------------------
# Parsing the page (no network)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def entries():
    return parse_flag_tables(FIXTURE.read_text(encoding="utf-8"), PAGE)


def test_parse_lists_every_state_table_in_page_order_with_footnotes_stripped(entries):
    main_flags = [e for e in entries if e.flag_number == 1]
    assert [e.state for e in main_flags if e.table == SOVEREIGN] == SOVEREIGN_NAMES
    assert [e.state for e in main_flags if e.table == DE_FACTO] == DE_FACTO_NAMES
    assert not any("[" in e.state or "]" in e.state for e in entries)
    # the NFD spelling in the fixture comes out NFC
    sao = next(e.state for e in entries if e.state.startswith("S"))
    assert sao == unicodedata.normalize("NFC", sao) and "\u0303" not in sao
    # the table without Flag/State columns is ignored
    assert not any("Not_a_flag" in e.image_url for e in entries)


def test_rowspan_state_first_flag_is_main_and_further_flags_are_numbered(entries):
    afg = [e for e in entries if e.state == "Afghanistan"]
    assert [(e.flag_number, e.name) for e in afg] == [(1, "Afghanistan"), (2, "Afghanistan (2)")]
    assert "Flag_of_Afghanistan" in afg[0].image_url and "Taliban" in afg[1].image_url
    default = select_entries(entries)
    assert [e.name for e in default] == SOVEREIGN_NAMES
    everything = select_entries(entries, de_facto=True, extra_flags=True)
    assert len(everything) == len(entries) == 24
    ids = [p.image_id for p in plan_images(everything, 512)]
    assert ids[:2] == ["Afghanistan", "Afghanistan_(2)"]
    assert ids[-3:] == ["Kosovo", "Northern_Cyprus", "Taiwan"]


def test_file_names_are_safe_unique_and_keep_the_seed_rule(entries):
    ids = [p.image_id for p in plan_images(select_entries(entries, de_facto=True), 512)]
    assert len(set(ids)) == len(ids)
    assert not any("/" in i or "\\" in i or ".." in i or i.startswith(".") for i in ids)
    for expected in ("New_Zealand", "São_Tomé_and_Príncipe", "Vatican_City", "Denmark",
                     "TestSlash_Republic", "Dot.Land"):  # fmt: skip
        assert expected in ids
    assert all(i == unicodedata.normalize("NFC", i) for i in ids)


def test_table_grid_repeats_rowspan_and_colspan_cells():
    html = """<table><tr><th>A</th><th>B</th><th>C</th></tr>
    <tr><td>1</td><th rowspan="3">S</th><td colspan="1">x</td></tr>
    <tr><td>2</td><td>y</td></tr>
    <tr><td colspan="1">3</td><td>z</td></tr></table>"""
    grid = table_grid(BeautifulSoup(html, "html.parser").table)
    texts = [[c.get_text() if c is not None else None for c in row] for row in grid]
    assert texts == [["A", "B", "C"], ["1", "S", "x"], ["2", "S", "y"], ["3", "S", "z"]]
    assert grid[1][1] is grid[3][1]  # the same cell object: one state


def test_image_urls_are_absolute_without_tracking_parameters():
    src = (
        "//upload.wikimedia.org/a/thumb/x/xy/F.svg/250px-F.svg.png?utm_source=en&utm_medium=r&v=2#f"
    )
    assert (
        clean_image_url(src, PAGE)
        == "https://upload.wikimedia.org/a/thumb/x/xy/F.svg/250px-F.svg.png?v=2"
    )
    assert clean_image_url("/w/x.png?wprov=sfla1", "http://h:8/wiki/P") == "http://h:8/w/x.png"
    assert clean_image_url("data:image/gif;base64,R0lGOD", PAGE) is None
    assert clean_image_url("javascript:alert(1)", PAGE) is None


def test_lazy_images_base_href_and_nameless_rows(caplog):
    """A lazy-loading image (`src` a data: placeholder, the URL in `data-src`) was a "bad url";
    `<base href>` was ignored; a flag with no state name beside it vanished without a word."""
    html = """<html><head><base href="https://cdn.example/root/"></head><body>
    <table class="wikitable"><tr><th>Flag</th><th>State</th></tr>
    <tr><td><img src="data:image/gif;base64,R0lGOD" data-src="//up.example/lazy.png"></td>
        <td><a>Lazyland</a></td></tr>
    <tr><td><img src="rel/flag.png"></td><td><a>Relative</a></td></tr>
    <tr><td><img src="//up.example/x.png"></td><td> </td></tr>
    </table></body></html>"""
    with caplog.at_level("WARNING", logger="flagsim.scrape"):
        entries = parse_flag_tables(html, "https://en.example/wiki/List")
    assert [(e.name, e.image_url) for e in entries] == [
        ("Lazyland", "https://up.example/lazy.png"),
        ("Relative", "https://cdn.example/root/rel/flag.png")]
    assert "1 flag(s) in the page's tables have no state name beside them" in caplog.text


def test_an_unparseable_image_url_is_an_error_row_not_the_end_of_the_scrape(tmp_path, capsys):
    # urljoin / urlsplit raise ValueError ("Invalid IPv6 URL"): a traceback, nothing downloaded
    assert clean_image_url("http://[::1:80/x.png", PAGE) is None
    with pytest.raises(FetchError) as info:
        HostPolicy().check("http://[::1:80/x.png")
    assert info.value.reason == "bad url"
    html = FIXTURE.read_text(encoding="utf-8")
    chad = re.search(r'src="(//upload[^"]*Flag_of_Chad[^"]*)"', html).group(1)
    data = tmp_path / "data"
    with flag_server(html.replace(chad, "http://[::1:80/x.png")) as server:
        assert main(scrape_args(server, data)) == 0
    names = read_images_table(data).column("name").to_pylist()
    assert "Chad" not in names and len(names) == len(SOVEREIGN_NAMES) - 1
    (chad_row,) = read_errors_csv(data / "errors.csv")
    assert (chad_row["name"], chad_row["reason"]) == ("Chad", "bad url")


def test_thumbnail_url_rewrites_the_width_and_snaps_to_wikimedia_steps():
    local = "http://127.0.0.1:9/wikipedia/commons/thumb/c/cd/F_(1).svg/250px-F_(1).svg.png"
    assert thumbnail_url(local, 512).endswith("/512px-F_(1).svg.png")
    wm = "https://upload.wikimedia.org/wikipedia/commons/thumb/c/cd/F.svg/250px-F.svg.png"
    assert thumbnail_url(wm, 512).endswith("/500px-F.svg.png")
    assert thumbnail_url(wm, 1000).endswith("/960px-F.svg.png")
    assert thumbnail_url(wm, 512, exact=True).endswith("/512px-F.svg.png")
    original = "https://upload.wikimedia.org/wikipedia/commons/c/cd/F.png"
    assert thumbnail_url(original, 512) == original


def test_host_policy_refuses_non_http_and_non_public_hosts_unless_allowed():
    policy = HostPolicy()
    for url in ("http://127.0.0.1/x", "http://10.1.2.3/x", "http://169.254.169.254/latest",
                "http://[::1]/x", "http://[::ffff:127.0.0.1]/x", "http://0.0.0.0/x"):  # fmt: skip
        with pytest.raises(FetchError) as info:
            policy.check(url)
        assert info.value.reason == "host refused", url
    with pytest.raises(FetchError) as info:
        policy.check("file:///etc/passwd")
    assert info.value.reason == "scheme refused"
    policy.check("http://93.184.215.14/x")  # a public literal address needs no lookup
    HostPolicy(allow_hosts=["127.0.0.1"]).check("http://127.0.0.1:8080/x")
    with pytest.raises(FetchError):
        HostPolicy(allow_hosts=["127.0.0.1"]).check("http://10.1.2.3/x")
    HostPolicy(allow_private=True).check("http://10.1.2.3/x")


def test_retry_after_is_parsed_and_waits_are_capped():
    now = 1_000_000.0
    assert parse_retry_after("1") == 1.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert retry_delay(0, 3600.0, backoff=1.0, cap=60.0) == 60.0
    assert retry_delay(0, 2.0, backoff=1.0, cap=60.0) == 2.0
    assert 0.1 <= retry_delay(0, None, backoff=0.1, cap=60.0) <= 0.125
    assert 0.4 <= retry_delay(2, None, backoff=0.1, cap=60.0) <= 0.5
    assert retry_delay(10, None, backoff=1.0, cap=5.0) == 5.0


@pytest.mark.parametrize("case", sorted(DECODABLE))
def test_a_downloaded_image_decodes_as_the_original_would(case, bundled_dir):
    """The PNG a download stores decodes to the same pixels as the file it came from: EXIF
    orientation applied (the PNG copy has none), CMYK kept (it was refused: "cannot write
    mode CMYK as PNG")."""
    original = bad_corpus(bundled_dir / "images" / "Chad.png")[case]
    stored = check_image(original)
    assert stored.startswith(b"\x89PNG")
    np.testing.assert_array_equal(decode_image(stored), decode_image(original))


def test_a_jpeg_whose_exif_cannot_be_applied_is_kept_as_stored(bundled_dir, monkeypatch):
    # damaged EXIF makes Pillow's exif_transpose raise (struct.error); the image was then lost
    import struct

    from PIL import ImageOps

    def damaged(im, **kwargs):
        raise struct.error("required argument is not an integer")

    original = bad_corpus(bundled_dir / "images" / "Chad.png")["exif_rotated.jpg"]
    monkeypatch.setattr(ImageOps, "exif_transpose", damaged)
    stored = check_image(original)
    assert Image.open(io.BytesIO(stored)).size == Image.open(io.BytesIO(original)).size


def test_check_image_accepts_complete_images_only():
    png = bundled_png("Chad").read_bytes()
    assert check_image(png) == png
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(buf, format="JPEG")
    as_png = check_image(buf.getvalue())
    with Image.open(io.BytesIO(as_png)) as im:
        assert (im.format, im.size) == ("PNG", (30, 20))
    with pytest.raises(FetchError) as info:
        check_image(b"<!DOCTYPE html><html></html>", "text/html")
    assert info.value.reason == "not an image" and "text/html" in info.value.detail
    with pytest.raises(FetchError) as info:
        check_image(png[: len(png) // 2])
    assert info.value.reason == "bad image"


def test_network_failures_are_said_in_words_not_reprs():
    """errors.csv carried `('Connection broken: IncompleteRead(50 bytes read, 250 more
    expected)', IncompleteRead(...))`, `HTTPConnectionPool(host=..., port=1): Max retries
    exceeded ... NewConnectionError(...)` and `read timeout=2.999967869996908`."""
    opts = ScrapeOptions(allow_hosts=("127.0.0.1",), retries=0, timeout=1)
    fetcher = Fetcher(opts)
    with flag_server() as server:
        server.script("/files/Chad.png", Reply(body=b"x" * 50, content_length=False,
                                                 headers={"Content-Length": "300"}))
        server.script("/files/Peru.png", Reply(delay=3.0))
        got = {}
        for key, url in (("cut", f"{server.base}/files/Chad.png"),
                         ("slow", f"{server.base}/files/Peru.png"),
                         ("refused", "http://127.0.0.1:1/x.png")):
            with pytest.raises(FetchError) as info:
                fetcher.get(url, 1_000_000)
            got[key] = (info.value.reason, info.value.detail)
    fetcher.close()
    assert got["cut"][0] == "connection error"
    assert re.fullmatch(r"connection closed mid-body \(50 bytes read, \d+ more expected\)",
                        got["cut"][1]), got["cut"]
    assert got["slow"] == ("timeout", "no answer within 1 s")
    assert got["refused"] == ("connection error", "Connection refused")


def test_options_are_validated():
    from flagsim.errors import ConfigError

    inf, nan = float("inf"), float("nan")
    for bad in ({"width": 0}, {"concurrency": 0}, {"timeout": 0}, {"url": "ftp://x/y"},
                {"user_agent": " "}, {"max_bytes": 0}, {"deadline": 0},
                # inf / 1e12 overflowed time_t in a traceback; NaN failed every retry later
                {"timeout": inf}, {"timeout": 1e12}, {"deadline": nan}, {"backoff": nan},
                {"backoff": inf}, {"max_wait": nan}, {"url": "http://[::1:80/page"}):  # fmt: skip
        with pytest.raises(ConfigError):
            ScrapeOptions(**bad)
    assert ScrapeOptions(timeout=7).attempt_deadline == 7
    assert ScrapeOptions(timeout=7, deadline=60).attempt_deadline == 60


# --------------------------------------------------------------------------------------------
# End to end against the local server
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One scripted scrape: 12 flags succeed (2 after a retry), 8 fail in 8 different ways."""
    out = tmp_path_factory.mktemp("scrape") / "data"
    with flag_server() as server:
        text = {"content_type": "text/plain"}
        server.script("Flag_of_the_Bahamas.svg", Reply(status=404, body=b"Not Found", **text))
        server.script("Flag_of_Chad.svg", Reply(status=500, body=b"oops", **text))
        server.script(
            "Flag_of_Guinea.svg",
            Reply(status=429, headers={"Retry-After": "1"}, body=b"slow down", **text),
        )
        server.script("Flag_of_Ireland.svg", *[Reply(delay=4.0)] * 3)
        server.script(
            "Flag_of_Italy.svg",
            Reply(body=b"<!DOCTYPE html><html><body>Error</body></html>", content_type="text/html"),
        )
        server.script(
            "Flag_of_Japan.svg", Reply(truncate=len(bundled_png("Japan").read_bytes()) // 2)
        )
        server.script("Flag_of_Mali.svg", Reply(body=PNG_MAGIC + os.urandom(100_000)))
        server.script(
            "Flag_of_Nauru.svg", Reply(body=PNG_MAGIC + bytes(100_000), content_length=False)
        )
        server.script(
            "Flag_of_Nepal.svg",
            Reply(status=302, headers={"Location": "ftp://127.0.0.1/Nepal.png"}),
        )
        server.script(
            "Flag_of_New_Zealand.svg",
            Reply(status=302, headers={"Location": "http://10.255.255.1/New_Zealand.png"}),
        )
        server.script(
            "Flag_of_Peru.svg", Reply(status=302, headers={"Location": "/files/Peru.png"})
        )
        rc = main(scrape_args(server, out))
        yield SimpleNamespace(server=server, out=out, rc=rc, hits=server.hits)


def test_scrape_writes_a_png_and_a_table_row_for_each_downloaded_flag(first_run):
    out = first_run.out
    assert first_run.rc == 0
    table = read_images_table(out)
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == list(FIRST_RUN_OK)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{i}.png" for i in FIRST_RUN_OK
    )
    for r in rows:
        f = out / "images" / f"{r['image_id']}.png"
        data = f.read_bytes()
        served = bundled_png(FILE_MAP[FIRST_RUN_OK[r["image_id"]]]).read_bytes()
        assert data == served, r["image_id"]
        assert r["path"] == str(f) and r["sha256"] == sha256(data)
        with Image.open(f) as im:
            assert (r["width"], r["height"], r["format"]) == (im.width, im.height, "PNG")
        assert r["source_url"].startswith(first_run.server.base + "/wikipedia/commons/thumb/")
        assert "/300px-" in r["source_url"] and "utm_" not in r["source_url"]
    names = {r["image_id"]: r["name"] for r in rows}
    assert names["Denmark"] == "Denmark"
    assert names["São_Tomé_and_Príncipe"] == unicodedata.normalize("NFC", "São Tomé and Príncipe")
    assert names["TestSlash_Republic"] == "Test/Slash Republic"
    assert names["Dot.Land"] == "../Dot..Land"


def test_scrape_records_every_failure_with_its_reason(first_run):
    errors = read_errors_csv(first_run.out / "errors.csv")
    assert errors and list(errors[0]) == list(ERRORS_CSV_COLUMNS)
    got = {e["name"]: (e["reason"], e["status"], e["attempts"]) for e in errors}
    assert got == FIRST_RUN_ERRORS
    detail = {e["name"]: e["detail"] for e in errors}
    assert "Content-Length" in detail["Mali"] and "exceeds" in detail["Nauru"]
    assert "ftp://" in detail["Nepal"] and "10.255.255.1" in detail["New Zealand"]
    assert all(e["table"] == SOVEREIGN and e["url"] for e in errors)


def test_retries_5xx_and_429_honouring_retry_after_but_not_other_errors(first_run):
    hits = [h for h in first_run.hits if "/thumb/" in h.path]
    count = {f: sum(1 for h in hits if file_of(h.path) == f) for f in FILE_MAP}
    assert count["Flag_of_Chad.svg"] == 2  # 500, then 200
    assert count["Flag_of_Guinea.svg"] == 2  # 429, then 200
    assert count["Flag_of_Ireland.svg"] == 3  # timed out on every attempt (--retries 2)
    for once in ("Flag_of_the_Bahamas.svg", "Flag_of_Italy.svg", "Flag_of_Japan.svg",
                 "Flag_of_Mali.svg", "Flag_of_Nepal.svg", "Flag_of_New_Zealand.svg"):  # fmt: skip
        assert count[once] == 1, once
    guinea = [h.t for h in hits if file_of(h.path) == "Flag_of_Guinea.svg"]
    assert guinea[1] - guinea[0] >= 0.9  # waited for Retry-After: 1
    assert [h.path for h in first_run.hits if h.path.startswith("/files/")] == ["/files/Peru.png"]


def test_sends_the_user_agent_and_the_requested_width_without_tracking_query(first_run):
    assert {h.headers.get("User-Agent") for h in first_run.hits} == {UA}
    thumbs = [h for h in first_run.hits if "/thumb/" in h.path]
    assert thumbs and all("/300px-" in h.path for h in thumbs)
    assert all(h.query == "" for h in thumbs)
    # the de facto table and Afghanistan's second flag were not requested by default
    requested = {file_of(h.path) for h in thumbs}
    assert "Flag_of_Kosovo.svg" not in requested and "Flag_of_the_Taliban.svg" not in requested


def test_rerun_fetches_only_what_is_missing_and_keeps_what_was_downloaded(first_run, tmp_path):
    server, data = first_run.server, tmp_path / "data"
    shutil.copytree(first_run.out, data)
    before = snapshot(data / "images")
    server.clear()  # the failing flags are served normally now

    assert main(scrape_args(server, data)) == 0
    fetched = [file_of(h.path) for h in server.flag_hits()]
    assert sorted(fetched) == sorted(FAILED_FILES)  # each failed flag once, nothing else
    after = snapshot(data / "images")
    for name, (content, mtime) in before.items():
        assert after[name] == (content, mtime), name  # neither rewritten nor touched
    table = read_images_table(data)
    assert [r["name"] for r in table.to_pylist()] == SOVEREIGN_NAMES
    assert all(r["path"].startswith(str(data)) for r in table.to_pylist())
    assert read_errors_csv(data / "errors.csv") == []

    # a deleted and a corrupted file are fetched again; nothing else is
    server.clear()
    (data / "images" / "Chad.png").unlink()
    (data / "images" / "Romania.png").write_bytes(b"not a png any more")
    assert main(scrape_args(server, data)) == 0
    assert sorted(file_of(h.path) for h in server.flag_hits()) == [
        "Flag_of_Chad.svg", "Flag_of_Romania.svg",
    ]  # fmt: skip
    assert (data / "images" / "Romania.png").read_bytes() == bundled_png("Romania").read_bytes()

    # a third run is a no-op for the flags
    server.clear()
    table_before = read_images_table(data)
    assert main(scrape_args(server, data)) == 0
    assert server.flag_hits() == []
    assert read_images_table(data).equals(table_before)


def test_failed_refresh_keeps_the_previous_image_and_strict_exits_1(tmp_path):
    data = tmp_path / "data"
    with flag_server() as server:
        assert main(scrape_args(server, data)) == 0
        before = snapshot(data / "images")
        old_rows = {r["image_id"]: r for r in read_images_table(data).to_pylist()}
        server.clear()
        server.script(
            "Flag_of_Chad.svg", Reply(status=404, body=b"gone", content_type="text/plain")
        )
        # a new width changes every source_url, so every flag is fetched again
        assert main([*scrape_args(server, data), "--width", "330", "--strict"]) == 1
        thumbs = [h for h in server.hits if "/thumb/" in h.path]
    assert len(thumbs) == len(SOVEREIGN_NAMES) and all("/330px-" in h.path for h in thumbs)
    assert snapshot(data / "images") == before  # same bytes: no file rewritten, none lost
    rows = {r["image_id"]: r for r in read_images_table(data).to_pylist()}
    assert rows["Chad"] == old_rows["Chad"]  # kept, still naming the URL it came from
    assert "/330px-" in rows["Albania"]["source_url"]
    (chad,) = read_errors_csv(data / "errors.csv")
    assert (chad["name"], chad["reason"]) == ("Chad", "http 404")
    assert "kept the previously downloaded image" in chad["detail"]


def test_interrupt_writes_the_rows_finished_so_far_and_exits_130(tmp_path, monkeypatch):
    import flagsim.scrape as scrape_mod

    calls = []
    real_check = scrape_mod.check_image

    def check_then_interrupt(body: bytes, *args):
        calls.append(1)
        if len(calls) == 4:  # Ctrl-C, delivered as it is: to the main thread
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
            raise OSError("this download was cut off by the test")
        return real_check(body, *args)

    monkeypatch.setattr(scrape_mod, "check_image", check_then_interrupt)
    data = tmp_path / "data"
    with flag_server() as server:
        assert main([*scrape_args(server, data), "--concurrency", "1"]) == 130
    rows = read_images_table(data).to_pylist()
    names = [r["name"] for r in rows]
    # the three flags before the interrupted one are kept; the interrupted one and the
    # cancelled rest are not (a worker may have started one more before the cancel)
    assert names[:3] == SOVEREIGN_NAMES[:3] and "Chad" not in names
    assert len(names) < len(SOVEREIGN_NAMES) - 5
    assert sorted(p.name for p in (data / "images").iterdir()) == sorted(
        f"{r['image_id']}.png" for r in rows
    )


def test_python_m_flagsim_scrape_with_defaults_de_facto_and_extra_flags(tmp_path):
    out = tmp_path / "data"
    with flag_server() as server:
        proc = subprocess.run(
            [sys.executable, "-m", "flagsim", "scrape", "--out", str(out), "--url",
             server.page_url, "--allow-private", "--de-facto", "--extra-flags"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        hits = server.hits
    assert proc.returncode == 0, proc.stderr
    assert "24 of 24 flags" in proc.stdout
    table = read_images_table(out).to_pylist()
    ids = [r["image_id"] for r in table]
    assert ids[:2] == ["Afghanistan", "Afghanistan_(2)"] and len(ids) == 24
    assert ids[-3:] == ["Kosovo", "Northern_Cyprus", "Taiwan"]
    assert {r["name"] for r in table} >= {"Afghanistan (2)", "Kosovo", "Taiwan"}
    thumbs = [h for h in hits if "/thumb/" in h.path]
    assert len(thumbs) == 24 and all("/512px-" in h.path for h in thumbs)  # default --width
    assert all(h.headers["User-Agent"].startswith("flagsim/") for h in hits)
    assert read_errors_csv(out / "errors.csv") == []


def test_loopback_page_is_refused_without_allow_host(tmp_path, capsys):
    with flag_server() as server:
        rc = main(["scrape", "--out", str(tmp_path / "d"), "--url", server.page_url])
        assert server.hits == []
    assert rc == 2
    err = capsys.readouterr().err
    assert "host refused" in err and "127.0.0.1" in err
    assert not (tmp_path / "d" / "images.parquet").exists()


def test_unreachable_page_is_a_one_line_error(tmp_path, capsys):
    with flag_server() as server:
        rc = main(["-q", "scrape", "--out", str(tmp_path / "d"), "--url", server.base + "/wiki/Missing",
                   "--allow-host", "127.0.0.1", "--retries", "0"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flagsim: error: cannot fetch") and "http 404" in err
    assert len(err.splitlines()) == 1


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["scrape", "--out", str(tmp_path), "--width", "0"]) == 2
    assert "--width" in capsys.readouterr().err
    assert main(["scrape", "--out", str(tmp_path), "--url", "file:///etc/hosts"]) == 2
    assert "http(s)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Hostile pages and servers
# --------------------------------------------------------------------------------------------
def _page_with(*replacements: tuple[str, str]) -> str:
    html = FIXTURE.read_text(encoding="utf-8")
    for old, new in replacements:
        assert old in html
        html = html.replace(old, new, 1)
    return html


def test_a_trickling_image_is_abandoned_at_the_deadline_and_the_rest_finishes(tmp_path):
    # 48 bytes, one every 0.25 s: each read returns before --timeout 2, the body takes 12 s
    trickle = Reply(body=PNG_MAGIC + bytes(40), trickle=0.25)
    data = tmp_path / "data"
    with flag_server() as server:
        server.script("Flag_of_Chad.svg", trickle, trickle)
        assert main([*scrape_args(server, data), "--retries", "1"]) == 0  # deadline: --timeout
    (chad,) = read_errors_csv(data / "errors.csv")
    assert (chad["name"], chad["reason"], chad["attempts"]) == ("Chad", "deadline exceeded", "2")
    assert "2 s deadline (--deadline)" in chad["detail"]
    names = [r["name"] for r in read_images_table(data).to_pylist()]
    assert names == [n for n in SOVEREIGN_NAMES if n != "Chad"]


def _malformed_table(rows: int = 1500) -> str:
    cells = '<tr><td rowspan="1000" colspan="1000">x</td></tr>\n' * rows
    return f'<table class="wikitable"><tr><th>Flag</th><th>State</th></tr>\n{cells}</table>\n'


def test_table_grid_clips_spans_and_refuses_a_huge_grid():
    html = '<table><tr><th colspan="5000">A</th></tr><tr><td rowspan="65000">1</td></tr></table>'
    grid = table_grid(BeautifulSoup(html, "html.parser").table)
    assert [len(row) for row in grid] == [100, 1]  # colspan clipped to 100, rowspan to 1 row
    with pytest.raises(MalformedTable, match="malformed table"):
        table_grid(BeautifulSoup(_malformed_table(), "html.parser").table)


def test_a_page_with_a_span_bomb_table_is_scraped_with_one_warning(tmp_path, caplog):
    bomb = _malformed_table()
    assert 60_000 <= len(bomb) <= 80_000
    html = _page_with(("<body>", "<body>\n" + bomb))
    data = tmp_path / "data"
    with flag_server(html) as server:
        opts = ScrapeOptions(url=server.page_url, allow_hosts=("127.0.0.1",), timeout=2, width=300)
        result = scrape(data, opts)
    assert [r["name"] for r in result.table.to_pylist()] == SOVEREIGN_NAMES
    warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("skipping table 1 of the page:")


def test_a_very_long_state_name_gets_a_short_unique_file_name(tmp_path):
    long_name = "Государство" + "о" * 139  # 150 letters, 300 bytes of UTF-8
    assert len(long_name) == 150
    html = _page_with(('title="Chad">Chad</a>', f'title="Chad">{long_name}</a>'))
    data = tmp_path / "data"
    with flag_server(html) as server:
        assert main(scrape_args(server, data)) == 0
    rows = {r["name"]: r for r in read_images_table(data).to_pylist()}
    assert len(rows) == len(SOVEREIGN_NAMES) and read_errors_csv(data / "errors.csv") == []
    row = rows[long_name]
    file = Path(row["path"])
    assert file.is_file() and len(file.name.encode()) <= 200
    assert file.read_bytes() == bundled_png("Chad").read_bytes()
    assert row["image_id"].startswith("Государство") and file.stem == row["image_id"]


def test_a_row_that_cannot_be_written_is_an_error_row_not_the_end_of_the_scrape(tmp_path):
    data = tmp_path / "data"
    with flag_server() as server:
        assert main(scrape_args(server, data)) == 0
        (data / "images" / "Chad.png").unlink()
        (data / "images" / "Chad.png").mkdir()  # the file cannot be written
        (data / "images" / "Romania.png").unlink()
        os.mkfifo(data / "images" / "Romania.png")  # reading it would block forever
        server.clear()
        assert main(scrape_args(server, data)) == 0
        fetched = sorted(file_of(h.path) for h in server.flag_hits())
    assert fetched == ["Flag_of_Chad.svg", "Flag_of_Romania.svg"]
    (chad,) = read_errors_csv(data / "errors.csv")
    assert (chad["name"], chad["reason"], chad["status"]) == ("Chad", "file error", "200")
    assert "cannot write" in chad["detail"]
    assert (data / "images" / "Romania.png").read_bytes() == bundled_png("Romania").read_bytes()
    names = [r["name"] for r in read_images_table(data).to_pylist()]
    assert names == [n for n in SOVEREIGN_NAMES if n != "Chad"]


def test_errors_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path):
    formula = '=HYPERLINK("http://evil.example/","click")'
    html = _page_with(('title="The Bahamas">The Bahamas</a>', f'title="x">{formula}</a>'))
    data = tmp_path / "data"
    with flag_server(html) as server:
        server.script("Flag_of_the_Bahamas.svg", Reply(status=404, body=b"gone"))
        assert main(scrape_args(server, data)) == 0
    (row,) = read_errors_csv(data / "errors.csv")
    assert row["name"] == "'" + formula and row["reason"] == "http 404"
    text = errors_csv_text([{"name": n, "reason": n, "detail": n, "status": 404}
                            for n in ("+1", "-1", "@SUM(A1)", "\tx", "\rx", "fine", "a=b")])
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [r["detail"] for r in rows] == ["'+1", "'-1", "'@SUM(A1)", "'\tx", "'\rx", "fine", "a=b"]
    assert all(r["name"] == r["reason"] == r["detail"] and r["status"] == "404" for r in rows)
