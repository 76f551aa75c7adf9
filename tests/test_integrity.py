"""Run-directory integrity: checksums recorded when a shard is written and verified on every read;
every "repair with `flagsim embed --repair`" error is one that --repair fixes; one writer per run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flagsim.cli import main
from flagsim.config import load_config
from flagsim.images import bundled_table, write_images_table
from flagsim.pipeline.embed import run_embed
from flagsim.rundir import RunDir
from flagsim.shards import read_embeddings, read_manifest

EMBED = ["--models", "pixels", "--no-progress", "--set", "ray.read_cpus=1",
         "--set", "embed.shard_size=10"]


def _cfg(*overrides: str):
    return load_config(None, ["embed.models=[pixels]", "embed.shard_size=10", "ray.read_cpus=1",
                              *overrides])


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("flagsim: error")]


@pytest.fixture()
def run30(tmp_path, ray_local) -> Path:
    run = tmp_path / "run"
    write_images_table(bundled_table().slice(0, 30), RunDir.at(run))
    run_embed(_cfg(), run_dir=str(run), show_progress=False)
    return run


def _flip(path: Path, nbytes: int = 64) -> None:
    """Overwrite `nbytes` in the middle of the file (inside the data pages, not the footer)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 3
    data[mid:mid + nbytes] = bytes(b ^ 0x5A for b in data[mid:mid + nbytes])
    path.write_bytes(bytes(data))


def _refused_then_repaired(run: Path, capsys, shard: str, original) -> None:
    rc = main(["index", "--run", str(run), "--models", "pixels"])
    err = _errors(capsys)
    assert rc != 0 and len(err) == 1 and shard in err[0] and "--repair" in err[0], err
    assert main(["embed", "--run", str(run), "--repair", *EMBED]) == 0
    capsys.readouterr()
    fixed = read_embeddings(RunDir.at(run), "pixels")
    assert fixed.ids == original.ids
    np.testing.assert_array_equal(fixed.vectors, original.vectors)
    assert main(["index", "--run", str(run), "--models", "pixels"]) == 0
    capsys.readouterr()


def test_flipped_bytes_in_a_shard_are_detected_and_repair_re_embeds_it(run30, capsys) -> None:
    rd = RunDir.at(run30)
    original = read_embeddings(rd, "pixels")
    shard = run30 / "embeddings" / "model=pixels" / "part-00001.parquet"
    _flip(shard)
    assert main(["embed", "--run", str(run30), *EMBED]) == 0  # a plain embed trusts the manifest
    out = capsys.readouterr()
    assert "up to date" in out.out
    _refused_then_repaired(run30, capsys, "part-00001.parquet", original)
    assert read_manifest(rd, "pixels").checksums["part-00001.parquet"]


def test_an_extra_unlisted_shard_is_refused_and_repair_removes_it(run30, capsys) -> None:
    original = read_embeddings(RunDir.at(run30), "pixels")
    mdir = run30 / "embeddings" / "model=pixels"
    shutil.copy(mdir / "part-00000.parquet", mdir / "part-00099.parquet")
    _refused_then_repaired(run30, capsys, "part-00099.parquet", original)
    assert not (mdir / "part-00099.parquet").exists()


def test_a_shard_copied_over_another_with_the_manifest_deleted_is_redone(run30, capsys) -> None:
    rd = RunDir.at(run30)
    original = read_embeddings(rd, "pixels")
    mdir = run30 / "embeddings" / "model=pixels"
    shutil.copy(mdir / "part-00000.parquet", mdir / "part-00002.parquet")
    rd.manifest("pixels").delete()
    assert main(["embed", "--run", str(run30), *EMBED]) == 0  # resume verifies what it keeps
    capsys.readouterr()
    again = read_embeddings(rd, "pixels")
    assert again.ids == original.ids
    np.testing.assert_array_equal(again.vectors, original.vectors)
    # the same with --repair, which must not answer "up to date"
    shutil.copy(mdir / "part-00000.parquet", mdir / "part-00002.parquet")
    rd.manifest("pixels").delete()
    assert main(["embed", "--run", str(run30), "--repair", *EMBED]) == 0
    assert "up to date" not in capsys.readouterr().out
    np.testing.assert_array_equal(read_embeddings(rd, "pixels").vectors, original.vectors)


