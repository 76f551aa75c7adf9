"""Bad arguments and inputs: one line on stderr, a non-zero exit, nothing heavy started."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from resource_cases import RESOURCE_CASES

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
        (["embed", "--models", "pixels,nosuch", "--run", "{tmp}/r"], "unknown model 'nosuch'"),
        (["embed", "--set", "embed.bogus=1", "--run", "{tmp}/r"], "embed.bogus: unknown key"),
        (["embed", "--set", "embed.defaults.batch_size=0", "--run", "{tmp}/r"], "batch_size"),
        (["embed", "--set", "embed.settings.pixels.batch_size=-3", "--run", "{tmp}/r"], "batch_size"),
        (["embed", "--set", "embed.settings.pixels.preprocess_on=gpu", "--run", "{tmp}/r"],
         "embed.settings.pixels.preprocess_on"),
        (["embed", "--run", "{tmp}/file/r"], "not writable"),
        (["embed", "--images", "{tmp}/nope.parquet", "--run", "{tmp}/r"], "images table not found"),
    ],
)
def test_embed_bad_arguments(tmp_path, capsys, argv, expected):
    (tmp_path / "file").write_text("a file, not a directory")
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert rc == 2
    assert expected in _one_line_error(capsys)
    assert not (tmp_path / "r" / "embeddings").exists()


@pytest.mark.parametrize("command", ["embed", "pipeline"])
@pytest.mark.parametrize("case", sorted(RESOURCE_CASES))
def test_cli_checks_resources_before_ray(tmp_path, capsys, command, case):
    """`flagsim embed` and `flagsim pipeline` refuse what the jobs refuse, before Ray starts
    (the check was in jobs/_common.py only)."""
    import ray

    args, expected = RESOURCE_CASES[case]
    was_up = ray.is_initialized()
    rc = main([command, *args, "--run", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2
    assert expected in _one_line_error(capsys)
    assert ray.is_initialized() == was_up  # no Ray was started for it
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["embed", "pipeline"])
def test_old_out_spelling_of_the_run_directory_still_works_with_one_warning(
    tmp_path, capsys, command
):
    """`--out RUN_DIR` (scripted by users) still names the run directory, with one deprecation
    line after the work; a model whose weights are missing is skipped, so no Ray is needed."""
    run = tmp_path / "r"
    rc = main([command, "--set", "embed.models=[vit]",
               "--set", f"embed.settings.vit.weights={tmp_path / 'no-such-weights'}",
               "--out", str(run), "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err.splitlines()
    notes = [ln for ln in err if "deprecated" in ln]
    assert len(notes) == 1 and notes[0].endswith(
        f"flagsim {command}: --out RUN_DIR is deprecated, use --run RUN_DIR"), err
    assert (run / "images.parquet").is_file()  # the run directory is where --out said


def test_deprecation_line_is_not_added_to_an_error(tmp_path, capsys):
    rc = main(["embed", "--set", "embed.bogus=1", "--out", str(tmp_path / "r")])
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [
        "flagsim: error: --set: embed.bogus: unknown key"]


def test_images_table_missing_a_column(tmp_path, capsys):
    bad = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "name": ["a"]}), bad)
    rc = main(["embed", "--images", str(bad), "--run", str(tmp_path / "r")])
    assert rc == 2
    assert "missing column(s) path" in _one_line_error(capsys)


def test_k_larger_than_collection(small_run, capsys):
    rc = main(["neighbours", "--run", str(small_run), "-k", "50"])
    assert rc == 2
    assert "k=50 is larger than the collection" in _one_line_error(capsys)
    assert not (small_run / "neighbours" / "model=pixels").exists() or not list(
        (small_run / "neighbours" / "model=pixels").glob("*.parquet"))


@pytest.mark.parametrize("command", [["neighbours"], ["report"],
                                     ["search", "--queries", "q.parquet", "--out", "o"]])
def test_a_bad_option_value_is_named_by_its_option(small_run, capsys, command):
    # it said `arguments: neighbours.k: Input should be greater than 0` (a key nobody typed)
    rc = main([*command, "--run", str(small_run), "-k", "0"])
    assert rc == 2
    assert _one_line_error(capsys).endswith("error: -k 0: Input should be greater than 0")


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
