"""Every table folder of a run reads whole, the model as a column, with pandas, pyarrow, polars
and DuckDB: the recipes of docs/layout.md, run against a real run of two models."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from flagsim.config import load_config
from flagsim.images import bundled_flags_dir, from_folder, write_images_table
from flagsim.pipeline.embed import run_embed
from flagsim.rundir import RunDir
from flagsim.search.neighbours import write_neighbours
from flagsim.shards import read_embeddings

MODELS = ("efficientnet-lite0", "pixels")  # 1280-d and 1152-d: the folders differ in dimension
K = 3


@pytest.fixture(scope="module")
def two_model_run(tmp_path_factory, ray_local) -> Path:
    root = tmp_path_factory.mktemp("layout")
    folder = root / "imgs"
    folder.mkdir()
    for png in sorted((bundled_flags_dir() / "images").glob("*.png"))[:12]:
        shutil.copy(png, folder / png.name)
    (folder / "Broken.png").write_bytes(b"not a png")  # one row for the errors table
    run = root / "run"
    write_images_table(from_folder(folder), RunDir.at(run))
    cfg = load_config(None, [f"embed.models=[{','.join(MODELS)}]", "embed.shard_size=5",
                             "ray.read_cpus=1"])
    summary = run_embed(cfg, run_dir=str(run), show_progress=False)
    assert [summary.result(m).status for m in MODELS] == ["embedded", "embedded"]
    write_neighbours(str(run), k=K, cfg=cfg)
    return run


def _expected(run: Path) -> dict[str, object]:
    return {m: read_embeddings(RunDir.at(run), m) for m in MODELS}


def test_table_folders_hold_parquet_files_only(two_model_run: Path) -> None:
    for table in ("embeddings", "neighbours", "errors"):
        files = [p for p in (two_model_run / table).rglob("*") if p.is_file()]
        assert files, table
        assert all(p.suffix == ".parquet" and not p.name.startswith((".", "_")) for p in files), files


def test_embeddings_read_whole_with_every_reader(two_model_run: Path) -> None:
    want = _expected(two_model_run)
    n = sum(len(e.ids) for e in want.values())
    where = str(two_model_run / "embeddings")
    frames = {
        "pandas": pd.read_parquet(where),
        "pyarrow read_table": pq.read_table(where).to_pandas(),
        "pyarrow dataset": pads.dataset(where, partitioning="hive").to_table().to_pandas(),
        "polars read": pl.read_parquet(where).to_pandas(),
        "polars scan": pl.scan_parquet(where).collect().to_pandas(),
        "duckdb": duckdb.sql(
            f"SELECT * FROM read_parquet('{where}/**/*.parquet', hive_partitioning = true)").df(),
    }
    for reader, df in frames.items():
        assert len(df) == n, reader
        assert set(df["model"].astype(str)) == set(MODELS), reader
        for m, emb in want.items():
            part = df[df["model"].astype(str) == m].set_index("image_id").loc[emb.ids]
            got = np.stack([np.asarray(v, dtype=np.float32) for v in part["embedding"]])
            np.testing.assert_array_equal(got, emb.vectors, err_msg=f"{reader} {m}")


def test_one_model_folder_and_a_filter_read_alone(two_model_run: Path) -> None:
    want = _expected(two_model_run)["pixels"]
    where = two_model_run / "embeddings"
    assert pl.read_parquet(where / "model=pixels").height == len(want.ids)
    assert pd.read_parquet(where / "model=pixels").shape[0] == len(want.ids)
    filtered = pq.read_table(str(where), filters=[("model", "=", "pixels")])
    assert filtered.num_rows == len(want.ids)
    assert set(filtered.column("model").to_pylist()) == {"pixels"}


def test_neighbours_read_whole_with_every_reader(two_model_run: Path) -> None:
    want = {m: _expected(two_model_run)[m] for m in MODELS}
    common = set.intersection(*(set(e.ids) for e in want.values()))  # the ensemble's images
    n = sum(len(e.ids) * K for e in want.values()) + len(common) * K
    where = str(two_model_run / "neighbours")
    frames = {
        "pandas": pd.read_parquet(where),
        "pandas filter": pd.read_parquet(where, filters=[("model", "=", "pixels")]),
        "pyarrow read_table": pq.read_table(where).to_pandas(),
        "pyarrow dataset": pads.dataset(where, partitioning="hive").to_table().to_pandas(),
        "polars read": pl.read_parquet(where).to_pandas(),
        "polars scan": pl.scan_parquet(where).filter(pl.col("rank") <= K).collect().to_pandas(),
        "duckdb": duckdb.sql(
            f"SELECT * FROM read_parquet('{where}/**/*.parquet', hive_partitioning = true)").df(),
    }
    for reader, df in frames.items():
        models = {"pixels"} if reader == "pandas filter" else {*MODELS, "all"}
        assert set(df["model"].astype(str)) == models, reader
        assert len(df) == (len(want["pixels"].ids) * K if reader == "pandas filter" else n), reader
        assert (df["query_id"] != df["neighbour_id"]).all(), reader
        assert sorted(set(df["rank"])) == list(range(1, K + 1)), reader


def test_errors_table_reads_whole(two_model_run: Path) -> None:
    where = str(two_model_run / "errors")
    for df in (pd.read_parquet(where), pl.read_parquet(f"{where}/**/*.parquet").to_pandas(),
               duckdb.sql(f"SELECT * FROM read_parquet('{where}/**/*.parquet')").df()):
        assert list(df["image_id"]) == ["Broken"]
        assert df["stage"].iloc[0] == "decode"


#: Model names users give `import-csv` / `import-embeddings`: each is either refused, or every
#: reader gives the folder `model=<name>` back as that very string (alone in its table folder,
#: as after importing one model and writing its neighbours or dedup table).
NAME_CANDIDATES = ("pixels", "my-model", "vgg16", "efficientnet-lite0-ms", "clip+text", "v1.5",
                   "e5", "nan1", "null", "none", "Jan-1", "2024", "001", "1e3", "0x1", "1.5",
                   "2024-1-1", "12.5.1", "true", "False", "NaN", "inf", "Infinity", "epoch")


def _model_values(table: Path) -> dict[str, object]:
    where = str(table)
    return {
        "pandas": pd.read_parquet(where)["model"].iloc[0],
        "pyarrow": pq.read_table(where).column("model").to_pylist()[0],
        "pyarrow dataset": pads.dataset(where, partitioning="hive").to_table()
        .column("model").to_pylist()[0],
        "polars read": pl.read_parquet(f"{where}/**/*.parquet", hive_partitioning=True)["model"][0],
        "polars scan": pl.scan_parquet(where).collect()["model"][0],
        "duckdb": duckdb.sql(f"SELECT model FROM read_parquet('{where}/**/*.parquet', "
                             "hive_partitioning = true)").fetchall()[0][0],
    }


def test_an_accepted_model_name_reads_back_as_itself_with_every_reader(tmp_path) -> None:
    from flagsim.errors import DataError
    from flagsim.importcsv import check_model_name

    accepted = []
    for name in NAME_CANDIDATES:
        try:
            check_model_name(name)
        except DataError:
            continue
        accepted.append(name)
        table = tmp_path / name / "neighbours"
        (table / f"model={name}").mkdir(parents=True)
        pq.write_table(pa.table({"query_id": ["a"]}), table / f"model={name}" / "part-00000.parquet")
        for reader, value in _model_values(table).items():
            assert value == name and isinstance(value, str), (name, reader, value)
    assert {"pixels", "my-model", "clip+text", "v1.5", "e5"} <= set(accepted)
    for refused in ("2024", "1e3", "inf", "true", "epoch", "NaN"):
        with pytest.raises(DataError, match="invalid model name"):
            check_model_name(refused)
