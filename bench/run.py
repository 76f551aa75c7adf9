"""`make bench`: run the benchmark figures side by side and write docs/benchmarks.md + raw JSON.

    python -m bench.run                       # everything (about 12-15 minutes on 2 cores)
    python -m bench.run --only knn,preprocess # a subset (figure keys below)
    python -m bench.run --quick               # tiny sizes: checks that every figure runs

Figure 8 (`search_scale`, the neighbour table through the CLI next to bare FAISS) takes its sizes
from FLAGSIM_BENCH_SEARCH (default "256:100k,300k,1M;768:100k,300k,1M") and measures a size only
while its predicted time fits FLAGSIM_BENCH_SEARCH_CASE_S (600) and FLAGSIM_BENCH_SEARCH_BUDGET_S
(1800); the rest are projected (see bench/search_scale.py). The whole issue grid:
    FLAGSIM_BENCH_SEARCH_CASE_S=20000 FLAGSIM_BENCH_SEARCH_BUDGET_S=200000 \
        python -m bench.run --only search_scale --merge
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Figure, machine_info
from bench.report import render

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("knn", "preprocess", "memory_format", "efficiency", "original", "many_models", "scale", "gpu",
           "search_scale", "report_scale", "inputs", "query_one")


def _quiet_logs() -> None:
    for name in ("ray", "ray.data", "faiss.loader", "filelock", "httpx", "urllib3",
                 "transformers", "flagsim.images", "flagsim.pipeline", "flagsim.models"):
        logging.getLogger(name).setLevel(logging.WARNING)


def gpu_figure(smoke_budget_s: float, gpu_json: Path | None) -> Figure:
    """Figure 7: the prepared GPU check; a GPU run's JSON when one exists, and a CPU smoke run."""
    import torch

    fig = Figure("gpu", "7. GPU check (scripts/gpu_check.py, `make gpu-check`)")
    fig.raw["cuda_available"] = torch.cuda.is_available()
    if gpu_json is not None and gpu_json.is_file():
        data = json.loads(gpu_json.read_text(encoding="utf-8"))
        fig.raw["gpu_run"] = data
        fig.notes.append(f"GPU results from {gpu_json.relative_to(REPO) if gpu_json.is_relative_to(REPO) else gpu_json} "
                         f"(written {data['meta'].get('written_at')}).")
    else:
        fig.notes.append(
            "No GPU was lent to the session that produced these numbers, so no GPU figures are "
            "reported. The script is ready for a single-GPU machine with flagsim's dependencies "
            "installed (no ray, no network: it writes its own random-weight checkpoints): `python scripts/gpu_check.py --out "
            "$OUT` (--budget-s, default 420 s); copy its gpu_check.json to bench/gpu_check.json "
            "and rerun `make bench` to include it here.")
    with tempfile.TemporaryDirectory(prefix="flagsim-gpucheck-") as out:
        cmd = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--smoke", "--out", out,
               "--budget-s", str(smoke_budget_s)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=smoke_budget_s + 300,
                              cwd=str(REPO), env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        fig.raw["smoke_rc"] = proc.returncode
        fig.raw["smoke_s"] = time.perf_counter() - t0
        path = Path(out) / "gpu_check.json"
        if path.is_file():
            fig.raw["smoke_run"] = json.loads(path.read_text(encoding="utf-8"))
        else:
            fig.raw["smoke_stderr_tail"] = proc.stderr[-2000:]
    ok = fig.raw["smoke_rc"] == 0 and "smoke_run" in fig.raw
    fig.notes.append(
        f"CPU smoke run (`--smoke`: tiny checkpoints of flagsim's registry models, 5,000-vector "
        f"kNN through flagsim.search, fp32 throughput on the CPU) "
        f"{'passed' if ok else 'FAILED'} in {fig.raw['smoke_s']:.0f} s: every section ran and "
        "wrote its JSON and markdown. Its numbers only prove the script works; they are not "
        "benchmarks.")
    if not ok:
        fig.status = "failed"
        fig.error = f"gpu_check --smoke exited {fig.raw['smoke_rc']}"
    return fig