def test_a_shard_copied_from_another_run_is_refused(run30, tmp_path, capsys) -> None:
    other = tmp_path / "other"
    write_images_table(bundled_table().slice(0, 30), RunDir.at(other))
    run_embed(_cfg(), run_dir=str(other), show_progress=False)
    rd = RunDir.at(run30)
    original = read_embeddings(rd, "pixels")
    # the same images, so the bytes differ only by the run they were written for
    for sub in ("embeddings/model=pixels/part-00001.parquet",
                "_meta/embeddings/model=pixels/shards/part-00001.json"):
        shutil.copy(other / sub, run30 / sub)
    with pytest.raises(Exception, match="part-00001.parquet (was written by another run|does not match)"):
        read_embeddings(rd, "pixels")
    _refused_then_repaired(run30, capsys, "part-00001.parquet", original)


def test_a_shard_path_that_is_a_directory_is_one_line_and_repaired(run30, capsys) -> None:
    original = read_embeddings(RunDir.at(run30), "pixels")
    shard = run30 / "embeddings" / "model=pixels" / "part-00001.parquet"
    shard.unlink()
    shard.mkdir()
    _refused_then_repaired(run30, capsys, "part-00001.parquet", original)


def test_a_run_marker_that_is_not_an_object_is_one_line(run30, capsys) -> None:
    marker = RunDir.at(run30).run_marker("pixels").local_path()
    marker.write_text("[]")
    RunDir.at(run30).manifest("pixels").delete()
    rc = main(["embed", "--run", str(run30), *EMBED])
    err = _errors(capsys)
    assert rc != 0 and len(err) == 1 and "run.json is not a valid run marker" in err[0]
    assert main(["embed", "--run", str(run30), "--force", *EMBED]) == 0


@pytest.mark.parametrize("damage", ["{bad", "[]", '{"run_id": ""}'])
def test_a_damaged_run_file_is_one_line_and_repair_restores_its_id(run30, capsys, damage) -> None:
    rd = RunDir.at(run30)
    rid = read_manifest(rd, "pixels").run_id
    (run30 / "_meta" / "run.json").write_text(damage)
    shard = run30 / "embeddings" / "model=pixels" / "part-00000.parquet"
    mtime = shard.stat().st_mtime_ns
    rd.manifest("pixels").delete()  # re-planned: its shards are matched to the run's id
    rc = main(["embed", "--run", str(run30), *EMBED])
    err = _errors(capsys)
    assert rc != 0 and len(err) == 1, err
    assert "run.json is not a valid run file; repair with `flagsim embed --repair`" in err[0]
    assert main(["embed", "--run", str(run30), "--repair", *EMBED]) == 0
    assert "was damaged; rewritten with the id its manifests and shards record" in (
        capsys.readouterr().err)
    assert json.loads((run30 / "_meta" / "run.json").read_text())["run_id"] == rid
    assert shard.stat().st_mtime_ns == mtime  # the shards were kept, not embedded again
    assert read_manifest(rd, "pixels").run_id == rid


def test_an_embed_where_every_image_fails_is_an_error_not_an_empty_model(
    tmp_path, capsys, ray_local
) -> None:
    """Images gone (e.g. a run that pointed into a Ray job's temporary working dir): the embed
    exited 0 with a 0-row model that read "up to date" from then on, and `--force` had
    replaced good vectors with it."""
    run = tmp_path / "run"
    table = bundled_table().slice(0, 12).to_pylist()
    for row in table:
        row["path"] = str(tmp_path / "gone" / f"{row['image_id']}.png")
    import pyarrow as pa

    from flagsim.schema import IMAGES_SCHEMA
    write_images_table(pa.Table.from_pylist(table, schema=IMAGES_SCHEMA), RunDir.at(run))
    for _ in range(2):  # and again: still an error, never "up to date"
        rc = main(["embed", "--run", str(run), *EMBED])
        err = _errors(capsys)
        assert rc == 2 and len(err) == 1, err
        assert "pixels: none of the 12 images could be read (12 errors" in err[0]
        assert read_manifest(RunDir.at(run), "pixels") is None


def _run_of_copied_flags(tmp_path: Path, n: int = 12) -> tuple[Path, Path]:
    """A run of `n` bundled flags copied to `tmp_path/imgs` (so a test can take them away)."""
    import pyarrow as pa

    run, imgs = tmp_path / "run", tmp_path / "imgs"
    imgs.mkdir()
    table = bundled_table().slice(0, n)
    paths = []
    for p in table.column("path").to_pylist():
        paths.append(str(shutil.copy(p, imgs / Path(p).name)))
    table = table.set_column(table.schema.get_field_index("path"), "path", pa.array(paths))
    write_images_table(table, RunDir.at(run))
    return run, imgs


