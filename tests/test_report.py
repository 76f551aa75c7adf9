"""The HTML report and PNG contact sheet: real Chromium rendering, escaping, self-containment, CLI."""

from __future__ import annotations

import base64
import errno
import html
import io
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from bs4 import BeautifulSoup
from PIL import Image

from flagsim.images import (
    bundled_table,
    images_table_hash,
    probe_image,
    safe_stem,
    write_images_table,
)
from flagsim.report import (
    SHEET_HEADER,
    Thumbnails,
    build_report,
    image_ids,
    render_contact_sheet,
    render_html,
)
from flagsim.rundir import RunDir
from flagsim.shards import Manifest, embeddings_table, write_manifest, write_shard
from flagsim.storage import Location

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
SCRIPT_NAME = "<script>alert(1)</script>"
IMG_NAME = '"><img src=x onerror=alert(1)>'
HOSTILE = {"hostile-script": (SCRIPT_NAME, "Chad"), "hostile-img": (IMG_NAME, "Japan")}
QUERIES = ["Chad", "Australia", "Indonesia", "Ireland", "Denmark", "Japan"]


# --- a small real run, built without Ray ---------------------------------------------------------


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        small = im.convert("RGB").resize((12, 8), Image.Resampling.BILINEAR)
    v = np.asarray(small, np.float32).reshape(-1) / 255.0
    return v - 0.5


def _reference_vectors(model_file: str) -> dict[str, np.ndarray]:
    df = pd.read_csv(REFERENCE / model_file)
    out = {}
    for country, feats in zip(df["Country"], df["features"], strict=True):
        out[safe_stem(country)] = np.array(feats.replace("[", " ").replace("]", " ").split(), np.float32)
    return out


def _write_model(run: RunDir, model: str, ids, names, vectors, images_hash: str, shard_size: int = 120):
    shards = {}
    for i, start in enumerate(range(0, len(ids), shard_size)):
        sl = slice(start, start + shard_size)
        loc = write_shard(run, model, i, embeddings_table(ids[sl], names[sl], model, vectors[sl]))
        shards[loc.name] = len(ids[sl])
    write_manifest(run, Manifest(model=model, dim=int(vectors.shape[1]), rows=len(ids),
                                 images_hash=images_hash, shards=shards, source="test"))


def make_run(root: Path, with_images: bool = True) -> Path:
    """The bundled flags plus two hostile-named copies and one image whose file is missing.

    Embeddings: `pixels` (12x8 downsampled RGB), `clip` and `dinov2` (the original experiment's
    vectors); the hostile copies reuse their source flag's vector plus a little noise.
    """
    run_dir = root / "run"
    run = RunDir.at(run_dir)
    base = bundled_table()
    by_id = dict(zip(base.column("image_id").to_pylist(), base.column("path").to_pylist(), strict=True))
    extra_dir = root / "extra"
    extra_dir.mkdir(parents=True)
    rows = []
    for iid, (name, src) in HOSTILE.items():
        dst = extra_dir / f"{iid}.png"
        shutil.copyfile(by_id[src], dst)
        info = probe_image(dst.read_bytes())
        rows.append({"image_id": iid, "name": name, "path": str(dst), "source_url": None,
                     "sha256": info.sha256, "width": info.width, "height": info.height,
                     "format": info.format})
    rows.append({"image_id": "ghost", "name": "Ghostland", "path": str(extra_dir / "ghost.png"),
                 "source_url": None, "sha256": None, "width": None, "height": None, "format": None})
    table = pa.concat_tables([base, pa.Table.from_pylist(rows, schema=base.schema)])
    if with_images:
        write_images_table(table, run)
    ihash = images_table_hash(table)
    ids = table.column("image_id").to_pylist()
    names = table.column("name").to_pylist()
    paths = table.column("path").to_pylist()
    rng = np.random.default_rng(0)
    src_of = {iid: src for iid, (_, src) in HOSTILE.items()}
    src_of["ghost"] = "Ireland"
    pix = {i: _pixels(p) for i, p in zip(ids, paths, strict=True) if i in by_id}
    models = {"pixels": pix, "clip": _reference_vectors("national_flag_embeddings_clip.csv.gz"),
              "dinov2": _reference_vectors("national_flag_embeddings_DINO-v2.csv.gz")}
    for model, vecs in models.items():
        keep_ids, keep_names, mats = [], [], []
        for iid, name in zip(ids, names, strict=True):
            v = vecs.get(src_of.get(iid, iid))
            if v is None:
                continue
            if iid in src_of:
                v = v + rng.normal(0, 1e-3 * float(np.abs(v).mean()), v.shape).astype(np.float32)
            keep_ids.append(iid)
            keep_names.append(name)
            mats.append(v)
        _write_model(run, model, keep_ids, keep_names, np.stack(mats), ihash)
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("report"))


# --- fake comparison objects for the pure renderers ----------------------------------------------


@dataclass(frozen=True)
class FakeHit:
    rank: int
    image_id: str
    name: str
    score: float


@dataclass
class FakeComparison:
    models: list[str]
    queries: list[str]
    query_ids: dict[str, str]
    results: dict[str, dict[str, list[FakeHit]]]
    agreement: pd.DataFrame
    k: int


