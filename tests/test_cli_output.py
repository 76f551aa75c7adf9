"""Console output of the CLI: full width on pipes, names shown literally, lazy imports, disk errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from flagsim.cli import COMMANDS, main
from flagsim.console import plain, safe
from flagsim.images import bundled_table, write_images_table
from flagsim.pipeline.embed import STREAM_NOTE, EmbedSummary, ModelResult, print_summary
from flagsim.rundir import RunDir
from flagsim.shards import Manifest, embeddings_table, write_manifest, write_shard
from flagsim.storage import Location

REPO = Path(__file__).resolve().parents[1]
#: A name that is rich markup (a hyperlink, a style), an OSC-8 hyperlink and an SGR colour.
HOSTILE = "[link=https://x]click[/link] [bold red]Evil\x1b]8;;http://evil\x1b\\ \x1b[31mred"
LONG = "a_directory_name_long_enough_that_eighty_columns_cannot_hold_it_" * 2


def small_run(root: Path, n: int = 6, names: dict[str, str] | None = None) -> Path:
    """A run of `n` bundled flags (names overridden by `names`, id -> name) with random
    `pixels`-named embeddings: no Ray, no model."""
    run = RunDir.at(root)
    table = bundled_table().slice(0, n)
    ids = table.column("image_id").to_pylist()
    shown = [(names or {}).get(i, n) for i, n in zip(ids, table.column("name").to_pylist(), strict=True)]
    table = table.set_column(table.schema.get_field_index("name"), "name", pa.array(shown))
    write_images_table(table, run)
    vectors = np.random.default_rng(0).normal(size=(n, 48)).astype(np.float32)
    write_shard(run, "pixels", 0, embeddings_table(ids, shown, "pixels", vectors))
    write_manifest(run, Manifest(model="pixels", dim=48, rows=n, images_hash="x",
                                 shards={"part-00000.parquet": n}))
    return root


def flagsim(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m flagsim ARGS` with stdout and stderr piped (not a terminal)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80"}
    env.pop("FORCE_COLOR", None)
    return subprocess.run([sys.executable, "-m", "flagsim", *args], capture_output=True,
                          timeout=300, env=env, cwd=cwd)


# --- full width on pipes (item 1) ---------------------------------------------------------------


def test_piped_output_keeps_long_paths_and_cells_whole(tmp_path):
    run = small_run(tmp_path / LONG / "run")
    proc = flagsim("neighbours", "--run", str(run), "-k", "3")
    assert proc.returncode == 0, proc.stderr
    out, err = proc.stdout.decode(), proc.stderr.decode()
    path = str(run / "neighbours" / "model=pixels")
    assert any(path in line for line in out.splitlines()), out  # a table cell, whole
    assert "…" not in out
    # the log line naming the index it wrote holds the whole path too
    assert any(f"{run}/index/model=pixels" in line for line in err.splitlines()), err


def test_models_table_piped_shows_every_weights_source_whole():
    proc = flagsim("models")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    rows = [json.loads(line) for line in flagsim("models", "--json").stdout.decode().splitlines()]
    for r in rows:
        src = r["weights"] or "none (weight-free)"
        line = next(ln for ln in out.splitlines() if f" {r['name']} " in ln)
        assert src in line, line
    assert "…" not in out


# --- names shown literally (item 2) -------------------------------------------------------------


def test_plain_and_safe_make_controls_visible_and_markup_literal():
    assert plain("a\x00b\x1b[31m\x7f\x9b\n\u202e") == "a\\x00b\\x1b[31m\\x7f\\x9b\\x0a\\u202e"
    assert safe("[bold]x[/bold]") == "\\[bold]x\\[/bold]"
    from rich.console import Console

    console = Console(width=200, force_terminal=True, color_system="truecolor")
    with console.capture() as cap:
        console.print(safe(HOSTILE), highlight=False)
    assert cap.get() == plain(HOSTILE) + "\n"  # no hyperlink, no style: the text as it is


@pytest.fixture()
def hostile_run(tmp_path) -> Path:
    return small_run(tmp_path / "run", names={"Afghanistan": HOSTILE})


@pytest.mark.parametrize(
    "argv",
    [
        ["query", "Albania", "-k", "5"],  # the hostile name is a hit
        ["query", "Afghanistan", "-k", "3"],  # the hostile name is the query (table title)
        ["compare", "Afghanistan", "Albania", "-k", "3"],
        ["neighbours", "-k", "2"],
        ["report", "--queries", "Afghanistan,Nowhere", "-k", "2"],
    ],
)
def test_names_print_literally_without_escape_sequences(hostile_run, capsys, argv):
    assert main([*argv, "--run", str(hostile_run)]) == 0
    cap = capsys.readouterr()
    assert "\x1b" not in cap.out and "\x1b" not in cap.err
    if argv[0] in ("query", "compare"):
        assert "[link=https://x]click[/link] [bold red]Evil\\x1b]8;;http://evil" in cap.out


def test_log_lines_show_names_literally(hostile_run, capsys):
    """A warning that quotes a name (compare: a query missing from a model) shows it escaped."""
    other = RunDir.at(hostile_run)
    table = bundled_table().slice(1, 5)  # another model without the hostile image
    write_shard(other, "other", 0, embeddings_table(
        table.column("image_id").to_pylist(), table.column("name").to_pylist(), "other",
        np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)))
    write_manifest(other, Manifest(model="other", dim=8, rows=5, images_hash="x",
                                   shards={"part-00000.parquet": 5}))
    assert main(["compare", "Afghanistan", "-k", "2", "--run", str(hostile_run)]) == 0
    err = capsys.readouterr().err
    assert "\x1b" not in err
    assert "Evil\\x1b]8;;http://evil" in err and "is not among model other's embeddings" in err


def test_error_line_shows_controls_escaped(hostile_run, capsys):
    assert main(["query", "no\x1b[31msuch", "--run", str(hostile_run)]) != 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and err.count("\n") == 1


# --- embed summary (item 3) ---------------------------------------------------------------------


def test_embed_summary_labels_the_shared_stream_time(capsys):
    summary = EmbedSummary("run", 197, [
        ModelResult("efficientnet_lite0", "embedded", 197, 1280, "cpu", "float32", 23.5, 8.4),
        ModelResult("pixels", "embedded", 197, 1152, "cpu", "float32", 23.5, 8.4),
    ])
    print_summary(summary)
    out = capsys.readouterr().out
    header = next(ln for ln in out.splitlines() if "model" in ln and "status" in ln)
    assert "stream s" in header and "stream images/s" in header
    assert "seconds" not in header
    assert STREAM_NOTE in out
    assert "efficientnet_lite0" in out  # not cut to `efficient…`


# --- k against a small collection (item 6) -----------------------------------------------------


def test_pipeline_on_five_images_clamps_k_and_writes_everything(tmp_path, capsys, bundled_dir,
                                                                  ray_local):
    folder = tmp_path / "five"
    folder.mkdir()
    for p in sorted((bundled_dir / "images").glob("*.png"))[:5]:
        shutil.copy(p, folder)
    run = tmp_path / "run"
    assert main(["pipeline", "--set", "embed.models=[pixels]", "--set", "images.source=folder",
                 "--set", f"images.path={folder}", "--run", str(run), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "neighbours.k=10 clamped to 4 (the collection has 5 images)" in cap.err
    assert "report.k=5 clamped to 4 (the collection has 5 images)" in cap.err
    assert "neighbours pixels: top-4 of 5 images" in cap.out and "report -> " in cap.out
    assert (run / "report.html").is_file() and (run / "report.png").is_file()
    # the report on its own clamps its default k (5) the same way
    (run / "report.html").unlink()
    assert main(["report", "--run", str(run)]) == 0
    assert "k=5 clamped to 4 (the collection has 5 images)" in capsys.readouterr().err
    assert (run / "report.html").is_file()


def test_pipeline_refuses_a_single_image_before_any_work(tmp_path, capsys, bundled_dir):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(sorted((bundled_dir / "images").glob("*.png"))[0], folder)
    run = tmp_path / "run"
    assert main(["pipeline", "--set", "embed.models=[pixels]", "--set", "images.source=folder",
                 "--set", f"images.path={folder}", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "flagsim: error: the collection has 1 image(s); neighbours need at least 2"
    assert not (run / "embeddings").exists()


# --- lazy imports (item 4) ----------------------------------------------------------------------

HEAVY = ("bs4", "requests", "torch", "ray", "pyarrow.dataset", "faiss", "pydantic", "transformers",
         "timm")


def _imported_by(code: str) -> list[str]:
    probe = (f"import sys\n{code}\n"
             f"print(__import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_top_level_help_imports_no_command_module():
    code = ("from flagsim.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert _imported_by(code) == []


def test_query_by_name_imports_neither_scraper_nor_ray_nor_torch(hostile_run):
    code = (f"from flagsim.cli import main\nassert main(['query', 'Albania', '--run', "
            f"{str(hostile_run)!r}]) == 0")
    assert set(_imported_by(code)) <= {"pydantic", "faiss", "pyarrow.dataset"}  # what it reads with


def test_every_command_is_listed_and_its_own_help_has_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, (_, help_) in COMMANDS.items():
        assert name in out and help_.split()[0] in out
    for argv, option in ((["scrape", "--help"], "--max-bytes"), (["query", "--help"], "--image"),
                         (["import-csv", "--help"], "--checkpoint")):
        with pytest.raises(SystemExit):
            main(argv)
        assert option in capsys.readouterr().out


def test_pipeline_help_names_every_stage_it_runs(capsys):
    """pipeline also writes the dedup tables of the calibrated models (the report shows them)."""
    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "embed, index, neighbours, dedup" in out and "and report" in out


def test_command_table_help_matches_each_modules_parser():
    """cli.COMMANDS repeats each module's help line (so --help needs no import): keep them equal."""
    import argparse
    import importlib

    for name, (module, help_) in COMMANDS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"flagsim.commands.{module}").add_parser(sub)
        (action,) = sub._choices_actions
        assert (action.dest, action.help) == (name, help_)