def test_embed_force_where_every_image_fails_puts_the_previous_embeddings_back(
    tmp_path, capsys, ray_local
) -> None:
    """`embed --force` discarded a model's shards before embedding: when every image then
    failed (moved away), the good vectors were gone. They are now set aside and put back."""
    run, imgs = _run_of_copied_flags(tmp_path)
    rd = RunDir.at(run)
    assert main(["embed", "--run", str(run), *EMBED]) == 0
    original = read_embeddings(rd, "pixels")
    shutil.rmtree(imgs)
    capsys.readouterr()
    rc = main(["embed", "--run", str(run), "--force", *EMBED])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("flagsim: error")]
    assert rc == 2 and len(errors) == 1 and "none of the 12 images could be read" in errors[0]
    assert f"pixels: its previous embeddings are back in {rd.model_dir('pixels')}" in err
    back = read_embeddings(rd, "pixels")
    assert back.ids == original.ids
    np.testing.assert_array_equal(back.vectors, original.vectors)
    assert not (run / "_tmp" / "replaced-pixels").exists()
    assert main(["embed", "--run", str(run), *EMBED]) == 0  # complete again: nothing redone
    assert "up to date" in capsys.readouterr().out
    assert main(["index", "--run", str(run), "--models", "pixels"]) == 0


def test_shards_redone_for_a_changed_images_table_come_back_when_every_image_fails(
    tmp_path, capsys, ray_local
) -> None:
    """The images table rewritten with paths that no longer resolve: the shards whose rows
    changed (here all) were deleted one by one before embedding, so the old vectors were lost
    when every image failed. They are set aside like `--force`'s and put back."""
    import pyarrow as pa

    from flagsim.images import read_images_table

    run, imgs = _run_of_copied_flags(tmp_path, n=25)
    rd = RunDir.at(run)
    assert main(["embed", "--run", str(run), *EMBED]) == 0
    original = read_embeddings(rd, "pixels")
    table = read_images_table(rd.images_table)
    moved = [p.replace(str(imgs), str(tmp_path / "moved")) for p in table.column("path").to_pylist()]
    write_images_table(table.set_column(table.schema.get_field_index("path"), "path",
                                        pa.array(moved)), rd)
    capsys.readouterr()
    for _ in range(2):  # and again: the shards are set aside and put back each time
        rc = main(["embed", "--run", str(run), *EMBED])
        err = capsys.readouterr().err
        assert rc == 2 and "none of the 25 images could be read" in err, err
        assert "its previous embeddings are back" in err
        back = read_embeddings(rd, "pixels")
        assert back.ids == original.ids
        np.testing.assert_array_equal(back.vectors, original.vectors)
        assert not (run / "_tmp" / "replaced-pixels").exists()
    shutil.move(imgs, tmp_path / "moved")  # the images where the table says: shards redone
    assert main(["embed", "--run", str(run), *EMBED]) == 0
    again = read_embeddings(rd, "pixels")
    np.testing.assert_array_equal(again.vectors, original.vectors)


def test_an_interrupted_embed_force_resumes_and_then_drops_the_copy_it_kept(run30, capsys) -> None:
    """A set-aside cut short after the sidecars were copied and the manifest deleted, before the
    shards moved: the next one finishes the copy; the next embed resumes the new embeddings and
    drops the copy once they are complete."""
    from flagsim.pipeline.plan import set_aside, set_aside_dir

    rd = RunDir.at(run30)
    original = read_embeddings(rd, "pixels")
    keep = set_aside_dir(rd, "pixels")
    for loc in (rd.run_marker("pixels"), rd.manifest("pixels")):  # the crash: shards not moved
        (keep.root / loc.path[len(rd.root.path):].lstrip("/")).write_bytes(loc.read_bytes())
    rd.manifest("pixels").delete()
    set_aside(rd, "pixels")  # the next --force finishes the move
    assert read_manifest(rd, "pixels") is None and not rd.model_dir("pixels").exists()
    assert read_manifest(keep, "pixels") is not None
    assert len(list(keep.model_dir("pixels").list(".parquet"))) == 3
    set_aside(rd, "pixels")  # a third try (the run's folder empty): the copy is kept
    assert read_manifest(keep, "pixels") is not None
    assert main(["embed", "--run", str(run30), *EMBED]) == 0
    assert "embedded" in capsys.readouterr().out
    assert not keep.root.exists()
    again = read_embeddings(rd, "pixels")
    assert again.ids == original.ids
    np.testing.assert_array_equal(again.vectors, original.vectors)