def plan(quick: bool) -> dict[str, Callable[[Any], Figure]]:
    """Figure key -> function(workspace) -> Figure, with this run's sizes."""
    from bench import inputs, knn, memory_format, preprocess, query_one, report_scale, search_scale
    from bench import pipeline as P

    if quick:
        eff = [P.EffCase("clip", "CLIP ViT-B/32", 40, 16, 8, False)]
        sizes = {"knn_n": (10_000,), "knn_q": 200, "prep_n": 32, "orig_n": 3, "many_n": 40, "mf_n": 8,
                 "scale": (200, 2_000), "smoke_budget": 120.0,
                 "report": (2_000, 4_000, 10_000), "inputs": ((2_000, 5_000), 2_000, False)}
    else:
        eff = [P.EffCase("clip", "CLIP ViT-B/32", 352, 96, 32, True),
               P.EffCase("vit", "ViT-L/16", 56, 16, 8, False)]
        sizes = {"knn_n": (10_000, 100_000), "knn_q": 1000, "prep_n": 64, "orig_n": 16,
                 "many_n": 394, "mf_n": 32, "scale": (2_000, 20_000), "smoke_budget": 150.0,
                 "report": (10_000, 20_000, 100_000),
                 "inputs": ((20_000, 50_000, 200_000), 20_000, True)}
    state: dict[str, Figure] = {}

    def efficiency(ws):
        state["efficiency"] = P.fig_efficiency(ws, eff)
        return state["efficiency"]

    return {
        "knn": lambda ws: knn.run(n_values=sizes["knn_n"], n_queries=sizes["knn_q"]),
        "preprocess": lambda ws: preprocess.run(n_images=sizes["prep_n"]),
        "memory_format": lambda ws: memory_format.run(n_images=sizes["mf_n"], quick=quick),
        "efficiency": efficiency,
        "original": lambda ws: P.fig_original(ws, sizes["orig_n"], state.get("efficiency")),
        "many_models": lambda ws: P.fig_many_models(
            ws, sizes["many_n"], ["efficientnet-lite0", "pixels"]),
        "scale": lambda ws: P.fig_scale(ws, sizes["scale"]),
        "report_scale": lambda ws: report_scale.run(sizes["report"]),
        "inputs": lambda ws: inputs.run(ws, *sizes["inputs"]),
        "gpu": lambda ws: gpu_figure(sizes["smoke_budget"], REPO / "bench" / "gpu_check.json"),
        "search_scale": lambda ws: search_scale.run(quick=quick),
        "query_one": lambda ws: query_one.run(((5_000, 64),) if quick else ((300_000, 256), (300_000, 1152))),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="flagsim benchmark suite")
    p.add_argument("--only", default="", help=f"comma-separated figures: {', '.join(FIGURES)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a few minutes)")
    p.add_argument("--md", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--json", default=str(REPO / "bench" / "results.json"))
    p.add_argument("--merge", action="store_true",
                   help="keep the other figures of an existing --json (rerun a subset)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_logs()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    only = [f.strip() for f in args.only.split(",") if f.strip()] or list(FIGURES)
    bad = [f for f in only if f not in FIGURES]
    if bad:
        p.error(f"unknown figure(s) {bad}; choose from {', '.join(FIGURES)}")
    from bench import pipeline as P

    md_path, json_path = Path(args.md), Path(args.json)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results: dict[str, Any] = {"started": started, "quick": args.quick, "machine": machine_info(),
                               "figures": {}}
    if args.merge and json_path.is_file():
        old = json.loads(json_path.read_text(encoding="utf-8"))
        results["figures"] = {k: v for k, v in old.get("figures", {}).items() if k not in only}
        results["merged_from"] = old.get("started")
    t_all = time.perf_counter()
    ws = P.Workspace()
    funcs = plan(args.quick)
    try:
        if any(f in only for f in ("efficiency", "original", "many_models", "scale")):
            t0 = time.perf_counter()
            try:  # outside every timed region; on failure each figure retries (and may fail)
                results["ray"] = {"resources": P.start_ray(), "start_s": time.perf_counter() - t0}
            except Exception as exc:  # noqa: BLE001
                log.error("could not start Ray: %s", exc)
                results["ray"] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        for key in FIGURES:
            if key not in only:
                continue
            log.info("figure %s ...", key)
            load_before = os.getloadavg()
            t0 = time.perf_counter()
            try:
                fig = funcs[key](ws)
            except Exception as exc:  # noqa: BLE001 - one failed figure must not lose the others
                log.error("figure %s failed: %s", key, exc)
                fig = Figure(key, key, status="failed",
                             error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
                fig.raw["traceback"] = traceback.format_exc().splitlines()[-8:]
            fig.seconds = time.perf_counter() - t0
            fig.raw["load_average_before"] = [round(x, 2) for x in load_before]
            fig.raw["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            results["figures"][key] = fig.as_dict()
            results["total_s"] = time.perf_counter() - t_all
            _write(results, md_path, json_path)
            log.info("figure %s: %s in %.0fs", key, fig.status, fig.seconds)
    finally:
        ws.cleanup()
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
    results["total_s"] = time.perf_counter() - t_all + sum(
        f.get("seconds", 0) for k, f in results["figures"].items() if k not in only)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    _write(results, md_path, json_path)
    log.info("wrote %s and %s in %.0fs", md_path, json_path, results["total_s"])
    return 0 if all(f["status"] == "ok" for f in results["figures"].values()) else 1


def _write(results: dict[str, Any], md_path: Path, json_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=_default), encoding="utf-8")
    os.replace(tmp, json_path)
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text(render(results, json_path), encoding="utf-8")
    os.replace(tmp, md_path)


def _default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
