"""The run lock: one writer per run directory across real processes, stale locks taken over,
release on every exit, and a one-line error naming the holder."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from flagsim.runlock import LOCK_FILE, RunLockedError, process_start_time, run_lock
from flagsim.storage import Location

REPO = Path(__file__).resolve().parents[1]

# holds the lock of argv[1] as argv[2], says so on stdout, releases when stdin closes
HOLDER = """
import sys
from flagsim.runlock import run_lock
from flagsim.storage import Location
with run_lock(Location.parse(sys.argv[1]), sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()
print("released", flush=True)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@contextmanager
def holder(run: Path, what: str = "flagsim embed") -> Iterator[subprocess.Popen]:
    """A real subprocess holding the run lock until the block ends (or it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), what], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        line = proc.stdout.readline().strip()
        assert line == "locked", proc.stderr.read()
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=60)


def _lock(run: Path) -> dict:
    return json.loads((run / LOCK_FILE).read_text())


def test_second_process_fails_at_once_naming_the_holder(tmp_path) -> None:
    from runs import make_run

    vectors = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    make_run(tmp_path, "m", vectors)
    with holder(tmp_path) as first:
        record = _lock(tmp_path)
        assert record["pid"] == first.pid and record["command"] == "flagsim embed"
        assert record["host"] == socket.gethostname()
        assert record["start_time"] == process_start_time(first.pid)
        # a second process, the real CLI: one line naming the holder, no index written
        second = subprocess.run([sys.executable, "-m", "flagsim", "index", "--run", str(tmp_path)],
                                capture_output=True, text=True, env=_env(), timeout=300)
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()[-1]
        assert re.fullmatch(
            re.escape(f"flagsim: error: run directory {tmp_path} is in use by 'flagsim embed' "
                      f"(pid {first.pid} on host {socket.gethostname()} since ")
            + r"(\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d"
            + re.escape(f"); wait for it or remove {tmp_path / LOCK_FILE} if that process is gone"),
            err,
        ), err
        assert "Traceback" not in second.stderr
        assert not (tmp_path / "index" / "model=m" / "_manifest.json").exists()
        # and this process too
        with pytest.raises(RunLockedError, match=rf"in use by 'flagsim embed' \(pid {first.pid} "):
            with run_lock(Location.parse(str(tmp_path)), "flagsim embed"):
                pass
        assert _lock(tmp_path)["pid"] == first.pid  # the holder's lock is left alone
    assert first.stdout.read().strip() == "released"
    assert not (tmp_path / LOCK_FILE).exists()
    with run_lock(Location.parse(str(tmp_path)), "flagsim embed"):  # free again
        assert _lock(tmp_path)["pid"] == os.getpid()


def test_a_second_neighbours_on_one_run_fails_at_once(tmp_path) -> None:
    """Two `flagsim neighbours` on one run each held a search actor: on a 2-CPU cluster neither
    job's reads could run and both hung forever. The second now fails at once."""
    from runs import make_run

    vectors = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    make_run(tmp_path, "m", vectors)
    from flagsim.cli import main
    assert main(["index", "--run", str(tmp_path)]) == 0  # fresh, as a first neighbours leaves it
    with holder(tmp_path, "flagsim neighbours") as first:
        second = subprocess.run([sys.executable, "-m", "flagsim", "neighbours", "--run",
                                 str(tmp_path), "-k", "3"],
                                capture_output=True, text=True, env=_env(), timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        err = second.stderr.strip().splitlines()[-1]
        assert f"is in use by 'flagsim neighbours' (pid {first.pid} " in err, err
        assert not (tmp_path / "neighbours").exists()
        assert "starting an embedded local Ray" not in second.stderr  # refused before Ray


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path, caplog) -> None:
    with holder(tmp_path) as dead:
        dead.send_signal(signal.SIGKILL)  # no chance to release
        dead.wait(timeout=60)
    assert _lock(tmp_path)["pid"] == dead.pid  # left behind
    with run_lock(Location.parse(str(tmp_path)), "flagsim index"):
        record = _lock(tmp_path)
        assert record["pid"] == os.getpid() and record["command"] == "flagsim index"
    assert f"taking over the stale lock {tmp_path / LOCK_FILE} of 'flagsim embed' " \
           f"(pid {dead.pid} is not running)" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".stale")]


def test_lock_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path, caplog) -> None:
    with holder(tmp_path / "other") as alive:  # some live process on this host
        record = _lock(tmp_path / "other")
        record["start_time"] -= 1000  # the lock's holder started long before this pid's process
        (tmp_path / LOCK_FILE).write_text(json.dumps(record))
        with run_lock(Location.parse(str(tmp_path)), "flagsim embed"):
            assert _lock(tmp_path)["pid"] == os.getpid()
        assert f"pid {alive.pid} is now another process" in caplog.text