def test_a_partial_copy_is_completed_by_the_next_set_aside_and_restored_only_whole(run30) -> None:
    """Review: shards set aside for changed images (a partial copy with the full manifest), then
    `--force` with the images unreachable deleted the shards the copy relied on, and the restore
    put back a manifest vouching for the failed run's 0-row shards. The force now moves those
    shards into the copy, and a restore writes the manifest only when every shard is as recorded."""
    from flagsim.pipeline.plan import set_aside, set_aside_dir, settle_set_aside

    rd = RunDir.at(run30)
    original = read_embeddings(rd, "pixels")
    keep = set_aside_dir(rd, "pixels")
    set_aside(rd, "pixels", ["part-00001.parquet"])  # stale shard set aside; the embed was cut short
    assert [f.name for f in keep.model_dir("pixels").list(".parquet")] == ["part-00001.parquet"]
    set_aside(rd, "pixels")  # --force: the shards the copy lists move into it
    assert len(keep.model_dir("pixels").list(".parquet")) == 3
    assert "are back" in settle_set_aside(rd, "pixels")  # nothing embedded: all put back
    back = read_embeddings(rd, "pixels")
    np.testing.assert_array_equal(back.vectors, original.vectors)

    set_aside(rd, "pixels")
    (keep.model_dir("pixels") / "part-00000.parquet").delete()  # a copy that is not whole
    line = settle_set_aside(rd, "pixels")
    assert "could not be put back whole (part-00000.parquet is missing)" in line
    assert read_manifest(rd, "pixels") is None and not keep.root.exists()


def test_a_shard_deleted_or_truncated_after_the_embed_is_embedded_again(run30, capsys) -> None:
    """An embed said "up to date" over a missing or truncated shard (and `index` then said to
    repair it); the manifest now records each shard's size, checked with one listing."""
    rd = RunDir.at(run30)
    original = read_embeddings(rd, "pixels")
    folder = run30 / "embeddings" / "model=pixels"
    kept = (folder / "part-00000.parquet").stat().st_mtime_ns
    (folder / "part-00001.parquet").unlink()
    with open(folder / "part-00002.parquet", "r+b") as f:
        f.truncate(500)
    assert main(["embed", "--run", str(run30), *EMBED]) == 0
    err = capsys.readouterr().err
    assert "pixels: part-00001.parquet, part-00002.parquet gone or changed on disk" in err
    assert (folder / "part-00000.parquet").stat().st_mtime_ns == kept  # only those two redone
    again = read_embeddings(rd, "pixels")
    assert again.ids == original.ids
    np.testing.assert_array_equal(again.vectors, original.vectors)
    manifest = read_manifest(rd, "pixels")
    assert manifest.sizes == {p.name: p.stat().st_size for p in folder.glob("part-*.parquet")}
    assert main(["embed", "--run", str(run30), *EMBED]) == 0  # and now it is up to date
    assert "up to date" in capsys.readouterr().out


def test_shards_redone_after_the_images_changed_are_one_log_line(run30, tmp_path,
                                                                 capsys) -> None:
    """A line per reason, not per shard and model (60 lines for 30 shards)."""
    import pyarrow as pa

    from flagsim.images import read_images_table
    from flagsim.schema import IMAGES_SCHEMA

    moved = tmp_path / "moved"
    moved.mkdir()
    rows = read_images_table(run30).to_pylist()
    for row in rows:  # the same images in another folder: every shard's rows changed
        row["path"] = str(shutil.copy(row["path"], moved))
    write_images_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), RunDir.at(run30))
    assert main(["embed", "--run", str(run30), *EMBED]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "redoing" in ln]
    assert len(lines) == 1 and lines[0].endswith(
        "pixels: redoing 3 shard(s) out of date with the images table: part-00000.parquet, "
        "part-00001.parquet, part-00002.parquet"), lines


