"""Render the benchmark results (bench/results.json) as docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from bench import targets as T
from bench.common import fmt

REPO = Path(__file__).resolve().parents[1]


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def table_md(t: dict[str, Any]) -> list[str]:
    lines = []
    if t.get("caption"):
        lines += [t["caption"], ""]
    lines.append("| " + " | ".join(_cell(c) for c in t["columns"]) + " |")
    lines.append("|" + "---|" * len(t["columns"]))
    for row in t["rows"]:
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return lines + [""]


def _gpu_check_module():
    path = REPO / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("flagsim_gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _rel(path: Path) -> str:
    try:
        return os.path.relpath(path, REPO)
    except ValueError:
        return path.name


def summary_rows(figs: dict[str, Any]) -> list[list[str]]:
    """One row per target: what, target, measured, verdict."""
    rows: list[list[str]] = []

    def status(key: str) -> str | None:
        f = figs.get(key)
        if f is None:
            return "not run"
        if f["status"] != "ok":
            return f"failed: {f['error']}"
        return None

    s = status("efficiency")
    if s:
        rows.append(["1", "pipeline / bare forward", T.EFFICIENCY.text, s, ""])
    else:
        for c in figs["efficiency"]["raw"]["cases"]:
            eff = c["efficiency_steady"]
            verdict = T.EFFICIENCY.verdict(eff)
            rows.append(["1", f"pipeline / bare forward, {c['model']}, {c['variant']} threads "
                              "(steady state)", T.EFFICIENCY.text, f"{fmt(eff)} (end-to-end "
                              f"{c['efficiency_e2e']:.2f})", verdict])
    s = status("original")
    if s:
        rows.append(["2", "pipeline vs original per-image method", T.ORIGINAL.text, s, ""])
    else:
        r = figs["original"]["raw"]
        base = r["rows"][0]["img_s"]
        steady = r.get("steady_img_s")
        parts = [f"model loaded once {r['rows'][1]['img_s'] / base:.1f}x"]
        if steady:
            parts.append(f"pipeline steady state {steady / base:.1f}x")
        parts.append(f"pipeline end-to-end on {r['n_images']} images "
                     f"{r['rows'][2]['img_s'] / base:.1f}x")
        best = max([r["rows"][1]["img_s"], steady or 0])
        rows.append(["2", "speed-up over the original (model reloaded per image)",
                     T.ORIGINAL.text, "; ".join(parts), T.ORIGINAL.verdict(best / base)])
    s = status("preprocess")
    if s:
        rows.append(["3", "torchvision vs PIL processors", T.PREPROCESS.text, s, ""])
    else:
        sp = [x["speedup"] for x in figs["preprocess"]["raw"]["rows"] if "speedup" in x]
        rows.append(["3", "torchvision vs PIL processors, img/s per core", T.PREPROCESS.text,
                     f"{min(sp):.2f}x-{max(sp):.2f}x", T.PREPROCESS.verdict(min(sp))])
    s = status("memory_format")
    if s:
        rows.append(["3b", "channels_last vs contiguous CNN forward", T.MEMORY_FORMAT.text, s, ""])
    else:
        sp = [x["speedup"] for x in figs["memory_format"]["raw"]["rows"]]
        rows.append(["3b", "channels_last vs contiguous CNN forward (CPU)", T.MEMORY_FORMAT.text,
                     f"{min(sp):.2f}x-{max(sp):.2f}x", T.MEMORY_FORMAT.verdict(min(sp))])
    s = status("many_models")
    if s:
        rows.append(["4", "decode once vs per model", T.MANY_MODELS.text, s, ""])
    else:
        r = figs["many_models"]["raw"]
        rows.append(["4", f"decode once for {len(r['models'])} models vs once per model",
                     T.MANY_MODELS.text, f"{r['speedup']:.2f}x", T.MANY_MODELS.verdict(r["speedup"])])
    s = status("scale")
    if s:
        rows.append(["5", "10x images: memory flat, throughput per image",
                     f"{T.SCALE_MEMORY.text}, {T.SCALE_THROUGHPUT.text}", s, ""])
    else:
        r = figs["scale"]["raw"]
        rows.append(["5", f"{r['sizes'][1]:,} vs {r['sizes'][0]:,} images: peak memory ratio, "
                          "throughput-per-image ratio",
                     f"{T.SCALE_MEMORY.text}, {T.SCALE_THROUGHPUT.text}",
                     f"memory x{r['peak_memory_ratio']:.2f}, throughput x{r['throughput_ratio']:.2f}",
                     T.verdict_of([T.SCALE_MEMORY.met(r["peak_memory_ratio"]),
                                   T.SCALE_THROUGHPUT.met(r["throughput_ratio"])])])
    s = status("knn")
    if s:
        rows.append(["6", "exact kNN", T.KNN_EQUAL.text, s, ""])
    else:
        runs = figs["knn"]["raw"]["runs"]
        equal = all(x["equal"] for x in runs)
        faiss = [x for x in runs if x["method"].startswith("FAISS IndexFlatIP")]
        rows.append(["6", "exact top-10: all methods equal; FAISS share of the sgemm bound",
                     T.KNN_EQUAL.text, f"equal: {'yes' if equal else 'NO'}; FAISS "
                     + ", ".join(f"N={x['n']:,}: {x['share_of_bound']:.0%}" for x in faiss),
                     T.KNN_EQUAL.verdict(sum(x["equal"] for x in runs) / len(runs))])
    s = status("gpu")
    if s:
        rows.append(["7", "GPU check script", "ready, smoke passes", s, ""])
    else:
        r = figs["gpu"]["raw"]
        have_gpu = "gpu_run" in r
        rows.append(["7", "GPU check script", "ready; runs < 8 min on a GPU",
                     ("GPU results included" if have_gpu else "no GPU in this session")
                     + f"; CPU smoke rc={r.get('smoke_rc')}",
                     "ready" if r.get("smoke_rc") == 0 else "FAILED"])
    s = status("search_scale")
    if s:
        rows.append(["8", "neighbour table at scale vs bare FAISS",
                     f"{T.SEARCH_THROUGHPUT.text}; {T.SEARCH_RECALL.text}", s, ""])
    else:
        from bench.search_scale import summary_rows as search_rows

        rows += search_rows(figs["search_scale"])
    return rows


def _same_config_note(cases: list[dict[str, Any]]) -> list[str]:
    """When the default and the tuned rows of a model ran with the same torch threads, their
    difference is this machine's run-to-run noise: say so, with its size."""
    out = []
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for c in cases:
        by_model.setdefault(c["model"], {})[c["variant"]] = c
    for model, v in by_model.items():
        d, t = v.get("default"), v.get("tuned")
        if not d or not t or d.get("actor_threads") != t.get("actor_threads"):
            continue
        if not d.get("steady_img_s") or not t.get("steady_img_s"):
            continue
        gap = abs(d["steady_img_s"] - t["steady_img_s"]) / max(d["steady_img_s"], t["steady_img_s"])
        out.append(f"- {model}: the default and tuned rows ran the same configuration "
                   f"({d['actor_threads']} torch threads in the actor), so the {gap:.0%} between "
                   "their steady-state rates is this machine's run-to-run noise.")
    return out


