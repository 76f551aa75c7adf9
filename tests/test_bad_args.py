"""Bad arguments and inputs: one line on stderr, a non-zero exit, nothing heavy started."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flagsim.cli import main
from flagsim.images import bundled_table, write_images_table
from flagsim.rundir import RunDir
from flagsim.shards import Manifest, embeddings_table, write_manifest, write_shard


@pytest.fixture()
def small_run(tmp_path):
    """A run with 6 images and random `pixels`-named embeddings (no Ray, no model)."""
    run = RunDir.at(tmp_path / "run")
    table = bundled_table().slice(0, 6)
    write_images_table(table, run)
    rng = np.random.default_rng(0)
    ids = table.column("image_id").to_pylist()
    names = table.column("name").to_pylist()
    write_shard(run, "pixels", 0, embeddings_table(ids, names, "pixels", rng.normal(size=(6, 1152))))
    write_manifest(run, Manifest(model="pixels", dim=1152, rows=6, images_hash="x",
                                 shards={"part-00000.parquet": 6}))
    return tmp_path / "run"


def _one_line_error(capsys) -> str:
    """The error is exactly one line (log lines of work done before it may precede it)."""
    lines = capsys.readouterr().err.splitlines()
    err = [ln for ln in lines if ln.startswith("flagsim: error:")]
    assert len(err) == 1, lines
    assert lines[-1] == err[0] and "Traceback" not in "".join(lines)
    return err[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["embed", "--models", "pixels,nosuch", "--out", "{tmp}/r"], "unknown model 'nosuch'"),
        (["embed", "--set", "embed.bogus=1", "--out", "{tmp}/r"], "embed.bogus: unknown key"),
        (["embed", "--set", "embed.defaults.batch_size=0", "--out", "{tmp}/r"], "batch_size"),
        (["embed", "--set", "embed.settings.pixels.batch_size=-3", "--out", "{tmp}/r"], "batch_size"),
        (["embed", "--set", "embed.settings.pixels.preprocess_on=gpu", "--out", "{tmp}/r"],
         "embed.settings.pixels.preprocess_on"),
        (["embed", "--out", "{tmp}/file/r"], "not writable"),
        (["embed", "--images", "{tmp}/nope.parquet", "--out", "{tmp}/r"], "images table not found"),
    ],
)
def test_embed_bad_arguments(tmp_path, capsys, argv, expected):
    (tmp_path / "file").write_text("a file, not a directory")
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert rc == 2
    assert expected in _one_line_error(capsys)
    assert not (tmp_path / "r" / "embeddings").exists()


def test_images_table_missing_a_column(tmp_path, capsys):
    bad = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "name": ["a"]}), bad)
    rc = main(["embed", "--images", str(bad), "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "missing column(s) path" in _one_line_error(capsys)


def test_k_larger_than_collection(small_run, capsys):
    rc = main(["neighbours", "--run", str(small_run), "-k", "50"])
    assert rc == 2
    assert "k=50 is larger than the collection" in _one_line_error(capsys)
    assert not (small_run / "neighbours" / "model=pixels").exists() or not list(
        (small_run / "neighbours" / "model=pixels").glob("*.parquet"))


def test_unknown_query_name(small_run, capsys):
    rc = main(["query", "Albnia", "--run", str(small_run)])
    assert rc != 0
    msg = _one_line_error(capsys)
    assert "did you mean" in msg.lower() and "Albania" in msg


def test_unknown_model_for_index(small_run, capsys):
    rc = main(["index", "--run", str(small_run), "--models", "vit"])
    assert rc == 2
    assert "vit" in _one_line_error(capsys)


def test_subprocess_exit_code_and_single_line():
    proc = subprocess.run([sys.executable, "-m", "flagsim", "embed", "--models", "nosuch"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown model 'nosuch'" in lines[0]