def test_lock_held_on_another_host_is_never_taken_over(tmp_path) -> None:
    record = {"host": "elsewhere", "pid": 1, "start_time": 1.0, "command": "flagsim embed",
              "time": 0, "token": "t"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(RunLockedError, match=r"in use by 'flagsim embed' \(pid 1 on host elsewhere"):
        with run_lock(Location.parse(str(tmp_path)), "flagsim embed"):
            pass
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == record


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_lock_is_released_on_exceptions_and_interrupts(tmp_path, exc) -> None:
    with pytest.raises(exc):
        with run_lock(Location.parse(str(tmp_path / "new-run")), "flagsim embed"):
            assert (tmp_path / "new-run" / LOCK_FILE).exists()  # the run dir is created
            raise exc("stop")
    assert not (tmp_path / "new-run" / LOCK_FILE).exists()


def test_nested_acquire_in_one_process_fails_clearly(tmp_path) -> None:
    root = Location.parse(str(tmp_path))
    with run_lock(root, "flagsim pipeline"):
        with pytest.raises(RunLockedError) as err:
            with run_lock(root, "flagsim index --models m"):
                pass
        assert re.fullmatch(
            re.escape(f"run directory {tmp_path} is already locked by this process for "
                      "'flagsim pipeline' (since ")
            + r"(\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d"
            + re.escape("); 'flagsim index --models m' cannot lock it again inside it"),
            str(err.value),
        ), str(err.value)
        assert _lock(tmp_path)["command"] == "flagsim pipeline"  # the outer lock stands
    assert not (tmp_path / LOCK_FILE).exists()


def test_an_index_commit_waits_for_a_sibling_index_commit_but_not_for_other_writers(tmp_path
                                                                                    ) -> None:
    import threading
    import time

    root = Location.parse(str(tmp_path))
    with holder(tmp_path, "flagsim index --models a") as first:
        threading.Timer(1.0, first.stdin.close).start()  # the sibling's commit ends in 1 s
        start = time.monotonic()
        with run_lock(root, "flagsim index --models b", wait_for="flagsim index", wait_s=60):
            waited = time.monotonic() - start
            assert _lock(tmp_path)["command"] == "flagsim index --models b"
        assert 0.8 < waited < 30
    assert first.stdout.read().strip() == "released"
    with holder(tmp_path, "flagsim index --models a") as first:
        start = time.monotonic()  # a sibling that does not finish in time: refused after wait_s
        with pytest.raises(RunLockedError, match="in use by 'flagsim index --models a'"):
            with run_lock(root, "flagsim index --models b", wait_for="flagsim index", wait_s=0.5):
                pass
        assert time.monotonic() - start >= 0.5
    with holder(tmp_path, "flagsim embed"):  # another kind of writer: refused at once
        start = time.monotonic()
        with pytest.raises(RunLockedError, match="in use by 'flagsim embed'"):
            with run_lock(root, "flagsim index --models b", wait_for="flagsim index", wait_s=60):
                pass
        assert time.monotonic() - start < 5


def test_unreadable_lock_is_a_one_line_error(tmp_path) -> None:
    (tmp_path / LOCK_FILE).write_text("{not json")
    with pytest.raises(RunLockedError, match=r"has an unreadable lock .*_lock\.json; remove it if"):
        with run_lock(Location.parse(str(tmp_path)), "flagsim embed"):
            pass


def test_lock_on_an_object_store_run() -> None:
    from s3server import patched_environ, running_s3

    with running_s3() as s3, patched_environ(s3.env):
        root = Location.parse(f"s3://{s3.new_bucket()}/run")
        lock = root / LOCK_FILE
        with run_lock(root, "flagsim embed"):
            assert lock.read_json()["pid"] == os.getpid()
            with pytest.raises(RunLockedError, match="already locked by this process"):
                with run_lock(root, "flagsim index"):
                    pass
        assert not lock.exists()
        # a dead holder on this host is taken over there too
        lock.write_json({"host": socket.gethostname(), "pid": 2**22 + 12345, "start_time": 1.0,
                         "command": "flagsim embed", "time": 0, "token": "old"})
        with run_lock(root, "flagsim index"):
            assert lock.read_json()["command"] == "flagsim index"
        assert not lock.exists()


def test_commands_on_a_run_whose_first_embed_is_running_name_the_embed(tmp_path, capsys) -> None:
    """`flagsim index` (or query, neighbours) while the run's first `flagsim embed` writes it:
    no model is complete yet, and the error says who is writing instead of 'run flagsim embed'."""
    from flagsim.cli import main

    shard_dir = tmp_path / "embeddings" / "model=pixels"
    shard_dir.mkdir(parents=True)  # shards being written, no manifest yet
    with holder(tmp_path, "flagsim embed --models pixels"):
        assert main(["index", "--run", str(tmp_path)]) == 2
        lines = capsys.readouterr().err.splitlines()
        errors = [ln for ln in lines if "error" in ln]
        assert len(errors) == 1 and errors[0].startswith("flagsim: error: no embeddings in")
        err = errors[0]
        assert "is in use by 'flagsim embed --models pixels' (pid" in err and "wait for it" in err
        warned = [ln for ln in lines if "skipping pixels" in ln]
        assert warned and f"embeddings of model pixels in {shard_dir} are incomplete (no " \
            "manifest)" in warned[0] and "wait for it" in warned[0], warned
    assert main(["index", "--run", str(tmp_path)]) == 2  # released: the usual advice
    assert "run `flagsim embed` or `flagsim import-csv` first" in capsys.readouterr().err
