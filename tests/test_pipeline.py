"""The Ray Data embedding pipeline end to end on a real local Ray (bundled flags, offline models)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from flagsim.config import load_config
from flagsim.decode import decode_image
from flagsim.images import bundled_table, from_folder, write_images_table
from flagsim.models.testing import tiny_embedder, tiny_overrides, tiny_weights
from flagsim.pipeline.embed import run_embed
from flagsim.pipeline.mapper import EmbedActor, embedding_column
from flagsim.pipeline.reader import decode_batch
from flagsim.rundir import RunDir
from flagsim.shards import read_embeddings, read_manifest

pytestmark = pytest.mark.ray

FAMILIES = ["vit", "clip", "blip2", "efficientnet", "dinov2", "vgg16", "vgg16-fc7",
            "efficientnet-lite0", "pixels"]


def _cfg(**over):
    sets = [f"{k}={v}" for k, v in over.items()]
    return load_config(None, ["ray.read_cpus=1", *sets])


def _subset(tmp_path, bundled_dir, names):
    d = tmp_path / "imgs"
    d.mkdir()
    for n in names:
        shutil.copy(bundled_dir / "images" / f"{n}.png", d / f"{n}.png")
    return d


# --- CPU plan: logical CPUs and torch threads per actor -----------------------------------------

@pytest.mark.parametrize(("models", "sets", "cpus", "threads"), [
    # the default config: the light pixels baseline takes a sliver, the network the rest
    (["efficientnet-lite0", "pixels"], [], {"efficientnet-lite0": 0.75, "pixels": 0.25},
     {"efficientnet-lite0": 2, "pixels": 1}),
    (["efficientnet-lite0"], [], {"efficientnet-lite0": 1.0}, {"efficientnet-lite0": 2}),
    # a light model alone is no sliver: it is the whole job
    (["pixels"], [], {"pixels": 1.0}, {"pixels": 2}),
    # two networks share what reading leaves, a thread each
    (["vit", "clip"], [], {"vit": 0.5, "clip": 0.5}, {"vit": 1, "clip": 1}),
    # explicit settings win
    (["vit", "pixels"], ["embed.settings.pixels.num_cpus=0.5"], {"vit": 0.5, "pixels": 0.5},
     {"vit": 2, "pixels": 1}),
])
def test_cpu_plan_gives_networks_the_cores_and_light_models_a_sliver(models, sets, cpus, threads):
    from flagsim.pipeline.plan import actor_cpus, torch_threads

    cfg = _cfg(**{"embed.models": "[" + ",".join(models) + "]"},
               **dict(s.split("=", 1) for s in sets))
    mcfgs = {m: cfg.embed.for_model(m) for m in models}
    got = actor_cpus(cfg, mcfgs, 2.0)
    assert got == pytest.approx(cpus)
    todo = dict.fromkeys(models, {0})
    assert {m: torch_threads(m, got[m], todo, "cpu", {"CPU": 2.0}) for m in models} == threads
    # with a GPU the CPUs feed it: an actor keeps to its own logical CPUs
    assert torch_threads(models[0], got[models[0]], todo, "cuda", {"CPU": 2.0}) == max(
        1, int(got[models[0]]))


def test_cpu_plan_light_share_never_exceeds_an_even_split():
    from flagsim.pipeline.plan import actor_cpus

    cfg = load_config(None, ["ray.read_cpus=0.75", "embed.models=[efficientnet-lite0,pixels]"])
    mcfgs = {m: cfg.embed.for_model(m) for m in cfg.embed.models}
    # one CPU, three quarters kept for reading: the quarter left is split evenly, and it fits
    assert actor_cpus(cfg, mcfgs, 1.0) == pytest.approx({"efficientnet-lite0": 0.125, "pixels": 0.125})


def test_resource_plan_of_a_cuda_cluster_without_ray():
    """The whole resource plan comes from the config and Ray's totals; planning never imports Ray."""
    code = (
        "import sys\n"
        "from flagsim.config import load_config\n"
        "from flagsim.pipeline.plan import plan_resources\n"
        "cfg = load_config(None, ['ray.read_cpus=1', 'embed.models=[vit,pixels]',\n"
        "                         'embed.settings.pixels.num_gpus=0.25', 'embed.settings.vit.batch_size=7'])\n"
        "mcfgs = {m: cfg.embed.for_model(m) for m in cfg.embed.models}\n"
        "p = plan_resources(cfg, mcfgs, {'vit': {0}, 'pixels': set()}, {'CPU': 4.0, 'GPU': 1.0})\n"
        "print(p.device, p.dtypes, p.gpus, p.batch_sizes, sorted(p.cpus))\n"
        "p = plan_resources(cfg, mcfgs, {'vit': {0}, 'pixels': {0}}, {'CPU': 4.0, 'GPU': 1.0})\n"
        "print(p.gpus)\n"
        "p = plan_resources(cfg, mcfgs, {'vit': {0}, 'pixels': {0}}, {'CPU': 4.0})\n"
        "print(p.device, p.dtypes, p.gpus)\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [
        # a GPU on the cluster: cuda in fp16, one whole GPU per network actor; pixels has nothing
        # to do, so only its dtype (for its manifest) is planned
        "cuda {'vit': 'float16', 'pixels': 'float16'} {'vit': 1.0} {'vit': 7} ['vit']",
        "{'vit': 1.0, 'pixels': 0.25}",  # the setting wins over the default of one GPU
        "cpu {'vit': 'float32', 'pixels': 'float32'} {'vit': 0.0, 'pixels': 0.0}",
        "[]",
    ]


