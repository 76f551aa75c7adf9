"""Figure 3b: channels_last (NHWC) vs contiguous (NCHW) forward passes of flagsim's CNN entries."""

from __future__ import annotations

import logging

import numpy as np

from bench.common import Figure, Table, best_time, decoded_flags, fmt, torch_threads

log = logging.getLogger(__name__)


def _cases(quick: bool) -> list[tuple[str, str, bool]]:
    """(flagsim model or bench arch, label, real weights?)"""
    cases = [("efficientnet-lite0", "EfficientNet-Lite0 (real weights, 224 px)", True),
             ("vgg16", "VGG16 (real size, random weights, 224 px)", False)]
    return cases[:1] if quick else cases


def _embedder(name: str, real: bool):
    from flagsim.models import create_embedder

    if real:
        return create_embedder(name, device="cpu", dtype="float32"), None
    from bench.archs import flagsim_spec, flagsim_weights
    from flagsim.models import register_model

    spec = register_model(flagsim_spec(name), replace=True)  # real-size random weights
    return create_embedder(spec.name, device="cpu", dtype="float32",
                           weights=flagsim_weights(name)), spec.name


def run(n_images: int = 16, batch: int = 8, repeat: int = 2, threads: int | None = None,
        quick: bool = False) -> Figure:
    import torch

    from bench.pipeline import nproc
    from flagsim.models import unregister_model

    threads = threads or nproc()
    fig = Figure("memory_format", "3b. CNN memory format: channels_last vs contiguous, CPU forward")
    table = Table(["model", "contiguous img/s", "channels_last img/s", "speed-up",
                   "min cosine between the two"],
                  caption=f"{n_images} decoded bundled flags, flagsim's own preprocessing done "
                          f"once beforehand, batches of {batch}, {threads} threads, fp32, best "
                          f"of {repeat}; the same model object measured both ways side by side.")
    fig.raw["rows"] = []
    images = decoded_flags(n_images)
    with torch_threads(threads):
        for name, label, real in _cases(quick):
            emb, temp = _embedder(name, real)
            try:
                xs = [emb.preprocess(images[s : s + batch]) for s in range(0, n_images, batch)]

                def rate(emb=emb, xs=xs) -> float:
                    return n_images / best_time(lambda: [emb.forward(x) for x in xs],
                                                repeat=repeat, warmup=1)

                assert emb.memory_format is torch.channels_last, name
                r_cl = rate()
                v_cl = np.concatenate([emb.forward(x) for x in xs])
                emb.model = emb.model.to(memory_format=torch.contiguous_format)
                emb.memory_format = torch.contiguous_format
                r_c = rate()
                v_c = np.concatenate([emb.forward(x) for x in xs])
            finally:
                if temp:
                    unregister_model(temp)
            cos = float(np.min(np.sum(v_cl * v_c, 1) / (np.linalg.norm(v_cl, axis=1)
                                                          * np.linalg.norm(v_c, axis=1))))
            fig.raw["rows"].append({"model": name, "contiguous_img_s": r_c,
                                    "channels_last_img_s": r_cl, "speedup": r_cl / r_c,
                                    "min_cosine": cos})
            table.rows.append([label, fmt(r_c), fmt(r_cl), f"{r_cl / r_c:.2f}x", f"{cos:.6f}"])
    fig.tables.append(table)
    sp = [r["speedup"] for r in fig.raw["rows"]]
    fig.notes.append(
        f"flagsim runs its CNN entries (`channels_last=True` in the registry: efficientnet, "
        f"efficientnet-lite0, vgg16, vgg16-fc7) in channels_last: {min(sp):.2f}x-{max(sp):.2f}x "
        "the contiguous layout's forward throughput here, with the same vectors up to float "
        "summation order."
    )
    return fig
