"""flagsim dedup: calibrated thresholds separate copies from different flags on the bundled set,
planted copies (exact, resized, re-encoded, slightly cropped) come back as their groups, and the
group table reads whole with pandas, pyarrow, polars and DuckDB."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runs import make_run

from flagsim.cli import main
from flagsim.errors import ConfigError
from flagsim.images import bundled_flags_dir
from flagsim.models import create_embedder, get_spec
from flagsim.search.dedup import read_dedup, write_dedup


def _flags() -> list[tuple[str, np.ndarray]]:
    files = sorted(Path(bundled_flags_dir()).glob("**/*.png"))
    return [(f.stem, np.asarray(Image.open(f).convert("RGB"))) for f in files]


def _crop(a: np.ndarray, frac: float = 0.01) -> np.ndarray:
    h, w = a.shape[:2]
    dx, dy = max(1, int(w * frac)), max(1, int(h * frac))
    return a[dy:h - dy, dx:w - dx]


def _jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _half(a: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((a.shape[1] // 2, a.shape[0] // 2)))


COPIES = {"copy": lambda a: a.copy(), "half": _half, "jpeg50": lambda a: _jpeg(a, 50),
          "jpeg75": lambda a: _jpeg(a, 75), "crop1pct": _crop}


def _embed(model: str, images: list[np.ndarray]) -> np.ndarray:
    e = create_embedder(model, device="cpu")
    v = np.concatenate([np.asarray(e(images[i:i + 64]), np.float32) for i in range(0, len(images), 64)])
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("model,kinds", [
    ("pixels", ["copy", "half", "jpeg50", "jpeg75", "crop1pct"]),
    ("colour-layout", ["copy", "half", "jpeg50", "jpeg75"]),  # crops move its layout cells
])
def test_calibrated_threshold_separates_copies_from_any_two_bundled_flags(model, kinds) -> None:
    flags = _flags()
    assert len(flags) == 197
    base = _embed(model, [a for _, a in flags])
    sims = base @ base.T
    np.fill_diagonal(sims, -1.0)
    threshold = get_spec(model).dedup_threshold
    assert threshold is not None
    # no two different flags reach the threshold (so no group can mix them, whatever k)
    assert sims.max() < threshold, f"{sims.max():.4f} between two different flags"
    for kind in kinds:
        copies = _embed(model, [COPIES[kind](a) for _, a in flags])
        worst = float((copies * base).sum(axis=1).min())
        assert worst >= threshold, f"{model}: a {kind} copy only reaches {worst:.4f}"


def _planted_run(tmp_path):
    """The bundled flags plus copies of eight of them, embedded with pixels."""
    flags = _flags()
    rng = np.random.default_rng(0)
    picks = sorted(rng.choice(len(flags), size=8, replace=False))
    ids, names, images = [], [], []
    for stem, a in flags:
        ids.append(stem)
        names.append(stem.replace("_", " "))
        images.append(a)
    planted: dict[str, set[str]] = {}
    for n, p in enumerate(picks):
        stem, a = flags[p]
        kinds = list(COPIES)[n % 5: n % 5 + 1 + n % 2]  # one or two copies, every kind used
        planted[stem] = {stem}
        for kind in kinds:
            ids.append(f"{stem}__{kind}")
            names.append(f"{stem.replace('_', ' ')} ({kind})")
            images.append(COPIES[kind](a))
            planted[stem].add(f"{stem}__{kind}")
    vectors = _embed("pixels", images)
    run = make_run(tmp_path / "run", "pixels", vectors, shard_size=64, ids=ids)
    return run, planted


def test_dedup_finds_the_planted_copies_and_nothing_else(tmp_path, capsys) -> None:
    run, planted = _planted_run(tmp_path)
    assert main(["dedup", "--run", str(run.root)]) == 0
    out = capsys.readouterr().out
    assert "pixels" in out and "0.9933" in out
    table = read_dedup(str(run.root), "pixels").to_pandas()
    groups = {frozenset(g.image_id) for _, g in table.groupby("group")}
    assert groups == {frozenset(s) for s in planted.values()}
    for _, g in table.groupby("group"):
        rep = g.representative_id.iloc[0]
        assert (g.representative_id == rep).all() and rep in set(g.image_id)
        assert (g["size"] == len(g)).all()
        assert g.score.min() >= 0.9933 - 1e-6 and g.loc[g.image_id == rep, "score"].iloc[0] == 1.0
    manifest = run.dedup_manifest("pixels").read_json()
    assert manifest["threshold"] == 0.9933 and manifest["groups"] == len(planted)
    # a part of the neighbour table gone: it is written again first, not grouped with holes
    parts = sorted((Path(str(run.root)) / "neighbours" / "model=pixels").glob("*.parquet"))
    assert len(parts) > 1
    for part in parts:
        part.unlink()
        assert main(["dedup", "--run", str(run.root)]) == 0
        assert part.exists()
        regrouped = read_dedup(str(run.root), "pixels").to_pandas()
        assert {frozenset(g.image_id) for _, g in regrouped.groupby("group")} == groups


def test_group_table_reads_whole_with_the_usual_tools(tmp_path) -> None:
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    run, planted = _planted_run(tmp_path)
    write_dedup(str(run.root))
    folder = str(run.dedup)
    want = sum(len(s) for s in planted.values())
    by_arrow = ds.dataset(folder, partitioning="hive").to_table()
    assert by_arrow.num_rows == want and set(by_arrow.column("model").to_pylist()) == {"pixels"}
    assert len(pd.read_parquet(folder)) == want
    assert pl.read_parquet(f"{folder}/**/*.parquet", hive_partitioning=True).height == want
    got = duckdb.sql(f"select count(*), count(distinct \"group\") from read_parquet('{folder}/*/*.parquet', "
                     "hive_partitioning=true) where model = 'pixels'").fetchall()[0]
    assert got == (want, len(planted))


def test_a_model_without_a_calibrated_threshold_needs_one(tmp_path, capsys) -> None:
    run = make_run(tmp_path, "m", np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32))
    with pytest.raises(ConfigError, match="pass --threshold"):
        write_dedup(str(run.root))
    assert main(["dedup", "--run", str(run.root), "--threshold", "1.5"]) == 2
    assert "between -1 and 1" in capsys.readouterr().err
    assert main(["dedup", "--run", str(run.root), "--threshold", "0.999"]) == 0
    assert read_dedup(str(run.root), "m").num_rows == 0  # random vectors: no copies


def test_the_report_lists_the_groups(tmp_path) -> None:
    from flagsim.report import build_report

    run, planted = _planted_run(tmp_path)
    write_dedup(str(run.root))
    paths = build_report(str(run.root), queries=None, k=3)
    html = Path(paths.html).read_text()
    assert html.count('<ol class="dedup" data-model="pixels">') == 1
    for members in planted.values():
        for i in members:
            assert f'data-id="{i}"' in html


def test_dedup_of_a_collection_smaller_than_k_takes_as_many_neighbours_as_it_has(tmp_path) -> None:
    """Six images and the default k=10: it refused with a k error (as `pipeline` clamps it)."""
    x = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    x[5] = x[0] * 2  # a copy of image 0 (same direction)
    run = make_run(tmp_path, "m", x)
    (result,) = write_dedup(str(run.root), threshold=0.9999)
    assert result.groups == 1
    assert sorted(read_dedup(str(run.root), "m").column("image_id").to_pylist()) == [
        "img00000", "img00005"]
    assert run.neighbours_manifest("m").read_json()["k"] == 5


def _identical_sets(dim: int = 6375) -> np.ndarray:
    """4 copies of a vector whose float32 inner product with itself comes out below 1 (about
    0.999995, like byte-identical images under colour-layout's 6,375 dims), 3 copies of one
    whose comes out above 1 (about 1.00001), and 3 unrelated vectors."""
    below = np.r_[np.full(100, 30.0), np.ones(dim - 100)]
    above = np.ones(dim)
    rng = np.random.default_rng(0)
    return np.concatenate([np.repeat(below[None], 4, 0), np.repeat(above[None], 3, 0),
                           rng.random((3, dim))]).astype(np.float32)


def test_identical_vectors_group_at_threshold_1(tmp_path, capsys) -> None:
    """Threshold 1 found 0 groups for byte-identical images (FAISS's float32 sums scored them
    0.999993) and kept 8 of 20 directed pairs of imported identical vectors: scores within
    dedup.TOLERANCE of the threshold count."""
    from flagsim.search.dedup import TOLERANCE

    assert 0 < TOLERANCE <= 1e-5
    run = make_run(tmp_path, "m", _identical_sets())
    assert main(["dedup", "--run", str(run.root), "--threshold", "1"]) == 0
    table = read_dedup(str(run.root), "m").to_pandas()
    groups = {frozenset(g.image_id) for _, g in table.groupby("group")}
    ids = [f"img{i:05d}" for i in range(10)]
    assert groups == {frozenset(ids[:4]), frozenset(ids[4:7])}
    assert table.score.max() <= 1.0 and table.score.min() >= 1.0 - TOLERANCE
    manifest = run.dedup_manifest("m").read_json()
    assert manifest["groups"] == 2 and manifest["pairs"] == 4 * 3 + 3 * 2  # directed pairs


def test_the_summary_prints_the_threshold_given_with_its_digits(tmp_path, capsys) -> None:
    """--threshold 0.9999999 was printed as `1`."""
    run = make_run(tmp_path, "m", np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32))
    assert main(["dedup", "--run", str(run.root), "--threshold", "0.9999999"]) == 0
    out = capsys.readouterr().out
    assert "0.9999999" in out
    assert run.dedup_manifest("m").read_json()["threshold"] == 0.9999999