# --- actors directly on a batch, before any Ray -----------------------------------------------

def test_actor_embeds_good_rows_and_passes_ids_through(bundled_dir):
    paths = [str(bundled_dir / "images" / f"{n}.png") for n in ("Chad", "Romania")]
    batch = {
        "image_id": np.array(["Chad", "Romania", "Bad"], dtype=object),
        "name": np.array(["Chad", "Romania", "Bad"], dtype=object),
        "path": np.array([*paths, str(bundled_dir / "missing.png")], dtype=object),
        "shard": np.array([0, 0, 0], dtype=np.int32),
    }
    decoded = decode_batch(batch, max_pixels=10**8)
    assert decoded["ok"].tolist() == [True, True, False]
    assert "cannot read file" in decoded["error"][2]
    actor = EmbedActor("pixels")
    out = actor(decoded)
    for col in ("image_id", "name", "path", "shard", "ok", "error"):
        assert out[col].tolist() == decoded[col].tolist()
    assert out["pixels"] is decoded["pixels"]
    emb = out[embedding_column("pixels")]
    assert emb.shape[0] == 3 and emb.dtype == np.float32
    assert not emb[2].any()  # failed row: zero vector, never fed to the model
    from flagsim.models import create_embedder

    ref = create_embedder("pixels")([decode_image(open(paths[0], "rb").read())])[0]
    np.testing.assert_allclose(emb[0], ref, rtol=0, atol=1e-6)


class _ShapeSpy:
    """Wraps an embedder: records the batch size of every forward it is called with."""

    def __init__(self, embedder):
        self.embedder, self.sizes = embedder, []

    def __call__(self, images):
        self.sizes.append(len(images))
        return self.embedder(images)


def _decoded(bundled_dir, n):
    paths = sorted(str(p) for p in (bundled_dir / "images").glob("*.png"))[:n]
    ids = np.array([f"i{k}" for k in range(n)], dtype=object)
    batch = {"image_id": ids, "name": ids, "path": np.array(paths, dtype=object),
             "shard": np.zeros(n, dtype=np.int32)}
    return decode_batch(batch, max_pixels=10**8)


def test_padded_size_buckets():
    from flagsim.pipeline.mapper import padded_size

    assert [padded_size(n, 512) for n in (1, 3, 8, 9, 10, 16, 17, 300, 511, 512)] == [
        8, 8, 8, 16, 16, 16, 32, 512, 512, 512]
    assert [padded_size(n, 4) for n in (1, 3, 4)] == [4, 4, 4]  # never above the micro-batch
    assert padded_size(20, 24) == 24