def test_an_empty_images_table_is_one_line(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    write_images_table(bundled_table().slice(0, 0), RunDir.at(run))
    rc = main(["embed", "--run", str(run), *EMBED])
    err = _errors(capsys)
    assert rc != 0 and len(err) == 1 and "no rows" in err[0], err


def test_a_second_embed_into_the_same_run_fails_at_once_naming_the_holder(
    tmp_path, bundled_dir
) -> None:
    run = tmp_path / "run"
    write_images_table(bundled_table().slice(0, 40), RunDir.at(run))
    # the first embed's last image is a named pipe nobody writes: it holds the run until killed
    table = bundled_table().slice(0, 40).to_pylist()
    pipe = tmp_path / "held.png"
    os.mkfifo(pipe)
    table[-1]["path"] = str(pipe)
    table[-1]["sha256"] = None
    import pyarrow as pa

    from flagsim.schema import IMAGES_SCHEMA
    write_images_table(pa.Table.from_pylist(table, schema=IMAGES_SCHEMA), RunDir.at(run))
    env = {**os.environ, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "flagsim", "embed", "--run", str(run), "--set", "ray.num_cpus=2"]
    first = subprocess.Popen([*cmd, *EMBED], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lock = run / "_lock.json"
        shards = run / "embeddings" / "model=pixels"
        markers = run / "_meta" / "embeddings" / "model=pixels" / "shards"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            # all but the held last shard, each with its marker (written just after the shard)
            if len(list(shards.glob("part-*.parquet"))) == 3 == len(list(markers.glob("*.json"))):
                break
            time.sleep(0.2)
        assert first.poll() is None and lock.exists(), "the first embed is not holding the run"
        before = sorted(p.name for p in run.rglob("*") if p.is_file())
        second = subprocess.run([*cmd, *EMBED[:-2], "--set", "embed.shard_size=20"], env=env,
                                capture_output=True, text=True, timeout=120)
        err = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode != 0
        assert len([e for e in err if e.startswith("flagsim: error")]) == 1, err
        holder = json.loads(lock.read_text())
        assert f"pid {holder['pid']}" in second.stderr and "flagsim embed" in second.stderr
        assert sorted(p.name for p in run.rglob("*") if p.is_file()) == before  # nothing touched
    finally:
        os.killpg(first.pid, 9)
        first.wait(timeout=30)


def test_a_rerun_with_other_settings_keeps_the_finished_embeddings_until_forced(run30, capsys):
    """Another shard size (or weights) re-embeds every image: never done silently (the shards
    were discarded with one info line); --force does it."""
    rd = RunDir.at(run30)
    before = {p.name: p.read_bytes() for p in (run30 / "embeddings" / "model=pixels").iterdir()}
    capsys.readouterr()
    assert main(["embed", "--run", str(run30), *EMBED[:-1], "embed.shard_size=20"]) == 2
    (err,) = _errors(capsys)
    assert "made with other settings (shard_size 10 -> 20)" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in (run30 / "embeddings" / "model=pixels").iterdir()} == before
    assert main(["embed", "--run", str(run30), *EMBED[:-1], "embed.shard_size=20", "--force"]) == 0
    assert sorted(read_manifest(rd, "pixels").shards.values()) == [10, 20]


def test_embedding_one_model_from_a_new_images_table_names_the_models_left_behind(
        tmp_path, ray_local, capsys) -> None:
    """`embed --images NEW --models a` replaced the table that model b was embedded from, with
    no word; searches then mixed two collections and the ensemble blamed the shard sizes."""
    from flagsim.search.source import EnsembleSource

    run = tmp_path / "run"
    old, new = bundled_table().slice(0, 12), bundled_table().slice(6, 12)
    write_images_table(old, RunDir.at(run))
    run_embed(load_config(None, ["embed.models=[pixels, colour-layout]", "ray.read_cpus=1"]),
              run_dir=str(run), show_progress=False)
    capsys.readouterr()
    pq_new = tmp_path / "new.parquet"
    import pyarrow.parquet as pq

    pq.write_table(new, pq_new)
    assert main(["embed", "--run", str(run), "--images", str(pq_new), "--models", "pixels",
                 "--no-progress", "--set", "ray.read_cpus=1"]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "earlier images table" in ln]
    assert len(warned) == 1 and warned[0].endswith(
        "colour-layout of this run was embedded from an earlier images table than this one (12 "
        "images): run `flagsim embed --models colour-layout` to bring it up to date; until then "
        "its neighbours, and the ensemble, cover only the images it had"), warned
    ens = EnsembleSource(RunDir.at(run), ["pixels", "colour-layout"])
    assert "embedded from different images tables" in ens.shortfall(ens.rows)
    assert main(["embed", "--run", str(run), "--images", str(pq_new), "--models",
                 "pixels,colour-layout", "--no-progress", "--set", "ray.read_cpus=1"]) == 0
    assert "earlier images table" not in capsys.readouterr().err
    ens = EnsembleSource(RunDir.at(run), ["pixels", "colour-layout"])
    assert ens.rows == 12 and ens.shortfall(ens.rows) is None
