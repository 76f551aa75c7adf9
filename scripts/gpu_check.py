#!/usr/bin/env python
"""GPU check (`make gpu-check`): fp16 parity, throughput and actor rate of six models; 1M kNN.

Measures the code users run: each model is flagsim's own registry entry (its preprocessing,
pooling and loading), loaded with `create_embedder(name, weights=<dir>)` and
`flagsim.pipeline.mapper.EmbedActor` from a random-weight checkpoint of the real size that
bench/checkpoints.py writes to a temporary folder (configs with the published hyperparameters in
bench/archs.py; no weights are downloaded). The kNN section writes random vectors as a run's
embedding shards and searches them with `flagsim.search` (build_index + ModelIndex.search: FAISS
on the GPU when faiss sees one, on the CPU otherwise). Needs flagsim's dependencies; ray is not
used. Each section runs in its own try/except and the JSON + markdown results are rewritten
after every section, so a crash, a timeout or a kill still leaves everything measured so far in
--out (default: $OUT, else bench/out/gpu_check).

    python scripts/gpu_check.py                 # the full check on a GPU (about 5-7 minutes);
                                                # without a GPU: the CPU smoke run (--smoke)
    python scripts/gpu_check.py --smoke         # tiny checkpoints, small sizes, about a minute
    python scripts/gpu_check.py --budget-s 300 --models clip,vit --knn-n 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

log = logging.getLogger("gpu_check")

PARITY_MIN_COSINE = 0.999
KNN_RESERVE_S = 150.0  # budget kept for the kNN section (write shards, build, search, check)


class Budget:
    """Wall-clock budget for the whole check."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


class Results:
    """Sections measured so far; rewritten as JSON and markdown after every section."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {"meta": meta, "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.data["sections"][key] = value
        self.write()

    def write(self) -> None:
        self.data["meta"]["written_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        _atomic(self.out / "gpu_check.json", json.dumps(self.data, indent=2, default=_json))
        _atomic(self.out / "gpu_check.md", render_markdown(self.data))


def _json(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def section(results: Results, key: str, budget: Budget, need_s: float = 0.0):
    """Run one section: record ok/failed/skipped, its seconds and error, then write results."""
    rec: dict[str, Any] = {"status": "ok"}
    t0 = time.monotonic()
    if budget.left() < need_s:
        rec.update(status="skipped", error=f"budget: {budget.left():.0f}s left < {need_s:.0f}s needed")
        results.put(key, rec)
        log.warning("%s skipped (%s)", key, rec["error"])
        yield None
        return
    try:
        yield rec
    except Exception as exc:  # noqa: BLE001 - every section degrades on its own
        rec["status"] = "failed"
        rec["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        rec["traceback"] = traceback.format_exc().splitlines()[-6:]
        log.error("%s failed: %s", key, rec["error"])
    finally:
        rec["seconds"] = round(time.monotonic() - t0, 2)
        results.put(key, rec)
        _free()


def _free() -> None:
    import gc

    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_rate(fn, n_items: int, device, min_s: float = 1.0, max_iters: int = 50) -> float:
    """Items per second of `fn()` (which handles n_items): 1 warm-up, then >= min_s or max_iters."""
    fn()
    _sync(device)
    iters, t0 = 0, time.perf_counter()
    while True:
        fn()
        iters += 1
        _sync(device)
        dt = time.perf_counter() - t0
        if (dt >= min_s and iters >= 2) or iters >= max_iters:
            return n_items * iters / dt


@contextlib.contextmanager
def torch_threads_one():
    """One torch thread meanwhile (the CPU decoders are compared per core, as a read task runs)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


# --- environment ---------------------------------------------------------------------------------