@pytest.mark.parametrize("model", ["pixels", "vgg16"])
def test_short_batch_is_padded_to_its_bucket_not_the_batch_size(bundled_dir, model):
    """10 images at batch_size 512: one forward of 16 (was 512); same vectors as without padding
    (pixels: bit for bit) and as the old full-size padding; a rerun is bit-identical."""
    decoded = _decoded(bundled_dir, 10)
    actor = EmbedActor(model, micro_batch=512, weights=tiny_weights(model))
    spy = actor.embedder = _ShapeSpy(actor.embedder)
    out = actor(decoded)[embedding_column(model)]
    assert spy.sizes == [16]
    assert np.array_equal(actor(decoded)[embedding_column(model)], out)  # rerun: same bits
    images = list(decoded["pixels"])
    unpadded = np.asarray(spy.embedder(images))
    full = np.asarray(spy.embedder(images + [images[-1]] * 502))[:10]
    if model == "pixels":
        np.testing.assert_array_equal(out, unpadded)
        np.testing.assert_array_equal(out, full)
    else:
        np.testing.assert_allclose(out, unpadded, rtol=0, atol=1e-5)
        np.testing.assert_allclose(out, full, rtol=0, atol=1e-5)


def test_long_batch_runs_full_chunks_then_one_bucket(bundled_dir):
    decoded = _decoded(bundled_dir, 21)
    actor = EmbedActor("pixels", micro_batch=8)
    spy = actor.embedder = _ShapeSpy(actor.embedder)
    out = actor(decoded)[embedding_column("pixels")]
    assert spy.sizes == [8, 8, 8]  # 8 + 8 + 5 padded to 8: never above the micro-batch
    ref = np.asarray(spy.embedder(list(decoded["pixels"])))
    np.testing.assert_array_equal(out, ref)


# --- Ray pipeline -------------------------------------------------------------------------------

def test_parity_with_per_image_reference_for_every_family(tmp_path, bundled_dir, ray_local):
    """Each family's tiny random-weight model through Ray == the same model per image (cos >= 0.9999)."""

    names = ["Chad", "Romania", "Nepal", "Japan", "Australia"]
    d = _subset(tmp_path, bundled_dir, names)
    run = tmp_path / "run"
    write_images_table(from_folder(d), RunDir.at(run))
    summary = run_embed(_cfg(**{"embed.shard_size": 2, **tiny_overrides(FAMILIES)}),
                        run_dir=str(run), models=FAMILIES, show_progress=False)
    assert {r.model: r.status for r in summary.results} == dict.fromkeys(FAMILIES, "embedded")
    for model in FAMILIES:
        emb = read_embeddings(RunDir.at(run), model)
        assert emb.ids == names or sorted(emb.ids) == sorted(names)
        ref_model = tiny_embedder(model)
        for i, image_id in enumerate(emb.ids):
            img = decode_image((d / f"{image_id}.png").read_bytes())
            ref = ref_model([img])[0]
            got = emb.vectors[i]
            cos = float(got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref)))
            assert cos >= 0.9999, (model, image_id, cos)