def fake_comparison(queries=("Chad", "Japan", "Ireland"), k=4) -> FakeComparison:
    """Constructed results over the bundled flags, with the hostile names among the hits."""
    table = bundled_table()
    ids = table.column("image_id").to_pylist()
    names = dict(zip(ids, table.column("name").to_pylist(), strict=True))
    names.update({iid: n for iid, (n, _) in HOSTILE.items()})
    models = ["pixels", "clip", "dinov2"]
    results = {}
    for qi, q in enumerate(queries):
        per = {}
        pool = [i for i in ids if i != q]
        for mi, m in enumerate(models + ["all"]):
            chosen = ["hostile-script", "hostile-img"] + pool[(qi * 7 + mi * 3) % 50:][: k - 2]
            per[m] = [FakeHit(r + 1, iid, names[iid], 0.95 - 0.05 * r - 0.01 * mi)
                      for r, iid in enumerate(chosen)]
        results[q] = per
    agreement = pd.DataFrame([[1.0, 0.4, 0.3], [0.4, 1.0, 0.8], [0.3, 0.8, 1.0]],
                             index=models, columns=models)
    return FakeComparison(models, list(queries), {q: q for q in queries}, results, agreement, k)


def fake_eval() -> pd.DataFrame:
    return pd.DataFrame({"model": ["pixels", "clip", "dinov2", "all"], "pairs": [12, 12, 12, 12],
                         "hit@1": [0.25, 0.5, 0.75, 0.58], "hit@5": [0.5, 0.83, 0.92, 0.9]})


# --- headless Chromium ---------------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