# --- read-only and full disks (item 8) ----------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_only(path: Path, *argv: str) -> subprocess.CompletedProcess:
    """`python -m flagsim ARGV` with `path` mounted read-only (a private mount namespace)."""
    script = (f'mount --bind "{path}" "{path}" && mount -o remount,ro,bind "{path}" && '
              f'exec "{sys.executable}" -m flagsim "$@"')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *argv], capture_output=True,
                          text=True, timeout=300, env=env)


def _can_mount_read_only(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    d = tmp_path / "probe"
    d.mkdir()
    script = f'mount --bind "{d}" "{d}" && mount -o remount,ro,bind "{d}" && touch "{d}/x"'
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True)
    return "Read-only file system" in proc.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["neighbours"], "is not writable"),
        (["index", "--force"], "is not writable"),
        (["report", "--queries", "Albania"], "is not writable"),
        # the index is built on demand: its files stage under _tmp/ first
        (["query", "Albania"], "cannot write {run}/_tmp/.index-"),
    ],
)
def test_read_only_run_is_one_line_and_changes_nothing(tmp_path, argv, expected):
    if not _can_mount_read_only(tmp_path):
        pytest.skip("no unprivileged read-only bind mounts here")
    run = small_run(tmp_path / "run")
    if argv[0] != "query":
        assert main(["index", "--run", str(run)]) == 0
    before = _files(run)
    proc = _read_only(run, *argv, "--run", str(run))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("flagsim: error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert expected.format(run=run) in lines[-1]
    assert [ln for ln in lines if ln.startswith("flagsim")] == [lines[-1]]
    assert _files(run) == before


def _full_disk(monkeypatch, suffix: str) -> None:
    """Writes of files ending in `suffix` fail like a full disk does (on the temp file)."""
    real = Location.write_bytes

    def write_bytes(self: Location, data: bytes, **kwargs) -> None:
        if self.name.endswith(suffix):
            tmp = f"{self.parent.path}/.{self.name}.{'0' * 32}.tmp"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
        real(self, data, **kwargs)

    monkeypatch.setattr(Location, "write_bytes", write_bytes)


def test_full_disk_in_report_keeps_the_previous_report(tmp_path, capsys, monkeypatch):
    run = small_run(tmp_path / "run")
    assert main(["report", "--run", str(run), "--queries", "Albania", "-k", "2"]) == 0
    before = _files(run)
    _full_disk(monkeypatch, ".html")
    capsys.readouterr()
    assert main(["report", "--run", str(run), "--queries", "Andorra", "-k", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"flagsim: error: cannot write {run}/report.html: No space left on device"
    assert not any("Traceback" in ln for ln in err)
    assert _files(run) == before


def test_full_disk_in_neighbours_is_one_line(tmp_path, capsys, monkeypatch):
    run = small_run(tmp_path / "run")
    assert main(["index", "--run", str(run)]) == 0
    _full_disk(monkeypatch, ".parquet")
    assert main(["neighbours", "--run", str(run), "-k", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # (parts are staged until the table's last one is written: docs/layout.md)
    assert err[-1].startswith(f"flagsim: error: cannot write {run}/_tmp/neighbours/model=pixels/")
    assert err[-1].endswith(": No space left on device")


def test_os_error_from_pyarrow_names_the_file():
    from flagsim.cli import os_error_line

    exc = OSError(errno.EROFS, "Failed to open local file '/r/x.parquet'. Detail: [errno 30] "
                  "Read-only file system")
    assert os_error_line(exc) == "cannot write /r/x.parquet: Read-only file system"


# stdout is a pipe whose reader has gone (`flagsim models --json | head -c 100`), the read end
# closed before anything is written, so the write fails every time (a real `| head` races)
CUT_PIPE = """
import os, sys
read, write = os.pipe()
os.close(read)
os.dup2(write, 1)
from flagsim.cli import main
sys.exit(main(["models", "--json"]))
"""


def test_output_cut_short_by_its_reader_exits_quietly_as_sigpipe() -> None:
    proc = subprocess.run([sys.executable, "-c", CUT_PIPE], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 141, proc.stderr  # 128 + SIGPIPE, as `git log | head` ends
    assert proc.stderr == ""  # no "flagsim: error: Broken pipe", no flush error at exit


def test_ctrl_c_while_a_command_loads_is_one_line(monkeypatch, capsys):
    # Ctrl-C in the first seconds (modules loading, arguments parsed) printed a traceback
    from flagsim import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["models"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["flagsim: interrupted"]