def test_bundled_flags_end_to_end_and_resume(tmp_path, ray_local):
    run = tmp_path / "run"
    cfg = _cfg(**{"embed.shard_size": 50, "embed.models": "[efficientnet-lite0,pixels]"})
    summary = run_embed(cfg, run_dir=str(run), show_progress=False)
    status = {r.model: r.status for r in summary.results}
    assert status == {"efficientnet-lite0": "embedded", "pixels": "embedded"}
    rd = RunDir.at(run)
    for model, dim in (("efficientnet-lite0", 1280), ("pixels", None)):
        files = sorted((run / "embeddings" / f"model={model}").glob("part-*.parquet"))
        assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range(4)]
        # readable by plain pandas/pyarrow without Ray or flagsim, the model from the folder
        df = pd.read_parquet(run / "embeddings", filters=[("model", "=", model)])
        assert len(df) == 197 and df["image_id"].is_unique
        assert set(df["model"]) == {model}
        if dim:
            assert len(df["embedding"].iloc[0]) == dim
        m = read_manifest(rd, model)
        assert m.rows == 197 and m.images_hash and m.device == "cpu" and m.dtype == "float32"
    # the default laptop config: the network uses both cores, the light baseline one thread
    threads = {m: rd.embedder_info(m).read_json()["torch_threads"]
               for m in ("efficientnet-lite0", "pixels")}
    assert threads == {"efficientnet-lite0": 2, "pixels": 1}
    lite = read_embeddings(rd, "efficientnet-lite0")
    v = lite.vectors / np.linalg.norm(lite.vectors, axis=1, keepdims=True)
    chad = lite.ids.index("Chad")
    sims = v @ v[chad]
    sims[chad] = -1
    assert lite.ids[int(np.argmax(sims))] == "Romania"

    # rerun: nothing to do
    again = run_embed(cfg, run_dir=str(run), show_progress=False)
    assert {r.model: r.status for r in again.results} == dict.fromkeys(status, "up to date")

    # an interrupted run: one shard and the manifest never got written
    before = pq.read_table(rd.shard("pixels", 2).path)
    rd.shard("pixels", 2).delete()
    rd.manifest("pixels").delete()
    mtime_other = (run / "embeddings" / "model=pixels" / "part-00000.parquet").stat().st_mtime_ns
    resumed = run_embed(cfg, run_dir=str(run), show_progress=False)
    st = {r.model: r.status for r in resumed.results}
    assert st == {"efficientnet-lite0": "up to date", "pixels": "embedded"}
    after = pq.read_table(rd.shard("pixels", 2).path)
    assert after.equals(before)  # same ids, bit-identical vectors
    assert (run / "embeddings" / "model=pixels" / "part-00000.parquet").stat().st_mtime_ns == mtime_other
    ids = read_embeddings(rd, "pixels").ids
    assert len(ids) == len(set(ids)) == 197