def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": device,
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 1024**3, 1),
                   cuda=torch.version.cuda, capability=f"{p.major}.{p.minor}")
    for mod in ("transformers", "torchvision", "pyarrow", "faiss", "ray", "flagsim"):
        try:
            m = __import__(mod)
            env[mod] = str(getattr(m, "__version__", "present"))
        except Exception as exc:  # noqa: BLE001
            env[mod] = f"absent ({type(exc).__name__})"
    return env


def test_images(n: int = 256) -> tuple[list[np.ndarray], str]:
    """Decoded bundled flag PNGs (flagsim.decode), or synthetic flag-like arrays without them."""
    try:
        from flagsim.decode import decode_image
        from flagsim.images import bundled_flags_dir

        files = sorted((bundled_flags_dir() / "images").glob("*.png"))
        base = [decode_image(p.read_bytes()) for p in files]
        if base:
            return [base[i % len(base)] for i in range(n)], f"{len(base)} bundled flags"
    except Exception as exc:  # noqa: BLE001
        log.warning("bundled flags unavailable (%s); using synthetic images", exc)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(min(n, 64)):
        h = int(rng.integers(120, 260))
        im = np.zeros((h, 320, 3), np.uint8)
        for s in range(3):
            im[s * h // 3 : (s + 1) * h // 3] = rng.integers(0, 256, 3)
        out.append(im)
    return [out[i % len(out)] for i in range(n)], "synthetic 3-stripe flags"


# --- one registry model --------------------------------------------------------------------------

#: The registry models checked by default (the original experiment's six) and their batch sweeps.
MODELS: dict[str, tuple[int, ...]] = {
    "clip": (64, 128, 256, 512, 1024),
    "vit": (32, 64, 128, 256),
    "dinov2": (64, 128, 256, 512),
    "vgg16": (32, 64, 128, 256),
    "efficientnet": (16, 32, 64, 128),
    "blip2": (32, 64, 128, 256),
}
#: Left out of the CPU smoke run by default: torchvision's vgg16 has one (real) size, 138M
#: parameters, minutes on a small CPU in float16 (bench figure 3b loads it on the CPU instead).
SMOKE_SKIPS = ("vgg16",)


def check_model(name: str, rec: dict[str, Any], images: list[np.ndarray], device: str,
                smoke: bool, budget: Budget, reserve_s: float, workdir: Path) -> None:
    """Parity, batch-size sweep and actor rate of registry model `name`, loaded by flagsim from a
    random-weight checkpoint at real size (tiny in smoke mode; bench/checkpoints.py); keeps
    `reserve_s` of the budget for the sections after it."""
    import torch

    from bench.checkpoints import save_random_checkpoint
    from flagsim.models import create_embedder, get_spec

    spec = get_spec(name)
    rec["checkpoint"] = spec.weights
    t0 = time.monotonic()
    weights = save_random_checkpoint(name, workdir / name, tiny=smoke, device=device)
    rec["checkpoint_s"] = round(time.monotonic() - t0, 2)
    t0 = time.monotonic()
    emb = create_embedder(name, weights=weights, device=device, dtype="float32")
    rec["build_s"] = round(time.monotonic() - t0, 2)
    rec["params_m"] = round(sum(p.numel() for p in emb.model.parameters()) / 1e6, 1)
    rec["dim"] = emb.dim
    rec["processor"] = emb.processor_settings()

    # 1. fp16 vs fp32 parity on the same preprocessed pixels: flagsim loads the checkpoint in
    # float16 as the pipeline does (Embedder.forward casts the pixels to its dtype)
    x32 = emb.preprocess(images[: 4 if smoke else 16]).float().cpu()
    v32 = emb.forward(x32)
    dtype = throughput_dtype(device)
    rec["throughput_dtype"] = dtype
    if dtype != "float16":
        emb16 = create_embedder(name, weights=weights, device=device, dtype="float16")
        v16 = emb16.forward(x32)
        del emb16
    else:
        del emb
        _free()
        emb = create_embedder(name, weights=weights, device=device, dtype="float16")
        v16 = emb.forward(x32)
    cos = (v32 * v16).sum(1) / (np.linalg.norm(v32, axis=1) * np.linalg.norm(v16, axis=1) + 1e-30)
    rec["parity_min_cosine"] = float(np.min(cos))
    rec["parity_mean_cosine"] = float(np.mean(cos))
    rec["parity_ok"] = bool(np.all(np.isfinite(v16)) and np.min(cos) >= PARITY_MIN_COSINE)
    del x32

    # 2. throughput of the embedder: forward only, and Embedder.__call__ (preprocessing on the
    # model's device + forward), per batch size
    sizes = (4, 8) if smoke else MODELS.get(name, (32, 64, 128))
    min_s = 0.3 if smoke else 1.0
    sweep = []
    for bs in sizes:
        if budget.left() < reserve_s + 10:
            rec["sweep_note"] = f"stopped before batch {bs}: budget"
            break
        batch = [images[i % len(images)] for i in range(bs)]
        try:
            x = emb.preprocess(batch)
            fwd = timed_rate(lambda e=emb, x=x: e.forward(x), bs, device, min_s)
            e2e = timed_rate(lambda e=emb, b=batch: e(b), bs, device, min_s)
            peak = torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else None
            sweep.append({"batch": bs, "forward_img_s": fwd, "gpu_prep_img_s": e2e,
                          "peak_gib": peak})
            del x
        except Exception as exc:  # noqa: BLE001
            if is_oom(exc):
                sweep.append({"batch": bs, "oom": True})
                _free()
                break
            raise
    rec["sweep"] = sweep
    good = [s for s in sweep if "forward_img_s" in s]
    if good:
        best_f = max(good, key=lambda s: s["forward_img_s"])
        best_e = max(good, key=lambda s: s["gpu_prep_img_s"])
        rec["forward_img_s"] = best_f["forward_img_s"]
        rec["forward_best_batch"] = best_f["batch"]
        rec["gpu_prep_img_s"] = best_e["gpu_prep_img_s"]
        rec["gpu_prep_best_batch"] = best_e["batch"]
        rec["gpu_prep_share"] = best_e["gpu_prep_img_s"] / best_f["forward_img_s"]
    del emb
    _free()

    # 3. flagsim's actor (what a pipeline run executes), same checkpoint
    if budget.left() < reserve_s + 20:
        rec["actor_note"] = "skipped: budget"
        return
    bs = rec.get("forward_best_batch", sizes[0])
    try:
        rate, how, extra = actor_rate(name, weights, images, bs, device, min_s, dtype)
        rec["actor_img_s"] = rate
        rec["actor_path"] = how
        rec["actor_batch"] = bs
        rec.update(extra)
        if rec.get("forward_img_s"):
            rec["actor_share"] = rate / rec["forward_img_s"]
            if extra.get("actor_cpu_prep_img_s"):
                rec["actor_cpu_prep_share"] = extra["actor_cpu_prep_img_s"] / rec["forward_img_s"]
    except Exception as exc:  # noqa: BLE001
        rec["actor_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if is_oom(exc):
            _free()


def throughput_dtype(device: str) -> str:
    """float16 on the GPU (what the pipeline runs); float32 on a CPU (smoke runs: fp16 is slow)."""
    return "float16" if device == "cuda" else "float32"


def actor_rate(name: str, weights: str, images: list[np.ndarray], bs: int, device: str,
               min_s: float, dtype: str) -> tuple[float, str, dict[str, Any]]:
    """Images/s of flagsim.pipeline.mapper.EmbedActor on one batch of decoded images."""
    from flagsim.pipeline.mapper import EmbedActor
    from flagsim.pipeline.reader import OK, PIXELS

    actor = EmbedActor(name, weights=weights, device=device, dtype=dtype, micro_batch=bs)
    pix = np.empty(bs, dtype=object)
    for i in range(bs):
        pix[i] = images[i % len(images)]
    batch = {OK: np.ones(bs, dtype=bool), PIXELS: pix,
             "image_id": np.array([str(i) for i in range(bs)], dtype=object)}
    rate = timed_rate(functools.partial(actor, batch), bs, device, min_s)
    extra: dict[str, Any] = {}
    del actor
    _free()  # one copy of the model on the GPU at a time
    if device == "cuda":
        # the same actor with preprocessing on its CPU (embed.settings.<m>.preprocess_on: cpu)
        try:
            cpu_prep = EmbedActor(name, weights=weights, device=device, dtype=dtype,
                                  micro_batch=bs, preprocess_device="cpu")
            extra["actor_cpu_prep_img_s"] = timed_rate(lambda: cpu_prep(batch), bs, device, min_s)
            del cpu_prep
        except Exception as exc:  # noqa: BLE001
            extra["actor_cpu_prep_error"] = f"{type(exc).__name__}: {exc}"[:300]
            if is_oom(exc):
                _free()
    return rate, "flagsim.pipeline.mapper.EmbedActor (preprocessing on the device + forward)", extra


# --- search layer --------------------------------------------------------------------------------

def search_check(rec: dict[str, Any], n: int, d: int, k: int, n_q: int, workdir: Path) -> None:
    """flagsim's search layer on FAISS's GPU (when faiss sees one): flat fp32, flat fp16 and
    IVF-Flat (`flagsim.search.backend.FaissIndex`, the IVF one built by `build_index` as
    `flagsim index` builds it), each timed on `n_q` queries and its recall@k measured against
    the CPU flat index; plus the k > 2048 fallback to the CPU copy."""
    from bench.knn import model_of_dim, write_run
    from flagsim.config import IndexConfig
    from flagsim.search.backend import GPU_MAX_K, FaissIndex, gpu_count, to_gpu
    from flagsim.search.build import build_index
    from flagsim.search.vectors import normalise

    rng = np.random.default_rng(0)
    x = normalise(rng.standard_normal((n, d), dtype=np.float32))
    q = x[rng.choice(n, size=n_q, replace=False)]
    cpu = FaissIndex.create(d, "flat", "Flat", {})
    cpu.add(x)
    t0 = time.perf_counter()
    _, truth = cpu.search(q, k)
    rec.update(n=n, d=d, k=k, queries=n_q, gpus=gpu_count(), cpu_flat_qps=n_q / (time.perf_counter() - t0))

    def measure(name: str, index: Any) -> None:
        index.search(q[:8], k)  # warm up (GPU kernels, page faults)
        t = time.perf_counter()
        _, got = index.search(q, k)
        secs = time.perf_counter() - t
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth, strict=True)]))
        rec[name] = {"device": index.device, "qps": round(n_q / secs, 1), "recall": round(recall, 5)}

    if gpu_count() > 0:
        for name, fp16 in (("flat_fp32", False), ("flat_fp16", True)):
            measure(name, FaissIndex(cpu.faiss_index, "flat", {}, gpu=to_gpu(cpu.faiss_index, "flat", fp16)))
    model = model_of_dim(d)
    run_dir = str(workdir / "search-run")
    write_run(run_dir, model, x)
    t = time.perf_counter()
    ivf = build_index(run_dir, model, IndexConfig(kind="ivf", recall_sample=500))
    rec["ivf_build_s"] = round(time.perf_counter() - t, 2)
    rec["ivf_params"] = dict(ivf.manifest.params) if ivf.manifest else {}
    rec["ivf_manifest_recall"] = ivf.manifest.recall if ivf.manifest else None
    measure("ivf", ivf.index)
    big = min(GPU_MAX_K + 16, n)
    _, pos = ivf.index.search(q[:4], big)  # above the GPU limit: runs on the CPU copy
    rec["k_above_gpu_limit"] = {"k": big, "returned": int(pos.shape[1])}