def _chromium_run(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}",
        *extra, page.resolve().as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def dump_dom(page: Path, tmp: Path) -> str:
    proc = _chromium_run(page, tmp, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "<html" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def screenshot(page: Path, tmp: Path, out: Path) -> Image.Image:
    proc = _chromium_run(page, tmp, f"--screenshot={out}", "--window-size=1400,3000",
                         "--hide-scrollbars")
    assert proc.returncode == 0 and out.exists(), proc.stderr[-2000:]
    return Image.open(out)


def check_scripts(soup: BeautifulSoup) -> None:
    """No script but the page's own: one JSON data block and one inline script whose sha256 is
    the only script source the page's CSP allows (none at all on a page without them)."""
    from flagsim.report.script import SCRIPT, script_hash

    scripts = soup.find_all("script")
    if not scripts:
        return
    assert [s.get("type") for s in scripts] == ["application/json", None]
    assert scripts[0]["id"] == "flagsim-data" and not scripts[1].attrs
    assert scripts[1].string == SCRIPT
    csp = soup.find("meta", attrs={"http-equiv": "Content-Security-Policy"})["content"]
    assert csp.endswith(f"script-src {script_hash(SCRIPT)}") and "unsafe-inline" not in csp.split("script-src")[1]


_URL_ATTRS = ("src", "href", "srcset", "action", "formaction", "poster", "data", "background",
              "xlink:href", "ping", "cite", "manifest")


def check_safe_dom(dom: str) -> BeautifulSoup:
    """The dumped DOM has no script, no event handler, and references nothing outside itself."""
    soup = BeautifulSoup(dom, "html.parser")
    check_scripts(soup)
    assert soup.find_all(["iframe", "object", "embed", "link", "base", "form"]) == []
    for el in soup.find_all(True):
        for attr, value in el.attrs.items():
            assert not attr.lower().startswith("on"), f"event handler {attr} on <{el.name}>"
            if attr.lower() in _URL_ATTRS:
                v = value if isinstance(value, str) else " ".join(value)
                assert v.startswith(("data:image/", "#")), f"<{el.name} {attr}={v[:60]!r}>"
    for img in soup.find_all("img"):
        assert img["src"].startswith("data:image/png;base64,")
    for style in [s.get_text() for s in soup.find_all("style")] + [
        el["style"] for el in soup.find_all(style=True)
    ]:
        assert "url(" not in style and "@import" not in style
    return soup


# --- renderers -----------------------------------------------------------------------------------


def test_render_html_escapes_hostile_names_and_references_nothing_external():
    comp = fake_comparison()
    thumbs = Thumbnails(dict(zip(bundled_table().column("image_id").to_pylist(),
                                 bundled_table().column("path").to_pylist(), strict=True)))
    page = render_html(comp, fake_eval(), {i: thumbs.data_uri(i) for i in image_ids(comp)}, "t <b>")
    assert SCRIPT_NAME not in page and IMG_NAME not in page
    assert html.escape(SCRIPT_NAME) in page and html.escape(IMG_NAME) in page
    assert 'http-equiv="Content-Security-Policy"' in page
    assert html.escape("default-src 'none'") in page
    assert "<b>" not in page.split("<body>", 1)[1]
    no_data = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert re.findall(r"https?:|//[a-z]", no_data, flags=re.I) == []
    assert "<script" not in page.lower()
    check_safe_dom(page)


def test_page_inlines_the_packaged_stylesheet_whole():
    """The CSS is package data (pyproject ships it in wheels) and each page carries all of it."""
    from importlib.resources import files

    css = files("flagsim.report").joinpath("report.css").read_text(encoding="utf-8")
    assert "figure.hit.agree-all" in css and "url(" not in css
    page = render_html(fake_comparison(), fake_eval(), {}, "t")
    styles = BeautifulSoup(page, "html.parser").find_all("style")
    assert [s.get_text() for s in styles] == ["\n" + css]
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    package_data = pyproject.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert '"report/*.css"' in package_data


def test_thumbnails_decode_and_encode_each_image_once(monkeypatch, bundled_dir):
    import flagsim.decode

    calls = []
    real = flagsim.decode.decode_image
    monkeypatch.setattr(flagsim.decode, "decode_image", lambda data, *a, **kw: calls.append(1) or real(data))
    paths = {"Chad": str(bundled_dir / "images" / "Chad.png"), "gone": str(bundled_dir / "nope.png")}
    thumbs = Thumbnails(paths)
    comp = fake_comparison(queries=("Chad",), k=3)
    comp.results["Chad"]["pixels"][0] = FakeHit(1, "Chad", "Chad", 1.0)
    uris = [thumbs.data_uri(i) for i in image_ids(comp) + ["Chad", "Chad", "gone", "gone"]]
    assert len(calls) == thumbs.decoded == 1 and thumbs.encoded == 1
    chad = thumbs.image("Chad")
    assert chad.width == 120 and chad.height == 80  # 3:2 flag scaled to 120 px wide
    # the missing file and the unknown ids share one labelled placeholder per reason
    assert uris[-1] == uris[-2] and uris[-1] != uris[-3]
    assert thumbs.data_uri("not-there") != uris[-1]  # "not in images table" vs "image file missing"


def n_colours(im: Image.Image) -> int:
    arr = np.asarray(im.convert("RGB"), np.uint32)
    return len(np.unique((arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2]))


def _header_bands(sheet: Image.Image) -> int:
    """Runs of rows whose left margin pixel is the block header colour."""
    x = 20
    col = [sheet.getpixel((x, y)) for y in range(sheet.height)]
    runs, inside = 0, False
    for px in col:
        hit = tuple(px[:3]) == SHEET_HEADER
        runs += hit and not inside
        inside = hit
    return runs


def test_contact_sheet_one_block_per_query(bundled_dir):
    paths = dict(zip(bundled_table().column("image_id").to_pylist(),
                     bundled_table().column("path").to_pylist(), strict=True))
    thumbs = Thumbnails(paths)
    sheets = {}
    for n in (1, 3):
        comp = fake_comparison(queries=("Chad", "Japan", "Ireland")[:n], k=4)
        sheets[n] = render_contact_sheet(comp, {i: thumbs.image(i) for i in image_ids(comp)})
    for n, sheet in sheets.items():
        assert _header_bands(sheet) == n
        assert n_colours(sheet) > 200  # flags, not a blank canvas
    assert sheets[1].width == sheets[3].width
    block = (sheets[3].height - sheets[1].height) / 2
    assert block > 4 * 120  # four model rows (3 models + "all") of thumbnails per block


# --- real run: compare + evaluate + Chromium -----------------------------------------------------


@pytest.fixture(scope="module")
def built(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    queries = QUERIES + ["Atlantis"]
    paths = build_report(str(run_dir), queries=queries, k=5, out=str(out / "report.html"))
    return paths, out


def test_report_of_a_real_run_renders_in_chromium(built, run_dir, tmp_path):
    from flagsim.search.compare import compare

    paths, out = built
    page = Path(paths.html)
    assert paths.skipped == ["Atlantis"]
    dom = dump_dom(page, tmp_path)
    soup = check_safe_dom(dom)
    comp = compare(str(run_dir), QUERIES, k=5)
    sections = {s["data-query"]: s for s in soup.select("section[data-query]")}
    assert list(sections) == comp.queries
    for q in comp.queries:
        rows = {tr["data-model"]: tr for tr in sections[q].select("tr[data-model]")}
        assert set(rows) == set(comp.models) | {"all"}
        for model, tr in rows.items():
            names = [f.select_one(".name").get_text() for f in tr.select("figure.hit")]
            assert names == [f"{h.rank}. {h.name}" for h in comp.results[q][model]]
    ghost = sections["Ireland"].select_one('figure[data-image-id="ghost"] img')  # file missing
    tile = Image.open(io.BytesIO(base64.b64decode(ghost["src"].split(",", 1)[1]))).convert("RGB")
    pixels = Counter(map(tuple, np.asarray(tile).reshape(-1, 3).tolist()))
    assert pixels.most_common(1)[0][0] == (229, 231, 235)  # the grey placeholder
    text = soup.get_text()
    assert SCRIPT_NAME in text and IMG_NAME in text  # shown as text, not markup
    assert "Atlantis" in text  # the skipped-query note
    assert soup.select("table[data-matrix] td") and soup.select("table[data-table] tr[data-model]")

    shot = screenshot(page, tmp_path, tmp_path / "shot.png")
    assert shot.format == "PNG" and shot.size == (1400, 3000)
    assert np.asarray(shot.convert("RGB")).std() > 20 and n_colours(shot) > 500


def test_contact_sheet_written_next_to_the_page(built):
    paths, out = built
    assert Path(paths.png) == out / "report.png"
    sheet = Image.open(paths.png)
    assert sheet.format == "PNG"
    assert _header_bands(sheet.convert("RGB")) == len(paths.queries) == len(QUERIES)


def test_report_without_images_table_shows_placeholders(tmp_path):
    run_dir = make_run(tmp_path, with_images=False)
    paths = build_report(str(run_dir), queries=None, k=3)  # config default queries
    assert Path(paths.html) == run_dir / "report.html" and Path(paths.png) == run_dir / "report.png"
    assert paths.queries == QUERIES and paths.skipped == []
    soup = BeautifulSoup(Path(paths.html).read_text(), "html.parser")
    srcs = {img["src"] for img in soup.find_all("img")}
    assert len(srcs) == 1  # one shared "no images table" tile
    assert len(soup.select("figure.hit")) == len(QUERIES) * 4 * 3


def test_default_queries_fall_back_to_the_runs_first_images():
    from flagsim.errors import UnknownNameError
    from flagsim.report import resolve_queries
    from flagsim.search.catalog import Catalogue

    cat = Catalogue({"a": "Alpha", "b": "Beta", "c": "Gamma", "d": "Delta", "e": "Twin", "f": "Twin"})
    queries, skipped, notes = resolve_queries(["Chad", "beta", "c", "twin"], cat, explicit=False)
    assert queries == ["beta", "c"] and skipped == ["Chad", "twin"]
    assert "Chad" in notes[0] and "'twin' names 2 images" in notes[1]
    queries, skipped, notes = resolve_queries(["Chad"], cat, explicit=False)
    assert queries == ["a", "b", "c"] and skipped == ["Chad"] and "Alpha, Beta, Gamma" in notes[-1]
    with pytest.raises(UnknownNameError, match="Atlantis"):
        resolve_queries(["Atlantis"], cat, explicit=True)


def test_cli_report_writes_both_files(run_dir, tmp_path, capsys):
    from flagsim.cli import main

    out = tmp_path / "site" / "flags.html"
    rc = main(["report", "--run", str(run_dir), "--out", str(out), "--queries", "Chad,japan",
               "-k", "3", "--models", "pixels,clip"])
    assert rc == 0
    page = out.read_text()
    assert Image.open(tmp_path / "site" / "flags.png").format == "PNG"
    soup = BeautifulSoup(page, "html.parser")
    assert [s["data-query"] for s in soup.select("section[data-query]")] == ["Chad", "Japan"]
    first = soup.select_one("section[data-query]")
    assert [tr["data-model"] for tr in first.select("tr[data-model]")] == ["pixels", "clip", "all"]
    assert all(len(tr.select("figure.hit")) == 3 for tr in first.select("tr[data-model]"))
    assert str(out) in capsys.readouterr().out


def test_cli_report_unknown_queries_is_one_line_error(run_dir, tmp_path, capsys):
    from flagsim.cli import main

    rc = main(["report", "--run", str(run_dir), "--out", str(tmp_path / "r.html"),
               "--queries", "Atlantis,Lemuria"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Atlantis" in err
    assert not (tmp_path / "r.html").exists()
    for empty in ("", ","):  # said "none of the queries is in the run: None"
        rc = main(["report", "--run", str(run_dir), "--out", str(tmp_path / "r.html"),
                   "--queries", empty])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.endswith("no query names given (an empty list)"), err


def test_cli_report_never_writes_into_the_runs_data(run_dir, tmp_path, capsys):
    """--out / --png onto a shard, into a table folder, onto images.parquet or onto each other:
    one line, nothing written (a report once replaced an embedding shard)."""
    from flagsim.cli import main

    shard = sorted((run_dir / "embeddings").glob("model=*/part-*.parquet"))[0]
    before = shard.read_bytes()
    for args in (["--out", str(shard)], ["--png", str(run_dir / "neighbours" / "x.png")],
                 ["--out", str(run_dir / "images.parquet")],
                 ["--out", str(tmp_path / "same"), "--png", str(tmp_path / "same")]):
        capsys.readouterr()
        assert main(["report", "--run", str(run_dir), "--queries", "Chad", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("inside the run's data" in err or "same file" in err)
    assert shard.read_bytes() == before and not (tmp_path / "same").exists()


def test_cli_report_writes_the_contact_sheet_in_the_format_its_name_says(run_dir, tmp_path,
                                                                        capsys, monkeypatch):
    """`--png sheet.jpg` wrote PNG bytes under a .jpg name; now JPEG and WebP are written as
    such, and a suffix PIL is not asked to write is refused before the work."""
    from PIL import Image

    from flagsim.cli import main

    for name, fmt in (("sheet.jpg", "JPEG"), ("sheet.webp", "WEBP"), ("sheet.PNG", "PNG")):
        assert main(["report", "--run", str(run_dir), "--queries", "Chad",
                     "--out", str(tmp_path / "r.html"), "--png", str(tmp_path / name)]) == 0
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt and im.width > 100
    _no_work(monkeypatch)
    capsys.readouterr()
    assert main(["report", "--run", str(run_dir), "--out", str(tmp_path / "s.html"),
                 "--png", str(tmp_path / "sheet.gif")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"flagsim: error: contact sheet {tmp_path / 'sheet.gif'}: .gif is not a format "
                   f"it can be written in; name it .jpeg, .jpg, .png, .webp")
    assert not (tmp_path / "s.html").exists() and not (tmp_path / "sheet.gif").exists()


def test_a_sheet_too_large_for_its_format_is_one_line_and_nothing_written(run_dir, tmp_path,
                                                                        capsys, monkeypatch):
    """A WebP sheet of ~17 queries x 7 models passed WebP's 16,383 px and the save raised a
    traceback (`encoding error 5`) after all the work; now one line, nothing written. The limit
    is lowered here so that a small sheet exceeds it."""
    import flagsim.report.build as build
    from flagsim.cli import main

    monkeypatch.setitem(build.SHEET_MAX_SIDE, "WEBP", 300)
    out, sheet = tmp_path / "r.html", tmp_path / "sheet.webp"
    assert main(["report", "--run", str(run_dir), "--queries", "Chad", "--out", str(out),
                 "--png", str(sheet)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"flagsim: error: contact sheet {sheet}: ") and err.endswith(
        "px is larger than WEBP can hold (300 px a side); name it .png, or ask for fewer "
        "queries"), err
    assert not out.exists() and not sheet.exists()


def test_cli_report_to_a_directory_is_refused_before_the_work(run_dir, tmp_path, capsys,
                                                             monkeypatch):
    """`--out DIR` failed with `DIR: Is a directory` only when writing, after all the work."""
    import flagsim.report as report_pkg
    from flagsim.cli import main

    monkeypatch.setattr(report_pkg, "build_report", lambda *a, **k: pytest.fail("work started"))
    (tmp_path / "pages").mkdir()
    for opt, name in (("--out", "report.html"), ("--png", "report.png")):
        assert main(["report", "--run", str(run_dir), opt, str(tmp_path / "pages")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"flagsim: error: {opt} {tmp_path / 'pages'} is a directory; name the "
                       f"file, e.g. {tmp_path / 'pages' / name}")


def _no_work(monkeypatch):
    import flagsim.report as report_pkg

    monkeypatch.setattr(report_pkg, "build_report", lambda *a, **k: pytest.fail("work started"))


def test_cli_report_refuses_an_out_or_png_that_is_not_a_regular_file(run_dir, tmp_path, capsys,
                                                                     monkeypatch):
    """The page and sheet are renamed over their targets: a FIFO or a symlink given as --out
    became a regular file (and /dev/null too, as root). Refused first, saying what it is."""
    import stat

    from flagsim.cli import main

    _no_work(monkeypatch)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = tmp_path / "real.html"
    target.write_text("keep")
    link = tmp_path / "link.html"
    link.symlink_to(target)
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    sheet_fifo = tmp_path / "page.png"  # the default sheet of --out page.html
    os.mkfifo(sheet_fifo)
    cases = [(["--out", str(fifo)], f"--out {fifo} is a FIFO"),
             (["--out", str(tmp_path / "a.html"), "--png", str(fifo)], f"--png {fifo} is a FIFO"),
             (["--out", str(link)], f"--out {link} is a symbolic link"),
             (["--out", str(tmp_path / "b.html"), "--png", str(dangling)],
              f"--png {dangling} is a symbolic link"),
             (["--out", str(tmp_path / "page.html")], f"contact sheet {sheet_fifo} is a FIFO")]
    for args, message in cases:
        assert main(["report", "--run", str(run_dir), *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"flagsim: error: {message}"), err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISFIFO(os.lstat(sheet_fifo).st_mode)
    assert link.is_symlink() and target.read_text() == "keep" and dangling.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.png", "link.html", "page.png",
                                                          "pipe", "real.html"]


def test_cli_report_refuses_a_page_its_default_sheet_would_overwrite(run_dir, tmp_path, capsys,
                                                                     monkeypatch):
    """`--out X.png` alone: the sheet's default name is the page's, so the sheet replaced the
    page (both printed, exit 0, only the PNG left)."""
    from flagsim.cli import main

    _no_work(monkeypatch)
    page = tmp_path / "sheet.png"
    assert main(["report", "--run", str(run_dir), "--out", str(page)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "--png" in err and "same file" in err
    assert not page.exists()


def test_cli_report_never_writes_onto_parquet_or_into_another_runs_data(run_dir, tmp_path, capsys):
    """`report --run A --out B/embeddings/model=m/part-00000.parquet` replaced B's shard with
    HTML: any Parquet file, and anything in another run's folders, is refused first; that
    run's own report.html / report.png are not its data."""
    from flagsim.cli import main

    other = _tiny_run(tmp_path / "other")
    shard = sorted((other / "embeddings").glob("model=*/part-*.parquet"))[0]
    loose = tmp_path / "vectors.bin"  # Parquet whatever its name
    shutil.copyfile(shard, loose)
    before = {p: p.read_bytes() for p in (shard, loose, other / "images.parquet")}
    for args, message in (
            (["--out", str(shard)], "inside another run's data"),
            (["--out", str(other / "_meta" / "page.html")], "inside another run's data"),
            (["--out", str(tmp_path / "p.html"), "--png", str(other / "neighbours" / "x.png")],
             "inside another run's data"),
            (["--out", str(other / "notes.html")], "inside another run's data"),
            (["--out", str(other / "images.parquet")], "inside another run's data"),
            (["--out", str(loose)], "is a Parquet file"),
            (["--out", str(tmp_path / "q.html"), "--png", str(loose)], "is a Parquet file")):
        capsys.readouterr()
        assert main(["report", "--run", str(run_dir), "--queries", "Chad", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (args, err)
    assert {p: p.read_bytes() for p in before} == before
    assert not (other / "_meta" / "page.html").exists() and not (other / "notes.html").exists()
    assert main(["report", "--run", str(run_dir), "--queries", "Chad", "-k", "2",
                 "--out", str(other / "report.html")]) == 0
    assert (other / "report.html").read_text().startswith("<!") and (other / "report.png").exists()


def test_report_is_written_when_evaluation_is_impossible(run_dir, tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("query,similar\nAtlantis,Lemuria\n")
    paths = build_report(str(run_dir), queries=["Chad"], k=2, pairs=str(pairs),
                         out=str(tmp_path / "r.html"))
    soup = BeautifulSoup(Path(paths.html).read_text(), "html.parser")
    section = soup.select_one('section[data-section="evaluation"]')
    assert "Evaluation unavailable" in section.get_text()
    assert soup.select_one("table[data-table]") is None
    assert len(soup.select('section[data-query="Chad"] figure.hit')) == 4 * 2


def _tiny_run(root: Path, names: dict[str, str] | None = None, n: int = 5) -> Path:
    """`n` bundled flags (names overridden by id -> name) with their `pixels` vectors."""
    run = RunDir.at(root)
    table = bundled_table().slice(0, n)
    ids = table.column("image_id").to_pylist()
    shown = [(names or {}).get(i, nm) for i, nm in zip(ids, table.column("name").to_pylist(), strict=True)]
    table = table.set_column(table.schema.get_field_index("name"), "name", pa.array(shown))
    write_images_table(table, run)
    vectors = np.stack([_pixels(p) for p in table.column("path").to_pylist()])
    _write_model(run, "pixels", ids, shown, vectors, images_table_hash(table), shard_size=n)
    return root


def test_report_of_a_five_image_run_clamps_k(tmp_path, capsys):
    from flagsim.cli import main

    run = _tiny_run(tmp_path / "run")
    assert main(["report", "--run", str(run), "--queries", "Albania", "-k", "10"]) == 0
    assert "k=10 clamped to 4 (the collection has 5 images)" in capsys.readouterr().err
    soup = BeautifulSoup((run / "report.html").read_text(), "html.parser")
    assert len(soup.select('section[data-query="Albania"] figure.hit')) == 4 * 2  # pixels, all


def test_report_html_has_no_control_characters_and_no_live_script(tmp_path):
    nul_name = "Nul\x00land <script>alert(1)</script>\x1b[31m\x7f"
    run = _tiny_run(tmp_path / "run", names={"Afghanistan": nul_name})
    paths = build_report(str(run), queries=["Afghanistan", "Albania"], k=3)
    page = Path(paths.html).read_text()
    assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", page)
    soup = BeautifulSoup(page, "html.parser")
    check_scripts(soup)
    shown = "Nul\\x00land <script>alert(1)</script>\\x1b[31m\\x7f"
    assert shown in soup.get_text()
    data = json.loads(soup.find("script", id="flagsim-data").string)
    assert shown in data["names"]


#: Names that broke the contact sheet (raqm_layout() failed on U+2029 and U+0085) or its layout.
BREAKING_NAMES = ["para\u2029graph", "next\x85line", "line\u2028sep", "nul\x00byte",
                  "\u202eoverride", "unit\x1fsep", "long" + "x" * 5000]


def test_plain_makes_line_and_paragraph_separators_visible():
    from flagsim.console import plain

    assert plain("a\u2028b\u2029c\x85d\x1ce") == "a\\u2028b\\u2029c\\x85d\\x1ce"


def test_contact_sheet_draws_any_name(bundled_dir):
    import time

    comp = fake_comparison(queries=("Chad",), k=len(BREAKING_NAMES))
    for hits in comp.results["Chad"].values():
        hits[:] = [FakeHit(r + 1, h.image_id, BREAKING_NAMES[r], h.score) for r, h in enumerate(hits)]
    comp.queries[:] = ["q\u2029\x85" + "y" * 5000]
    comp.results = {comp.queries[0]: comp.results["Chad"]}
    comp.query_ids = {comp.queries[0]: "Chad"}
    t0 = time.perf_counter()
    sheet = render_contact_sheet(comp, {}, title="run\x85\u2029\u2028")
    assert time.perf_counter() - t0 < 20
    assert _header_bands(sheet) == 1


def test_a_failing_sheet_leaves_the_page_and_sheet_in_step(tmp_path, monkeypatch):
    """The page was written before the sheet was drawn: a sheet that failed left a new
    report.html beside the old report.png. Both are made first; a failure writes neither."""
    import flagsim.report.build as build_mod

    run = _tiny_run(tmp_path / "run")
    paths = build_report(str(run), queries=["Albania"], k=2)
    old = {p: Path(p).read_bytes() for p in (paths.html, paths.png)}

    def broken(*a, **k):
        raise RuntimeError("raqm_layout() failed.")

    with monkeypatch.context() as m:
        m.setattr(build_mod, "render_contact_sheet", broken)
        with pytest.raises(RuntimeError, match="raqm"):
            build_report(str(run), queries=["Andorra"], k=3)
    assert {p: Path(p).read_bytes() for p in old} == old

    real = Location.write_bytes

    def full_disk_for_png(self, data, **kwargs):
        if self.name.endswith(".png"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        real(self, data, **kwargs)

    monkeypatch.setattr(Location, "write_bytes", full_disk_for_png)
    for out in (None, str(tmp_path / "new.html")):  # the page put back; a new one removed
        with pytest.raises(OSError, match="No space"):
            build_report(str(run), queries=["Andorra"], k=3, out=out)
    assert {p: Path(p).read_bytes() for p in old} == old
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == ["images.parquet", "report.html",
                                                                    "report.png"]
    assert not (tmp_path / "new.html").exists()

# --- the interactive page: search box, deep links, maps (headless Chromium over DevTools) --------


@pytest.fixture()
def browser(tmp_path):
    from cdp import Browser

    b = Browser(_chromium(), tmp_path / "cdp-profile")
    yield b
    b.close()


_RESULT_JS = """Array.from(document.querySelectorAll('#result .rrow')).map(r => [r.dataset.model,
  Array.from(r.querySelectorAll('.name')).map(e => e.textContent)])"""


def test_search_box_deep_links_and_maps_in_chromium(built, run_dir, browser):
    from flagsim.search.compare import compare
    from flagsim.search.session import RunSearch

    paths, _ = built
    url = Path(paths.html).resolve().as_uri()
    comp = compare(str(run_dir), ["Chad", "hostile-script"], k=5)
    expected = {q: [[m, [f"{h.rank}. {h.name}" for h in comp.results[q][m]]] for m in [*comp.models, "all"]]
                for q in comp.queries}

    browser.open(url)
    browser.type_text("#search", "Chad")  # a real input event, typed through the browser
    browser.wait_for("document.querySelectorAll('#result .rrow').length > 0")
    assert browser.evaluate(_RESULT_JS) == expected["Chad"]
    assert browser.evaluate("document.querySelector('#result h3').textContent") == "Chad"
    assert browser.evaluate("document.querySelector('#result .rhead img').src").startswith("data:image/png")

    # an image that is no query section of the page (every image is reachable), by a deep link
    browser.open(url + "#q=" + "Romania")
    browser.wait_for("document.querySelector('#result h3')")
    assert browser.evaluate("document.querySelector('#result h3').textContent") == "Romania"
    assert browser.evaluate("document.getElementById('search').value") == "Romania"
    assert [m for m, _ in browser.evaluate(_RESULT_JS)] == [*comp.models, "all"]

    # the hostile name: a deep link, the suggestions and the results all show it as text
    browser.open(url + "#q=" + "%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    browser.wait_for("document.querySelector('#result h3')")
    q = comp.queries[1]
    assert browser.evaluate("document.querySelector('#result h3').textContent") == SCRIPT_NAME
    assert browser.evaluate(_RESULT_JS) == expected[q]
    browser.evaluate("document.getElementById('search').value = ''")
    browser.type_text("#search", "<scr")
    browser.wait_for("document.querySelectorAll('#suggest button').length > 0")
    assert browser.evaluate("Array.from(document.querySelectorAll('#suggest button')).map(b => b.textContent)") \
        == [SCRIPT_NAME]
    browser.evaluate("document.getElementById('search').value = ''")
    browser.type_text("#search", "chad")  # Chad's neighbours list the hostile copy of Chad
    browser.wait_for("document.querySelector('#result h3').textContent === 'Chad'")
    chad_hits = browser.evaluate("Array.from(document.querySelectorAll('#result .name')).map(e => e.textContent)")
    assert f"1. {SCRIPT_NAME}" in chad_hits
    assert browser.evaluate("document.scripts.length") == 2  # nothing injected
    assert browser.evaluate("document.querySelectorAll('#result script, #suggest script, svg script').length") == 0

    # maps: one mark per image of each model (the run is below the sample size), names as text
    session = RunSearch(run_dir)
    maps = browser.evaluate("""Array.from(document.querySelectorAll('figure.map')).map(f => [f.dataset.model,
      f.dataset.method, f.querySelectorAll('circle').length, Number(f.dataset.marks)])""")
    assert [(m, meth) for m, meth, _, _ in maps] == [(m, "PCA") for m in [*session.models, "all"]]
    for m, _, circles, marks in maps:
        assert circles == marks == session.index(m).count
    titles = browser.evaluate("Array.from(document.querySelectorAll('figure.map circle title')).map(t => t.textContent)")
    assert titles.count(SCRIPT_NAME) == len(maps) and titles.count(IMG_NAME) == len(maps)
    assert browser.evaluate("document.querySelectorAll('figure.map title *').length") == 0
    # hover shows the name and its neighbours; a click opens the image in the search box
    browser.evaluate("""(() => { const c = Array.from(document.querySelectorAll('figure.map')[0]
      .querySelectorAll('circle')).find(c => c.textContent === 'Chad');
      c.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
      c.dispatchEvent(new MouseEvent('click', {bubbles: true})); })()""")
    info = browser.evaluate("document.querySelector('figure.map .mapinfo').textContent")
    assert info.startswith("Chad → ") and expected["Chad"][0][1][0].split(". ", 1)[1] in info
    browser.wait_for("location.hash === '#q=Chad' && document.querySelector('#result h3').textContent === 'Chad'")
    assert browser.console_errors() == []


def test_a_deep_link_opens_the_image_of_its_id_when_another_image_has_that_name(tmp_path, browser):
    """Deep links (and clicks) hold the image id, but the page matched names first: with Algeria
    named "Albania", `#q=Albania` showed Algeria."""
    run = _tiny_run(tmp_path / "run", names={"Algeria": "Albania", "Albania": "Shqipëria",
                                             "Andorra": " Padded ΣΑΣ "})
    paths = build_report(str(run), queries=["Albania"], k=3)
    url = Path(paths.html).resolve().as_uri()
    for link, image_id in (("Albania", "Albania"), ("Algeria", "Algeria"), ("shqip%C3%ABria", "Albania"),
                           ("padded%20%CF%83%CE%B1%CF%82", "Andorra")):  # folded as `flagsim query` folds
        browser.open(url + "#q=" + link)
        browser.wait_for("document.querySelector('#result h3')")
        assert browser.evaluate("document.getElementById('result').dataset.imageId") == image_id, link
    assert browser.console_errors() == []


def test_report_header_and_evaluation_detail(built, run_dir):
    from flagsim.search.evaluate import evaluate

    paths, _ = built
    soup = BeautifulSoup(Path(paths.html).read_text(), "html.parser")
    run = soup.select_one('section[data-section="run"]')
    assert [tr["data-model"] for tr in run.select('table[data-meta="models"] tr[data-model]')] == \
        ["clip", "dinov2", "pixels"]
    text = run.get_text()
    assert f"{len(bundled_table()) + 3} images" in text and "flagsim 0.1.0" in text and "torch" in text
    assert "no embed record" in text  # this run was not made by `flagsim embed`
    ev = evaluate(str(run_dir))
    detail = soup.select_one('section[data-section="eval-detail"]')
    for rec in ev.to_dict("records"):
        rows = detail.select(f'details[data-model="{rec["model"]}"] tr[data-query]')
        assert len(rows) == rec["pairs"]
        assert np.mean([int(r["data-hit1"]) for r in rows]) == pytest.approx(rec["hit@1"])
        assert np.mean([int(r["data-hit5"]) for r in rows]) == pytest.approx(rec["hit@5"])
        assert all(len(r.find_all("td")) == 5 for r in rows)
    assert detail.select("svg.chart")


def test_map_samples_large_collections_but_search_covers_every_name(run_dir, tmp_path):
    paths = build_report(str(run_dir), queries=["Chad"], k=3, out=str(tmp_path / "r.html"), map_max=40,
                         thumbs_max=10)
    soup = BeautifulSoup(Path(paths.html).read_text(), "html.parser")
    for fig in soup.select("figure.map"):
        assert len(fig.select("circle")) == int(fig["data-marks"]) == 40 < int(fig["data-total"])
        assert "sample of 40" in fig.get_text()
    data = json.loads(soup.find("script", id="flagsim-data").string)
    n = len(bundled_table()) + 3
    assert len(data["names"]) == len(data["ids"]) == n
    assert all(len(data["nb"][m]) == n * 3 for m in data["models"])
    assert len({u for u in data["thumbs"]}) == len(data["thumbs"])  # each thumbnail once
    assert sum(t >= 0 for t in data["thumb"]) <= 10 + 1 + 4 * 3


def test_search_data_from_the_neighbour_tables(run_dir, tmp_path):
    """Every image's top-k comes from `neighbours/` when the run has it, and equals a search."""
    from flagsim.report.explore import search_table
    from flagsim.search.neighbours import write_neighbours
    from flagsim.search.session import RunSearch

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    searched = search_table(RunSearch(str(run)), 4)
    write_neighbours(str(run), k=4, models=["clip", "pixels"])  # no table for dinov2 nor all
    table = search_table(RunSearch(str(run)), 4)
    assert table.sources == {"clip": "neighbour table", "dinov2": "searched", "pixels": "neighbour table",
                             "all": "searched"}
    for m in table.neighbours:
        assert (table.neighbours[m] == searched.neighbours[m]).all()
        assert np.allclose(table.scores[m], searched.scores[m], atol=1e-5)
    assert (table.neighbours["clip"][table.ids.index("Chad")] >= 0).all()
    # a part gone: that table is out of date, searched again instead of read with holes
    sorted((run / "neighbours" / "model=pixels").glob("*.parquet"))[-1].unlink()
    table = search_table(RunSearch(str(run)), 4)
    assert table.sources["pixels"] == "searched" and table.sources["clip"] == "neighbour table"
    assert (table.neighbours["pixels"] == searched.neighbours["pixels"]).all()


def test_embed_records_skipped_models(tmp_path):
    from flagsim.report.explore import run_meta
    from flagsim.search.session import RunSearch

    run = _tiny_run(tmp_path / "run")
    (run / "_meta" / "embed.json").write_text(json.dumps({"images": 5, "results": [
        {"model": "pixels", "status": "embedded", "reason": ""},
        {"model": "blip2", "status": "skipped", "reason": "no weights <b>here</b>"}]}))
    meta = run_meta(RunSearch(str(run)))
    assert meta.skipped == [{"model": "blip2", "status": "skipped", "reason": "no weights <b>here</b>"}]
    paths = build_report(str(run), queries=["Albania"], k=2)
    li = BeautifulSoup(Path(paths.html).read_text(), "html.parser").select_one('ul[data-list="skipped"] li')
    assert li["data-model"] == "blip2" and "no weights <b>here</b>" in li.get_text()


def test_json_block_cannot_close_its_script_element():
    from flagsim.report.html import json_block

    value = {"names": ["</script><script>alert(1)</script>", "<!--", "a&b", "\u2028\u2029"]}
    text = json_block(value)
    assert not re.search(r"[<>&\u2028\u2029]", text)
    assert json.loads(text) == value


def test_pca_2d_of_a_large_sample_equals_the_exact_svd():
    """Above EXACT_SVD_MAX the two axes come from a randomized SVD (a full one took 20 s per
    model for a 3,000 x 6,375 map sample): the same projection and explained share as numpy's."""
    from flagsim.report.explore import EXACT_SVD_MAX, pca_2d

    rng = np.random.default_rng(1)
    n, d = 600, 300
    assert min(n, d) > EXACT_SVD_MAX
    # two leading axes above a decaying rest, as embeddings have (axes of nearly equal variance
    # are ill-defined for any PCA: a plot of them turns with the sample)
    scales = np.concatenate([[10.0, 6.0], np.geomspace(3.0, 0.1, d - 2)])
    x = (rng.standard_normal((n, d)) * scales) @ np.linalg.qr(rng.standard_normal((d, d)))[0]
    x = x.astype(np.float32)
    xy, explained = pca_2d(x)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    exact = centred @ vt[:2].T
    assert explained == pytest.approx((s[:2] ** 2).sum() / (s ** 2).sum(), rel=1e-4)
    for axis in range(2):  # each axis up to its sign
        assert min(np.abs(xy[:, axis] - exact[:, axis]).max(),
                   np.abs(xy[:, axis] + exact[:, axis]).max()) < 1e-3 * np.abs(exact[:, axis]).max()


def test_pca_2d_keeps_the_main_axes():
    from flagsim.report.explore import pca_2d

    rng = np.random.default_rng(0)
    t = rng.standard_normal((300, 2)) * [5.0, 2.0]
    basis = np.linalg.qr(rng.standard_normal((16, 16)))[0][:2]
    x = (t @ basis + 0.01 * rng.standard_normal((300, 16))).astype(np.float32)
    xy, explained = pca_2d(x)
    assert explained > 0.99
    # the projection is the planted 2-D layout up to rotation/reflection: distances are kept
    d_in = np.linalg.norm(t[:50, None] - t[None, :50], axis=-1)
    d_out = np.linalg.norm(xy[:50, None] - xy[None, :50], axis=-1)
    assert np.allclose(d_in, d_out, atol=0.1)


def test_cli_report_queries_take_a_quoted_name_holding_a_comma(tmp_path, capsys):
    """`--queries` was split on every comma, so 'Korea, South' could not be asked for."""
    import runs

    from flagsim.cli import main

    ids = ["Korea, South", "Chad", "Romania", "Peru"]
    runs.make_run(tmp_path / "run", "a", np.random.default_rng(4).normal(size=(4, 5)).astype(
        np.float32), ids=ids)
    out = tmp_path / "r.html"
    assert main(["report", "--run", str(tmp_path / "run"), "--out", str(out), "-k", "2",
                 "--queries", '"Image Korea, South", Image Chad']) == 0
    assert "wrote" in capsys.readouterr().err
    page = out.read_text()
    assert "not in this run" not in page and "not in the run" not in page
    assert 'data-query="Image Korea, South"' in page and 'data-query="Image Chad"' in page
    assert page.count('<section class="card query"') == 2