def test_bad_images_go_to_errors_table_and_good_ones_are_unaffected(tmp_path, bundled_dir, ray_local):
    good = ["Chad", "Romania", "Japan"]
    d = _subset(tmp_path, bundled_dir, good)
    (d / "zero.png").write_bytes(b"")
    data = (bundled_dir / "images" / "Peru.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 3])
    (d / "page.png").write_bytes(b"<!DOCTYPE html><html><body>404</body></html>")
    run = tmp_path / "run"
    write_images_table(from_folder(d), RunDir.at(run))
    cfg = _cfg(**{"embed.models": "[pixels]"})
    summary = run_embed(cfg, run_dir=str(run), show_progress=False)
    assert summary.result("pixels").images == 3 and summary.decode_errors == 3
    errs = pd.concat(pd.read_parquet(f) for f in (run / "errors" / "embed").glob("*.parquet"))
    reasons = dict(zip(errs["image_id"], errs["reason"], strict=True))
    assert set(reasons) == {"zero", "truncated", "page"}
    assert "empty" in reasons["zero"] and "truncated" in reasons["truncated"]
    assert "HTML" in reasons["page"]

    clean = tmp_path / "clean"
    (tmp_path / "c").mkdir()
    write_images_table(from_folder(_subset(tmp_path / "c", bundled_dir, good)), RunDir.at(clean))
    run_embed(cfg, run_dir=str(clean), show_progress=False)
    a = read_embeddings(RunDir.at(run), "pixels")
    b = read_embeddings(RunDir.at(clean), "pixels")
    assert sorted(a.ids) == sorted(b.ids) == sorted(good)
    for i, image_id in enumerate(a.ids):
        np.testing.assert_array_equal(a.vectors[i], b.vectors[b.ids.index(image_id)])


def test_unavailable_weights_are_skipped_with_reason(tmp_path, ray_local):
    run = tmp_path / "run"
    write_images_table(bundled_table().slice(0, 3), RunDir.at(run))
    cfg = _cfg(**{"embed.models": "[vit,pixels]"})
    summary = run_embed(cfg, run_dir=str(run), show_progress=False)
    vit = summary.result("vit")
    assert vit.status == "skipped" and "vit" in vit.reason and "\n" not in vit.reason
    assert summary.result("pixels").status == "embedded"


def test_strict_config_fails_on_missing_weights(tmp_path):
    from flagsim.errors import WeightsUnavailableError

    run = tmp_path / "run"
    write_images_table(bundled_table().slice(0, 3), RunDir.at(run))
    cfg = _cfg(**{"embed.models": "[clip,pixels]", "embed.strict": "true"})
    with pytest.raises(WeightsUnavailableError, match="clip"):
        run_embed(cfg, run_dir=str(run), show_progress=False)
    # a new run: refused before its images table (the bundled flags by default) is written
    fresh = tmp_path / "fresh"
    with pytest.raises(WeightsUnavailableError, match="clip"):
        run_embed(cfg, run_dir=str(fresh), show_progress=False)
    assert not (fresh / "images.parquet").exists() and not (fresh / "embeddings").exists()


def test_unsupported_uri_row_is_an_error_row_and_good_rows_are_embedded(
    tmp_path, bundled_dir, ray_local
):
    """A path no filesystem can open (http://) is recorded like an undecodable image; the good
    rows of the same shard are embedded exactly as in a run without it."""
    import pyarrow as pa

    good = ["Chad", "Romania", "Japan"]
    table = from_folder(_subset(tmp_path, bundled_dir, good))
    bad = {"image_id": "remote", "name": "remote", "path": "http://127.0.0.1:1/x.png"}
    table = pa.concat_tables([table, pa.Table.from_pylist([bad], schema=table.schema)])
    run = tmp_path / "run"
    write_images_table(table, RunDir.at(run))
    cfg = _cfg(**{"embed.models": "[pixels]"})
    summary = run_embed(cfg, run_dir=str(run), show_progress=False)
    assert summary.result("pixels").images == 3 and summary.decode_errors == 1
    errs = pd.concat(pd.read_parquet(f) for f in (run / "errors" / "embed").glob("*.parquet"))
    assert errs["image_id"].tolist() == ["remote"]
    (reason,) = errs["reason"]
    assert "http://127.0.0.1:1/x.png" in reason and "\n" not in reason
    emb = read_embeddings(RunDir.at(run), "pixels")
    assert sorted(emb.ids) == sorted(good)
    from flagsim.models import create_embedder

    pixels = create_embedder("pixels")
    for i, image_id in enumerate(emb.ids):
        ref = pixels([decode_image((bundled_dir / "images" / f"{image_id}.png").read_bytes())])[0]
        np.testing.assert_allclose(emb.vectors[i], ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", ["duplicate ids", "no rows", "null id"])
def test_a_bad_images_table_never_replaces_the_runs_own(tmp_path, capsys, bad):
    """`flagsim embed --images BAD` on a run that has a good table: one line, and the run's
    table is the one it had (it was replaced before being checked)."""
    import pyarrow as pa

    from flagsim.cli import main

    run = tmp_path / "run"
    write_images_table(bundled_table().slice(0, 5), RunDir.at(run))
    before = (run / "images.parquet").read_bytes()
    table = bundled_table().slice(0, 3)
    if bad == "duplicate ids":
        table = pa.concat_tables([table, table.slice(0, 1)])
    elif bad == "no rows":
        table = table.slice(0, 0)
    else:
        ids = pa.array([None, *table.column("image_id").to_pylist()[1:]], pa.string())
        table = table.set_column(table.schema.get_field_index("image_id"), "image_id", ids)
    pq.write_table(table, tmp_path / "bad.parquet")
    capsys.readouterr()
    rc = main(["embed", "--run", str(run), "--images", str(tmp_path / "bad.parquet"),
               "--models", "pixels"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("flagsim: error:"), err
    assert "Traceback" not in err[0]
    assert (run / "images.parquet").read_bytes() == before