# --- kNN -----------------------------------------------------------------------------------------

def knn_check(rec: dict[str, Any], n: int, d: int, k: int, device: str, budget: Budget,
              n_check: int, q_tile: int, workdir: Path) -> None:
    """Exact all-pairs top-k (self excluded) of n random vectors through flagsim's index code.

    The vectors are written as a run's embedding shards, `flagsim.search.build.build_index` builds the
    exact (flat) cosine index (FAISS on the GPU when faiss sees one, else on the CPU) and
    `ModelIndex.search` answers every row with itself excluded, tile by tile, as `flagsim
    neighbours` does. A sample of rows is checked against a float64 NumPy brute force. Stops
    early, recording how far it got and the projected total, when the budget runs out.
    """
    from bench.knn import model_of_dim, write_run
    from flagsim.config import IndexConfig
    from flagsim.search.build import build_index
    from flagsim.search.vectors import normalise

    model = model_of_dim(d)
    run_dir = str(workdir / "knn-run")
    t0 = time.perf_counter()
    x = normalise(np.random.default_rng(0).standard_normal((n, d), dtype=np.float32))
    write_run(run_dir, model, x)
    rec.update(n=n, d=d, k=k, q_tile=q_tile, model=model, data_s=time.perf_counter() - t0)
    t0 = time.perf_counter()
    index = build_index(run_dir, model, IndexConfig(kind="flat", exact_max_rows=max(n, 1),
                                                    memory_budget_gb=1024.0))
    rec["build_s"] = time.perf_counter() - t0
    rec["index_device"] = index.manifest.device if index.manifest else "?"
    rec["index_kind"] = index.manifest.kind if index.manifest else "?"
    ids = index.ids
    got = np.empty((n, k), np.int64)
    got_s = np.empty((n, k), np.float32)
    done = 0
    deadline = budget.left() - 40  # keep time for the reference check and writing
    t0 = time.perf_counter()
    for s in range(0, n, q_tile):
        e = min(s + q_tile, n)
        scores, pos = index.search(x[s:e], k, exclude=list(ids[s:e]), normalised=True)
        got[s:e], got_s[s:e] = pos, scores
        done = e
        if time.perf_counter() - t0 > deadline:
            break
    secs = time.perf_counter() - t0
    rec.update(queries_done=done, knn_s=secs, queries_per_s=done / secs, complete=done == n,
               projected_total_s=secs * n / max(done, 1),
               matmul_tflops=2.0 * done * n * d / secs / 1e12)
    if device == "cuda":
        import torch

        rec["peak_gib"] = torch.cuda.max_memory_allocated() / 1024**3

    # reference on a sample of the finished rows: float64 NumPy brute force, self excluded
    rows = np.unique(np.random.default_rng(1).integers(0, max(done, 1), n_check))
    rows = rows[rows < done]
    x64 = x.astype(np.float64)
    ref_i = np.empty((len(rows), k), np.int64)
    ref_s = np.empty((len(rows), k), np.float64)
    for a in range(0, len(rows), 100):
        r = rows[a : a + 100]
        sims = x64[r] @ x64.T
        sims[np.arange(len(r)), r] = -np.inf
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        ps = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-ps, axis=1, kind="stable")
        ref_i[a : a + 100] = np.take_along_axis(part, order, axis=1)
        ref_s[a : a + 100] = np.take_along_axis(ps, order, axis=1)
    rec["reference"] = "numpy float64 brute force"
    same = np.all(got[rows] == ref_i, axis=1)
    rec["checked_rows"] = len(rows)
    rec["identical_rows"] = float(same.mean()) if len(rows) else None
    rec["max_score_gap"] = float(np.max(np.abs(got_s[rows] - ref_s))) if len(rows) else None
    rec["recall_at_k"] = float(np.mean(
        [len(set(a) & set(b)) / k for a, b in zip(got[rows], ref_i, strict=True)]))
    rec["exact"] = bool(rec["identical_rows"] == 1.0 or (rec["max_score_gap"] or 0) <= 1e-5)