def render(results: dict[str, Any], json_path: Path) -> str:
    m = results["machine"]
    figs = results["figures"]
    out = ["# flagsim benchmarks", ""]
    out += [
        f"Generated by `make bench` (`python -m bench.run`{' --quick' if results.get('quick') else ''}) "
        f"on {results['started']}"
        + (f" (figures not rerun kept from the run of {results['merged_from']})"
           if results.get("merged_from") else "")
        + f"; total {results.get('total_s', 0) / 60:.1f} min. Raw numbers: "
        f"`{_rel(json_path)}`. Every comparison is measured side by side in this one run and "
        "reported as a ratio; the CPU images/s shown are the inputs of those ratios, not "
        "absolute performance claims (those come only from a GPU, figure 7).",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu_model']} ({', '.join(m.get('cpu_flags', []))}) |",
        f"| cores (nproc) | {m['nproc']} |",
        f"| memory | {m['memory_gib']} GiB |",
        f"| GPU | {m.get('gpu') or 'none: this session had no GPU lent (see figure 7)'} |",
        f"| OS / Python | {m['platform']} / {m['python']} |",
        f"| torch / torchvision | {m.get('torch')} ({m.get('torch_threads')} threads) / "
        f"{m.get('torchvision')} |",
        f"| transformers / ray / faiss | {m.get('transformers')} / {m.get('ray')} / {m.get('faiss')} |",
        f"| numpy / pyarrow / pillow | {m.get('numpy')} / {m.get('pyarrow')} / {m.get('pillow')} |",
        f"| load average at start / end | {m.get('load_average_at_start')} / "
        f"{m.get('load_average_at_end', 'n/a')} |",
        "",
    ]
    loads = [max(f["raw"].get("load_average_before", [0])[0], f["raw"].get("load_average_after", [0])[0])
             for f in figs.values()]
    if loads and max(loads) > m["nproc"] * 1.5:
        out += [f"**Noise warning:** the 1-minute load average reached {max(loads):.1f} on "
                f"{m['nproc']} cores during this run (other processes shared the CPU). Ratios "
                "measured side by side are still comparable, but each number carries that noise; "
                "per-figure load averages are in the JSON.", ""]
    out += ["## Summary against targets", "",
            "| # | what | target | measured | verdict |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in summary_rows(figs)]
    out.append("")
    order = ("efficiency", "original", "preprocess", "memory_format", "many_models", "scale", "knn",
             "report_scale", "gpu", "search_scale", "inputs", "query_one")
    for key in order:
        f = figs.get(key)
        if f is None:
            continue
        out += [f"## {f['title']}", ""]
        la = f["raw"].get("load_average_before")
        out += [f"_Ran in {f['seconds']:.0f} s; load average before {la[0] if la else 'n/a'}._", ""]
        if f["status"] != "ok":
            out += [f"**{f['status'].upper()}:** `{f['error']}`", ""]
        for t in f["tables"]:
            out += table_md(t)
        if key == "gpu":
            out += _gpu_section(f)
        for note in f["notes"]:
            out.append(f"- {note}")
        if key == "efficiency" and f["status"] == "ok":
            out += _same_config_note(f["raw"].get("cases", []))
        out.append("")
    out += ["## Method notes", "",
            "- Real-size models with random weights: `bench/checkpoints.py` builds each "
            "registry model's transformers config (or torchvision's vgg16) with the published "
            "hyperparameters (`bench/archs.py`), initialises it randomly and saves it to a "
            "temporary folder as real weights arrive (`save_pretrained`, or a state-dict file); "
            "flagsim loads it through its ordinary local-weights path (`create_embedder(model, "
            "weights=<path>)`, `embed.settings.<model>.weights`), so its own preprocessing, "
            "pooling, loading and Ray actors are what is measured. Compute cost equals the "
            "pretrained models'; embeddings are meaningless.",
            "- Search (figure 6 and the GPU check's kNN) runs through `flagsim.search`: the "
            "vectors are written as a run's embedding shards and `build_index` + "
            "`ModelIndex.search` answer the queries, next to bare FAISS, NumPy and torch.",
            "- Verdicts are computed from the numbers against the targets in `bench/targets.py` "
            "(`met`, `not met`, `n/a` when not measured).",
            "- `bare` = flagsim's own embedder (`create_embedder`) called in the benchmark process "
            "on already-decoded images, in batches, with all cores as torch threads.",
            "- The original method (figure 2) re-implements the article notebook's per-image "
            "function for a local checkpoint: PIL open + convert, the PIL CLIP processor, batch-1 "
            "`get_image_features` under `no_grad`, with processor and model loaded from disk for "
            "every image.",
            "- Memory: RSS of the driver plus all descendant processes (raylet, GCS, Ray workers), "
            "sampled every 0.2 s with psutil; shared object-store pages count once per process "
            "that maps them.",
            "- Regenerate with `make bench`; include GPU numbers by running `make gpu-check` on a "
            "GPU machine and copying its `gpu_check.json` to `bench/gpu_check.json`.", ""]
    return "\n".join(out)


def _gpu_section(f: dict[str, Any]) -> list[str]:
    out: list[str] = []
    try:
        gc = _gpu_check_module()
    except Exception as exc:  # noqa: BLE001
        return [f"(cannot load scripts/gpu_check.py to render: {exc})", ""]
    for key, title in (("gpu_run", "GPU run"), ("smoke_run", "CPU smoke run (proof the script runs; not a benchmark)")):
        data = f["raw"].get(key)
        if not data:
            continue
        md = gc.render_markdown(data).splitlines()
        body = [ln.replace("## ", "#### ", 1) if ln.startswith("## ") else ln for ln in md[1:]]
        out += [f"### {title}", ""] + body + [""]
    if "smoke_stderr_tail" in f["raw"]:
        out += ["```", f["raw"]["smoke_stderr_tail"], "```", ""]
    return out


__all__ = ["render", "fmt"]
