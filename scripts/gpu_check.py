#!/usr/bin/env python
"""GPU check (`make gpu-check`): fp16 parity, throughput and actor share of six models; 1M kNN.

Runs on a bare single-GPU machine with no network: needs torch and transformers (torchvision,
pyarrow, flagsim's own imports and faiss-cpu are used when present, never required; ray is not
used). Every model has random weights at its real size, built from the transformers config
classes with the real hyperparameters (bench/archs.py). Each section runs in its own try/except
and the JSON + markdown results are rewritten after every section, so a crash, a timeout or a
kill still leaves everything measured so far in --out (default: $OUT, else bench/out/gpu_check).

    python scripts/gpu_check.py                 # the full check (about 5-7 minutes on an H100)
    python scripts/gpu_check.py --smoke         # tiny sizes, runs on a CPU in about a minute
    python scripts/gpu_check.py --budget-s 300 --archs clip-b32,vit-l16 --knn-n 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import platform
import sys
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
KNN_RESERVE_S = 100.0  # budget kept for the kNN section while the model sections run


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


# --- one architecture ----------------------------------------------------------------------------

def check_arch(name: str, rec: dict[str, Any], images: list[np.ndarray], device: str, smoke: bool,
               budget: Budget, reserve_s: float) -> None:
    """Parity, batch-size sweep and actor share of one architecture; keeps `reserve_s` of the
    budget for the sections after it."""
    import torch

    from bench.archs import ARCHS, RandomEmbedder

    arch = ARCHS[name]
    rec["checkpoint"] = arch.checkpoint
    t0 = time.monotonic()
    emb = RandomEmbedder(arch, device=device, dtype="float32", tiny=smoke)
    rec["build_s"] = round(time.monotonic() - t0, 2)
    rec["params_m"] = round(sum(p.numel() for p in emb.module.parameters()) / 1e6, 1)
    rec["dim"] = emb.dim

    # 1. fp16 vs fp32 parity on the same preprocessed pixels
    x32 = emb.preprocess(images[: 4 if smoke else 16])
    v32 = emb.forward(x32)
    emb.to_dtype("float16")
    v16 = emb.forward(x32.half())
    cos = (v32 * v16).sum(1) / (np.linalg.norm(v32, axis=1) * np.linalg.norm(v16, axis=1) + 1e-30)
    rec["parity_min_cosine"] = float(np.min(cos))
    rec["parity_mean_cosine"] = float(np.mean(cos))
    rec["parity_ok"] = bool(np.all(np.isfinite(v16)) and np.min(cos) >= PARITY_MIN_COSINE)
    del x32
    dtype = throughput_dtype(device)
    rec["throughput_dtype"] = dtype
    emb.to_dtype(dtype)

    # 2. throughput: forward only, and with preprocessing on the device, per batch size
    sizes = (4, 8) if smoke else arch.batch_sizes
    min_s = 0.3 if smoke else 1.0
    sweep = []
    for bs in sizes:
        if budget.left() < reserve_s + 10:
            rec["sweep_note"] = f"stopped before batch {bs}: budget"
            break
        batch = [images[i % len(images)] for i in range(bs)]
        try:
            x = emb.preprocess(batch)
            fwd = timed_rate(lambda e=emb, x=x: e.forward_tensor(x), bs, device, min_s)
            e2e = timed_rate(lambda e=emb, b=batch: e.forward(e.preprocess(b)), bs, device, min_s)
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

    # 3. flagsim's actor (its own preprocessing + forward), same architecture and size
    if budget.left() < reserve_s + 20:
        rec["actor_note"] = "skipped: budget"
        return
    bs = rec.get("forward_best_batch", sizes[0])
    try:
        rate, how, extra = actor_rate(arch, images, bs, device, smoke, min_s, dtype)
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


def actor_rate(arch, images, bs: int, device: str, smoke: bool, min_s: float,
               dtype: str) -> tuple[float, str, dict[str, Any]]:
    """Images/s of flagsim.pipeline.mapper.EmbedActor on one batch (registered real-size spec)."""
    import torch

    from bench.archs import flagsim_spec, flagsim_weights
    from flagsim.models import register_model, unregister_model
    from flagsim.pipeline.mapper import EmbedActor
    from flagsim.pipeline.reader import OK, PIXELS

    spec = register_model(flagsim_spec(arch, tiny=smoke), replace=True)
    weights = flagsim_weights(arch, tiny=smoke)
    try:
        ctx = torch.device(device) if device == "cuda" else contextlib.nullcontext()
        with ctx:
            actor = EmbedActor(spec.name, device=device, dtype=dtype, weights=weights)
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
                with ctx:
                    cpu_prep = EmbedActor(spec.name, device=device, dtype=dtype, weights=weights,
                                          preprocess_device="cpu")
                extra["actor_cpu_prep_img_s"] = timed_rate(lambda: cpu_prep(batch), bs, device,
                                                           min_s)
                del cpu_prep
            except Exception as exc:  # noqa: BLE001
                extra["actor_cpu_prep_error"] = f"{type(exc).__name__}: {exc}"[:300]
                if is_oom(exc):
                    _free()
        return rate, "flagsim.pipeline.mapper.EmbedActor (preprocessing on the device + forward)", extra
    finally:
        unregister_model(spec.name)


# --- kNN -----------------------------------------------------------------------------------------

def knn_check(rec: dict[str, Any], n: int, d: int, k: int, device: str, budget: Budget,
              n_check: int, q_tile: int, n_cand: int) -> None:
    """Exact all-pairs top-k (self excluded) of n random unit vectors.

    Per tile of queries: an fp16 matmul against the whole database and topk give `n_cand`
    candidates; rescoring those in fp32 and a second topk give the exact top-k (fp16 alone
    misorders near-ties: random 768-d unit vectors have neighbour gaps of ~1e-3). Checked on
    a sample of rows against faiss-cpu IndexFlatIP (or NumPy) on the fp32 vectors. Stops early,
    recording how far it got and the projected total, when the budget runs out.
    """
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    x32 = torch.randn(n, d, device=device, generator=gen, dtype=torch.float32)
    x32 /= x32.norm(dim=1, keepdim=True)
    low = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    x16 = x32.to(low)  # the candidate matmul runs in fp16 on a GPU (fp32 on a CPU smoke run)
    _sync(device)
    rec.update(n=n, d=d, k=k, candidates=n_cand, q_tile=q_tile, matmul_dtype=str(low),
               data_s=time.perf_counter() - t0)
    ids = torch.empty(n, k, dtype=torch.int64, device=device)
    scores = torch.empty(n, k, dtype=torch.float32, device=device)
    fp16_ids = {}  # fp16-only top-k of the checked sample rows (to show why rescoring matters)
    check_rows = np.unique(np.random.default_rng(1).integers(0, n, n_check))
    check_set = set(check_rows.tolist())
    done = 0
    deadline = budget.left() - 40  # keep time for the reference check and writing
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, n, q_tile):
            e = min(s + q_tile, n)
            sims = x16[s:e] @ x16.T  # [tile, n] fp16
            rows = torch.arange(e - s, device=device)
            sims[rows, rows + s] = float("-inf")  # no self matches
            _, cand = torch.topk(sims, n_cand, dim=1)
            del sims
            exact = torch.einsum("qd,qcd->qc", x32[s:e], x32[cand])  # fp32 rescoring
            top_s, pos = torch.topk(exact, k, dim=1)
            ids[s:e] = torch.gather(cand, 1, pos)
            scores[s:e] = top_s
            for r in range(s, e):
                if r in check_set:
                    fp16_ids[r] = cand[r - s, :k].cpu().numpy()
            done = e
            if time.perf_counter() - t0 > deadline:
                break
    _sync(device)
    secs = time.perf_counter() - t0
    rec.update(queries_done=done, knn_s=secs, queries_per_s=done / secs,
               complete=done == n, projected_total_s=secs * n / max(done, 1),
               matmul_tflops=2.0 * done * n * d / secs / 1e12)
    if device == "cuda":
        rec["peak_gib"] = torch.cuda.max_memory_allocated() / 1024**3

    # reference on a sample of the finished rows: faiss-cpu IndexFlatIP, else NumPy
    rows = np.array([r for r in check_rows if r < done], dtype=np.int64)
    xc = x32.cpu().numpy()
    del x16
    q = xc[rows]
    try:
        import faiss

        index = faiss.IndexFlatIP(d)
        index.add(xc)
        ref_s, ref_i = index.search(q, k + 1)
        rec["reference"] = f"faiss-cpu {faiss.__version__} IndexFlatIP"
    except ImportError:
        ref_s = np.empty((len(q), k + 1), np.float32)
        ref_i = np.empty((len(q), k + 1), np.int64)
        for a in range(0, len(q), 100):
            sims = q[a : a + 100] @ xc.T
            part = np.argpartition(-sims, k, axis=1)[:, : k + 1]
            ps = np.take_along_axis(sims, part, axis=1)
            order = np.argsort(-ps, axis=1)
            ref_i[a : a + 100] = np.take_along_axis(part, order, axis=1)
            ref_s[a : a + 100] = np.take_along_axis(ps, order, axis=1)
        rec["reference"] = "numpy brute force (faiss not installed)"
    ref_i2 = np.array([[j for j in row if j != r][:k] for row, r in zip(ref_i, rows, strict=True)])
    ref_s2 = np.array([[s for s, j in zip(srow, row, strict=True) if j != r][:k]
                       for srow, row, r in zip(ref_s, ref_i, rows, strict=True)])
    got_i = ids[torch.from_numpy(rows).to(device)].cpu().numpy()
    got_s = scores[torch.from_numpy(rows).to(device)].cpu().numpy()
    same = np.all(got_i == ref_i2, axis=1)
    rec["checked_rows"] = len(rows)
    rec["identical_rows"] = float(same.mean()) if len(rows) else None
    rec["max_score_gap"] = float(np.max(np.abs(got_s - ref_s2))) if len(rows) else None
    rec["recall_at_k"] = float(np.mean(
        [len(set(a) & set(b)) / k for a, b in zip(got_i, ref_i2, strict=True)]))
    f16 = [fp16_ids[r] for r in rows if r in fp16_ids]
    if f16:
        ref_map = dict(zip(rows.tolist(), ref_i2, strict=True))
        rec["fp16_only_identical_rows"] = float(np.mean(
            [np.array_equal(fp16_ids[r], ref_map[r]) for r in rows if r in fp16_ids]))
    rec["exact"] = bool(rec["identical_rows"] == 1.0 or (rec["max_score_gap"] or 0) <= 1e-5)


# --- report --------------------------------------------------------------------------------------

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
    lines.append(f"Mode: {'SMOKE (tiny models, small sizes)' if meta.get('smoke') else 'full'}; "
                 f"device: {env.get('gpu') or env.get('device', '?')}; torch {env.get('torch', '?')}, "
                 f"transformers {env.get('transformers', '?')}, faiss {env.get('faiss', '?')}; "
                 f"budget {meta.get('budget_s')} s; written {meta.get('written_at')}.")
    lines += ["", "Random weights at real size (tiny in smoke mode); parity compares fp16 with fp32 "
              "on the same pixels; throughput runs in fp16 on a GPU (fp32 on a CPU); images are "
              f"{meta.get('images', 'decoded flags')}.", ""]
    lines.append("| model | params (M) | fp16 vs fp32 min cosine | parity | forward img/s (batch) "
                 "| GPU-preprocessed img/s (batch) | share of forward | flagsim actor img/s "
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
    lines += ["", "Columns: *forward* = the model alone on ready tensors (best batch); "
              "*GPU-preprocessed* = uint8 upload + resize/crop/normalise on the device + forward "
              "(bench/archs.py); *flagsim actor* = `EmbedActor.__call__` on a batch of decoded "
              "images (flagsim's own preprocessing, on the model's device, + forward); *CPU "
              "preprocessing* = the same actor with `preprocess_on: cpu`. Shares are divided by "
              "the forward-only rate."]
    k = secs.get("knn")
    if k:
        lines += ["", "## All-pairs exact top-k", ""]
        if k.get("status") != "ok":
            lines.append(f"{k.get('status')}: {k.get('error', '')}")
        else:
            lines.append("| N x d | k | queries done | seconds | queries/s | matmul TFLOP/s "
                         "| projected total s | checked rows | identical to reference | recall@k "
                         "| fp16-only identical | reference |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
            lines.append(
                f"| {k['n']:,} x {k['d']} | {k['k']} | {k['queries_done']:,} | {_f(k['knn_s'])} "
                f"| {_f(k['queries_per_s'], 0)} | {_f(k['matmul_tflops'], 3)} "
                f"| {_f(k['projected_total_s'])} | {k.get('checked_rows')} "
                f"| {_f(k.get('identical_rows'), 4)} | {_f(k.get('recall_at_k'), 4)} "
                f"| {_f(k.get('fp16_only_identical_rows'), 4)} | {k.get('reference')} |")
    failed = [f"{key}: {r.get('error')}" for key, r in secs.items() if r.get("status") == "failed"]
    if failed:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in failed]
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from bench.archs import ARCHS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "out" / "gpu_check"),
                   help="output folder (default: $OUT, else bench/out/gpu_check)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total wall-clock budget in seconds (default 420; 240 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny models and sizes (CPU is fine)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset of: "
                   + ", ".join(ARCHS))
    p.add_argument("--knn-n", type=int, default=None, help="database size (default 1,000,000)")
    p.add_argument("--knn-d", type=int, default=768)
    p.add_argument("--knn-k", type=int, default=10)
    p.add_argument("--skip-knn", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    budget = Budget(args.budget_s or (240.0 if args.smoke else 420.0))
    names = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARCHS]
    if unknown:
        p.error(f"unknown arch(s) {unknown}; choose from {', '.join(ARCHS)}")
    out = Path(args.out)
    results = Results(out, {"smoke": args.smoke, "budget_s": budget.seconds, "argv": sys.argv[1:],
                            "started_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity reference stays fp32
        torch.backends.cudnn.benchmark = True

    with section(results, "environment", budget) as rec:
        rec.update(environment(device))
    images, source = test_images(256 if not args.smoke else 16)
    results.data["meta"]["images"] = source

    reserve = 0.0 if args.skip_knn else (20.0 if args.smoke else KNN_RESERVE_S)
    for name in names:
        with section(results, f"model:{name}", budget, need_s=reserve + 25) as rec:
            if rec is not None:
                check_arch(name, rec, images, device, args.smoke, budget, reserve)
    if not args.skip_knn:
        n = args.knn_n or (5_000 if args.smoke else 1_000_000)
        with section(results, "knn", budget, need_s=15) as rec:
            if rec is not None:
                knn_check(rec, n, args.knn_d, args.knn_k, device, budget,
                          n_check=200 if args.smoke else 1000,
                          q_tile=1024 if args.smoke else 4096, n_cand=32)
    results.data["meta"]["total_s"] = round(budget.elapsed(), 1)
    results.write()
    print(render_markdown(results.data))
    print(f"results: {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    bad = [k for k, r in results.data["sections"].items() if r.get("status") == "failed"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