# --- report --------------------------------------------------------------------------------------

# --- JPEG decoding: PIL vs torchvision.io.decode_jpeg (embed.jpeg_decoder) ------------------------

def jpeg_check(rec: dict[str, Any], images: list[np.ndarray], device: str, smoke: bool) -> None:
    """Decode the same JPEG batches with PIL (`flagsim.decode.decode_image`, one CPU thread, what
    the read tasks run by default) and with `decode_batch_torchvision` on the CPU and, with a
    GPU, on cuda (what `embed.jpeg_decoder: torchvision` runs); rates and pixel parity."""
    import io

    import torch
    from PIL import Image

    from flagsim.decode import decode_batch_torchvision, decode_image

    sizes = (320,) if smoke else (320, 1024)
    n = 16 if smoke else 256
    rec["cases"] = []
    for width in sizes:
        datas = []
        for im in images[:n]:
            pil = Image.fromarray(im)
            if pil.width != width:
                pil = pil.resize((width, max(1, round(pil.height * width / pil.width))))
            buf = io.BytesIO()
            pil.save(buf, "JPEG", quality=90)
            datas.append(buf.getvalue())
        ref = [decode_image(d) for d in datas]
        case: dict[str, Any] = {"width": width, "images": len(datas),
                                "pil_img_s": timed_rate(lambda datas=datas: [decode_image(d) for d in datas],
                                                        len(datas), "cpu")}
        devices = ["cpu"] + (["cuda"] if device == "cuda" and torch.cuda.is_available() else [])
        for dev in devices:
            out = decode_batch_torchvision(datas, device=dev)
            diff = max(int(np.abs(o.astype(np.int16) - r).max()) for o, r in zip(out, ref, strict=True))
            case[f"torchvision_{dev}_img_s"] = timed_rate(
                lambda dev=dev, datas=datas: decode_batch_torchvision(datas, device=dev), len(datas), dev)
            case[f"torchvision_{dev}_max_abs_diff"] = diff
        rec["cases"].append(case)
    if device != "cuda":
        rec["note"] = "no GPU: the cuda decoder was not measured (CPU rows only)"


