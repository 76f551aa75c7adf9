"""Reliability: odd images, a killed actor, a SIGKILLed job, corrupt outputs (real local Ray)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pytest
from imagegen import DECODABLE, bad_corpus

from flagsim.cli import main
from flagsim.config import load_config
from flagsim.images import bundled_table, from_folder, write_images_table
from flagsim.pipeline.embed import run_embed
from flagsim.pipeline.reader import read_shards
from flagsim.rundir import RunDir
from flagsim.shards import read_embeddings, read_manifest

pytestmark = pytest.mark.ray

#: The read stage's function, in the name of a Ray worker that runs it (fused into an actor).
READ_STAGE = read_shards.__name__

GOOD = ["Chad", "Romania", "Japan", "Nepal", "Australia", "New_Zealand", "Indonesia", "Monaco"]


def _cfg(*sets: str):
    return load_config(None, ["ray.read_cpus=1", *sets])


def _folder(root: Path, bundled_dir: Path, names=GOOD) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(bundled_dir / "images" / f"{n}.png", root / f"{n}.png")
    return root


def _vectors(run: Path, model: str) -> dict[str, np.ndarray]:
    s = read_embeddings(RunDir.at(run), model)
    return {i: s.vectors[k] for k, i in enumerate(s.ids)}


def test_bad_images_mixed_in_embed_or_report_and_good_ones_are_unchanged(tmp_path, bundled_dir, ray_local):
    mixed = _folder(tmp_path / "mixed", bundled_dir)
    for name, data in bad_corpus(bundled_dir / "images" / "Peru.png").items():
        (mixed / name).write_bytes(data)
    clean = _folder(tmp_path / "clean", bundled_dir)
    cfg = _cfg("embed.models=[efficientnet-lite0,pixels]", "embed.shard_size=8")
    runs = {}
    for label, folder in (("mixed", mixed), ("clean", clean)):
        run = tmp_path / f"run_{label}"
        write_images_table(from_folder(folder), RunDir.at(run))
        run_embed(cfg, run_dir=str(run), show_progress=False)
        runs[label] = run

    errs = pd.concat(pd.read_parquet(f) for f in (runs["mixed"] / "errors" / "embed").glob("*.parquet"))
    failed = set(errs["image_id"])
    ids = {}
    for r in from_folder(mixed).to_pylist():
        ids[r["path"].rsplit("/", 1)[-1]] = r["image_id"]
    corpus = bad_corpus(bundled_dir / "images" / "Peru.png")
    decodable = {ids[n] for n in DECODABLE}
    assert failed == {ids[n] for n in corpus} - decodable
    assert {"truncated.png", "truncated.jpg", "bomb", "zero_bytes", "page", "vector"} <= failed
    assert all(r and "\n" not in r for r in errs["reason"])
    for model in ("efficientnet-lite0", "pixels"):
        got = _vectors(runs["mixed"], model)
        ref = _vectors(runs["clean"], model)
        assert set(got) == set(GOOD) | decodable
        for image_id in GOOD:  # bit-identical to the run without the bad files
            np.testing.assert_array_equal(got[image_id], ref[image_id])


def _embed_actors() -> list[tuple[int, str]]:
    """(pid, command line) of the live embedding actor processes, fused ones first.

    Actors of an earlier test's job can linger in the shared local Ray for a while (unfused
    `MapWorker(MapBatches(EmbedActor))`, seen once); this job's actor decodes too (Ray fuses the
    decode into it on this config), so those come first. Process start times cannot tell them
    apart: Ray runs an actor in a worker process it may have started before the test.
    """
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if cmd.startswith("ray::MapWorker") and "EmbedActor" in cmd:
            found.append((p.pid, cmd))
    return sorted(found, key=lambda a: READ_STAGE not in a[1])


def _image_behind_a_pipe(table: pa.Table, row: int, where: Path) -> tuple[pa.Table, Path, Path]:
    """`table` with row `row`'s image path replaced by a named pipe: (table, pipe, real file).

    Opening that image blocks until someone opens the pipe for writing, so a job over the table
    cannot finish before the test has done what it must do mid-run, however fast or slow this
    machine is. Replace the pipe by the real file (`os.replace`) to let a retry read it.
    """
    paths = table.column("path").to_pylist()
    real = Path(paths[row])
    where.mkdir(parents=True)
    pipe = where / real.name
    os.mkfifo(pipe)
    paths[row] = str(pipe)
    return table.set_column(table.schema.get_field_index("path"), "path", pa.array(paths)), pipe, real


def test_killed_actor_still_gives_exactly_one_row_per_image(tmp_path, ray_local):
    """SIGKILL the embedding actor mid-run: Ray retries its tasks; one row per image, no more.

    On this 2-CPU config Ray fuses decoding into the actor, so the actor itself is the one stuck
    on the pipe (shard 6) with later tasks queued behind it when it is killed.
    """
    run = tmp_path / "run"
    table = bundled_table().slice(0, 120)
    blocked, pipe, real = _image_behind_a_pipe(table, 65, tmp_path / "blocked")
    fifo = pipe.with_name("fifo")
    os.link(pipe, fifo)  # a second name for the pipe, kept when the real file replaces it
    write_images_table(blocked, RunDir.at(run))
    cfg = _cfg("embed.models=[efficientnet-lite0]", "embed.shard_size=10",
               "embed.decode_batch_size=10", "embed.settings.efficientnet-lite0.batch_size=4")
    killed: list[tuple[int, str]] = []

    def killer() -> None:
        try:
            deadline = time.monotonic() + 240
            model_dir = run / "embeddings" / "model=efficientnet-lite0"
            while time.monotonic() < deadline:
                if len(list(model_dir.glob("part-*.parquet"))) >= 2:
                    actors = _embed_actors()
                    if actors:
                        shutil.copy(real, tmp_path / "real.png")
                        os.replace(tmp_path / "real.png", pipe)  # a retry reads the real file
                        os.kill(actors[0][0], signal.SIGKILL)
                        killed.append(actors[0])
                        return
                time.sleep(0.2)
        finally:
            time.sleep(1)
            try:  # if anything still waits on the pipe, end its wait (a decode error) not hang
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # ENXIO: no reader left, as expected

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = run_embed(cfg, run_dir=str(run), show_progress=False)
    t.join(timeout=5)
    assert killed, "the test never found an embedding actor to kill"
    # the premise of this test: the killed actor was the process stuck on the pipe
    assert READ_STAGE in killed[0][1], (
        f"Ray no longer fuses decoding into the actor ({killed[0][1]!r}): the decode task, not "
        "the killed actor, waited on the pipe; rework how this test holds the job mid-run")
    assert summary.result("efficientnet-lite0").status == "embedded"
    assert summary.decode_errors == 0
    done = len(list((run / "embeddings" / "model=efficientnet-lite0").glob("part-*.parquet")))
    assert done == 12
    emb = read_embeddings(RunDir.at(run), "efficientnet-lite0")
    assert sorted(emb.ids) == sorted(table.column("image_id").to_pylist())  # none missing, none twice
    assert np.isfinite(emb.vectors).all()


def _embed_cmd(run: Path, cfg_path: Path) -> list[str]:
    return [sys.executable, "-m", "flagsim", "embed", "--config", str(cfg_path), "--run", str(run),
            "--no-progress"]


def test_sigkilled_job_resumes_to_identical_shards(tmp_path):
    """SIGKILL the whole job mid-run, then rerun: kept shards stay, the result equals a clean run.

    The last image of the killed run is a named pipe that nobody writes to (see
    `_image_behind_a_pipe`), so the job cannot finish before the kill.
    """
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        "ray: {num_cpus: 2, read_cpus: 1}\n"
        "embed:\n  models: [efficientnet-lite0]\n  shard_size: 10\n  decode_batch_size: 10\n"
        "  settings: {efficientnet-lite0: {batch_size: 4}}\n"
    )
    table = bundled_table().slice(0, 80)
    blocked, pipe, last = _image_behind_a_pipe(table, 79, tmp_path / "blocked")
    runs = {}
    for label, t in (("killed", blocked), ("straight", table)):
        run = tmp_path / label
        write_images_table(t, RunDir.at(run))
        runs[label] = run
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen(_embed_cmd(runs["killed"], cfg_path), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model_dir = runs["killed"] / "embeddings" / "model=efficientnet-lite0"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(model_dir.glob("part-*.parquet"))) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    partial = sorted(p.name for p in model_dir.glob("part-*.parquet"))
    assert 2 <= len(partial) < 8
    assert "part-00007.parquet" not in partial  # the shard of the blocked image
    assert not RunDir.at(run).manifest("pixels").exists()

    pipe.unlink()
    shutil.copy(last, pipe)  # the same bytes at the same path: the rerun can finish
    for label in ("killed", "straight"):
        done = subprocess.run(_embed_cmd(runs[label], cfg_path), env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    a = read_embeddings(RunDir.at(runs["killed"]), "efficientnet-lite0")
    b = read_embeddings(RunDir.at(runs["straight"]), "efficientnet-lite0")
    assert a.ids == b.ids == table.column("image_id").to_pylist()
    np.testing.assert_array_equal(a.vectors, b.vectors)  # bit-identical on CPU
    # the shards written before the kill were kept, not redone
    m = read_manifest(RunDir.at(runs["killed"]), "efficientnet-lite0")
    assert m.rows == 80 and set(partial) <= set(m.shards)


def _error_lines(capsys) -> list[str]:
    """The `flagsim: error:` lines of stderr (log lines of earlier work may precede them)."""
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("flagsim: error:")]


def test_corrupt_shards_stop_the_index_with_one_line_and_repair_redoes_only_them(
    tmp_path, ray_local, capsys
):
    run = tmp_path / "run"
    write_images_table(bundled_table().slice(0, 30), RunDir.at(run))
    cfg = _cfg("embed.models=[pixels,efficientnet-lite0]", "embed.shard_size=10")
    run_embed(cfg, run_dir=str(run), show_progress=False)
    rd = RunDir.at(run)
    pixels_dir = run / "embeddings" / "model=pixels"
    shard1 = pixels_dir / "part-00001.parquet"
    untouched = pixels_dir / "part-00000.parquet"
    mtime0 = untouched.stat().st_mtime_ns
    original = read_embeddings(rd, "pixels")

    cases = {
        "truncated": lambda: shard1.write_bytes(shard1.read_bytes()[:200]),
        "foreign": lambda: shutil.copy(run / "embeddings" / "model=efficientnet-lite0" / "part-00001.parquet", shard1),
    }
    for label, corrupt in cases.items():
        corrupt()
        rc = main(["index", "--run", str(run), "--models", "pixels"])
        err = _error_lines(capsys)
        assert rc != 0, label
        assert len(err) == 1 and "part-00001.parquet" in err[0], (label, err)
        assert main(["embed", "--run", str(run), "--models", "pixels", "--repair", "--no-progress",
                     "--set", "ray.read_cpus=1", "--set", "embed.shard_size=10"]) == 0
        capsys.readouterr()
        assert untouched.stat().st_mtime_ns == mtime0, label  # only the affected shard was redone
        fixed = read_embeddings(rd, "pixels")
        assert fixed.ids == original.ids
        np.testing.assert_array_equal(fixed.vectors, original.vectors)
        assert main(["index", "--run", str(run), "--models", "pixels"]) == 0
        capsys.readouterr()

    # a manifest that disagrees with its shards
    m = rd.manifest("pixels").local_path()
    m.write_text(m.read_text().replace('"part-00002.parquet": 10', '"part-00002.parquet": 11'))
    rc = main(["index", "--run", str(run), "--models", "pixels"])
    err = _error_lines(capsys)
    assert rc != 0 and len(err) == 1 and "part-00002.parquet" in err[0]
    assert main(["embed", "--run", str(run), "--models", "pixels", "--repair", "--no-progress",
                 "--set", "ray.read_cpus=1", "--set", "embed.shard_size=10"]) == 0
    assert main(["index", "--run", str(run), "--models", "pixels"]) == 0


def test_fixing_one_image_re_embeds_only_its_shard(tmp_path, bundled_dir, ray_local):
    names = ["Chad", "Romania", "Japan", "Nepal", "Peru", "Italy"]
    folder = _folder(tmp_path / "imgs", bundled_dir, names)
    (folder / "Broken.png").write_bytes(b"")  # sorts first: shard 0
    run = tmp_path / "run"
    cfg = _cfg("embed.models=[pixels]", "embed.shard_size=3")
    write_images_table(from_folder(folder), RunDir.at(run))
    first = run_embed(cfg, run_dir=str(run), show_progress=False)
    assert first.decode_errors == 1
    model_dir = run / "embeddings" / "model=pixels"
    mtimes = {p.name: p.stat().st_mtime_ns for p in model_dir.glob("part-*.parquet")}
    assert len(mtimes) == 3

    shutil.copy(bundled_dir / "images" / "Chad.png", folder / "Broken.png")  # the user fixes it
    write_images_table(from_folder(folder), RunDir.at(run))
    again = run_embed(cfg, run_dir=str(run), show_progress=False)
    assert again.result("pixels").status == "embedded" and again.decode_errors == 0
    after = {p.name: p.stat().st_mtime_ns for p in model_dir.glob("part-*.parquet")}
    assert after["part-00000.parquet"] != mtimes["part-00000.parquet"]
    assert {k: v for k, v in after.items() if k != "part-00000.parquet"} == {
        k: v for k, v in mtimes.items() if k != "part-00000.parquet"}
    ids = read_embeddings(RunDir.at(run), "pixels").ids
    assert sorted(ids) == sorted(["Broken", *names])