def _f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def render_markdown(data: dict[str, Any]) -> str:
    meta, secs = data["meta"], data["sections"]
    env = secs.get("environment", {})
    lines = ["# flagsim GPU check", ""]
    lines.append(f"Mode: {'SMOKE (tiny checkpoints, small sizes)' if meta.get('smoke') else 'full'}; "
                 f"device: {env.get('gpu') or env.get('device', '?')}; torch {env.get('torch', '?')}, "
                 f"transformers {env.get('transformers', '?')}, faiss {env.get('faiss', '?')}; "
                 f"budget {meta.get('budget_s')} s; written {meta.get('written_at')}.")
    lines += ["", "flagsim's registry models loaded from random-weight checkpoints of the real size "
              "(tiny in smoke mode; VGG16 is always real size); parity compares fp16 with fp32 "
              "on the same pixels; throughput runs in fp16 on a GPU (fp32 on a CPU); images are "
              f"{meta.get('images', 'decoded flags')}.", ""]
    lines.append("| model | params (M) | fp16 vs fp32 min cosine | parity | forward img/s (batch) "
                 "| embedder img/s (batch) | share of forward | flagsim actor img/s "
                 "| actor share of forward | actor, CPU preprocessing: share | status |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, r in secs.items():
        if not key.startswith("model:"):
            continue
        name = key.split(":", 1)[1]
        if r.get("status") != "ok":
            lines.append(f"| {name} | | | | | | | | | | {r.get('status')}: {r.get('error', '')} |")
            continue
        lines.append(
            f"| {name} | {_f(r.get('params_m'))} | {_f(r.get('parity_min_cosine'), 5)} "
            f"| {_f(r.get('parity_ok'))} | {_f(r.get('forward_img_s'))} ({r.get('forward_best_batch')}) "
            f"| {_f(r.get('gpu_prep_img_s'))} ({r.get('gpu_prep_best_batch')}) "
            f"| {_f(r.get('gpu_prep_share'), 2)} | {_f(r.get('actor_img_s'))} "
            f"| {_f(r.get('actor_share'), 2)} | {_f(r.get('actor_cpu_prep_share'), 2)} "
            f"| ok{'; ' + r['actor_error'] if r.get('actor_error') else ''} |"
        )
    lines += ["", "Columns: *forward* = `Embedder.forward` on ready pixel tensors (best batch); "
              "*embedder* = `Embedder.__call__` on decoded images (the registry's preprocessing "
              "on the model's device + forward); *flagsim actor* = `EmbedActor.__call__` on a "
              "batch of decoded images (what a pipeline run executes); *CPU preprocessing* = the "
              "same actor with `preprocess_on: cpu`. Shares are divided by the forward-only rate."]
    srch = secs.get("search")
    if srch:
        lines += ["", "## Search layer (flagsim.search: FaissIndex, build_index)", ""]
        if srch.get("status") != "ok":
            lines.append(f"{srch.get('status')}: {srch.get('error', '')}")
        else:
            lines.append(f"N x d = {srch['n']} x {srch['d']}, k = {srch['k']}, {srch['queries']} "
                         f"queries; FAISS GPUs: {srch['gpus']}; CPU flat {srch['cpu_flat_qps']:.0f} q/s.")
            lines += ["", "| index | device | queries/s | recall@k vs CPU flat |", "|---|---|---|---|"]
            for name in ("flat_fp32", "flat_fp16", "ivf"):
                r = srch.get(name)
                if r:
                    lines.append(f"| {name} | {r['device']} | {r['qps']:.0f} | {r['recall']:.4f} |")
            lines.append(f"\nIVF {srch.get('ivf_params')} (manifest recall {srch.get('ivf_manifest_recall')}); "
                         f"k above the GPU limit: {srch.get('k_above_gpu_limit')}.")
    k = secs.get("knn")
    if k:
        lines += ["", "## All-pairs exact top-k (flagsim.search)", ""]
        if k.get("status") != "ok":
            lines.append(f"{k.get('status')}: {k.get('error', '')}")
        else:
            lines.append("| N x d | k | index (device) | build s | queries done | search s "
                         "| queries/s | TFLOP/s | projected total s | checked rows "
                         "| identical to reference | recall@k | reference |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            lines.append(
                f"| {k['n']:,} x {k['d']} | {k['k']} | {k.get('index_kind')} "
                f"({k.get('index_device')}) | {_f(k.get('build_s'))} | {k['queries_done']:,} "
                f"| {_f(k['knn_s'])} | {_f(k['queries_per_s'], 0)} | {_f(k['matmul_tflops'], 3)} "
                f"| {_f(k['projected_total_s'])} | {k.get('checked_rows')} "
                f"| {_f(k.get('identical_rows'), 4)} | {_f(k.get('recall_at_k'), 4)} "
                f"| {k.get('reference')} |")
    j = secs.get("jpeg_decode")
    if j:
        lines += ["", "## JPEG decoding: PIL vs torchvision.io.decode_jpeg (embed.jpeg_decoder)", ""]
        if j.get("status") != "ok":
            lines.append(f"{j.get('status')}: {j.get('error', '')}")
        else:
            lines.append("| width px | images | PIL img/s (1 thread) | torchvision cpu img/s "
                         "| cpu max abs diff | torchvision cuda img/s | cuda max abs diff |")
            lines.append("|---|---|---|---|---|---|---|")
            for c in j.get("cases", []):
                lines.append(
                    f"| {c['width']} | {c['images']} | {_f(c['pil_img_s'])} "
                    f"| {_f(c.get('torchvision_cpu_img_s'))} | {_f(c.get('torchvision_cpu_max_abs_diff'))} "
                    f"| {_f(c.get('torchvision_cuda_img_s'))} | {_f(c.get('torchvision_cuda_max_abs_diff'))} |")
            if j.get("note"):
                lines.append(f"\n{j['note']}")
    failed = [f"{key}: {r.get('error')}" for key, r in secs.items() if r.get("status") == "failed"]
    if failed:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in failed]
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "out" / "gpu_check"),
                   help="output folder (default: $OUT, else bench/out/gpu_check)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total wall-clock budget in seconds (default 420; 240 with --smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny checkpoints and small sizes (what a machine without a GPU runs)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--models", "--archs", dest="models", default=None,
                   help="comma-separated registry models (default: " + ", ".join(MODELS)
                   + "; the smoke run leaves out " + ", ".join(SMOKE_SKIPS) + ")")
    p.add_argument("--knn-n", type=int, default=None, help="database size (default 1,000,000)")
    p.add_argument("--knn-d", type=int, default=768)
    p.add_argument("--knn-k", type=int, default=10)
    p.add_argument("--skip-knn", action="store_true")
    p.add_argument("--workdir", default=None,
                   help="where checkpoints and the kNN run are written (default: a temporary folder)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("faiss.loader", "flagsim.models.hf", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    from bench.checkpoints import MODELS as WRITABLE

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # without a GPU this is the CPU smoke run: tiny checkpoints, small sizes, quick
    smoke = args.smoke or device != "cuda"
    budget = Budget(args.budget_s or (240.0 if smoke else 420.0))
    default = [m for m in MODELS if not (smoke and m in SMOKE_SKIPS)]
    names = [a.strip() for a in args.models.split(",") if a.strip()] if args.models else default
    unknown = [a for a in names if a not in WRITABLE]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(WRITABLE)}")
    out = Path(args.out)
    results = Results(out, {"smoke": smoke, "budget_s": budget.seconds, "argv": sys.argv[1:],
                            "started_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity reference stays fp32
        torch.backends.cudnn.benchmark = True

    with section(results, "environment", budget) as rec:
        rec.update(environment(device))
    images, source = test_images(256 if not smoke else 16)
    results.data["meta"]["images"] = source

    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        reserve = 0.0 if args.skip_knn else (20.0 if smoke else KNN_RESERVE_S)
        for name in names:
            with section(results, f"model:{name}", budget, need_s=reserve + 25) as rec:
                if rec is not None:
                    check_model(name, rec, images, device, smoke, budget, reserve, workdir)
            shutil.rmtree(workdir / name, ignore_errors=True)  # a real-size checkpoint is GBs
        with section(results, "jpeg_decode", budget, need_s=10) as rec:
            if rec is not None:
                with torch_threads_one():
                    jpeg_check(rec, images, device, smoke)
        if not args.skip_knn:
            with section(results, "search", budget, need_s=30) as rec:
                if rec is not None:
                    search_check(rec, 5_000 if smoke else 1_000_000, args.knn_d, 10,
                                 200 if smoke else 10_000, workdir)
            n = args.knn_n or (5_000 if smoke else 1_000_000)
            with section(results, "knn", budget, need_s=15) as rec:
                if rec is not None:
                    knn_check(rec, n, args.knn_d, args.knn_k, device, budget,
                              n_check=200 if smoke else 1000, q_tile=1024 if smoke else 16384,
                              workdir=workdir)
    results.data["meta"]["total_s"] = round(budget.elapsed(), 1)
    results.write()
    log.info("results: %s and %s\n%s", out / "gpu_check.json", out / "gpu_check.md",
             render_markdown(results.data))
    bad = [k for k, r in results.data["sections"].items() if r.get("status") == "failed"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
