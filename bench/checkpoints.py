"""Random-weight checkpoints of flagsim's registry models, written where users put real weights.

`save_random_checkpoint(model, folder)` builds the model family's config at the published
checkpoint's real size (bench/archs.py), initialises it randomly and saves it the way real
weights arrive: a `save_pretrained` directory (transformers and BLIP-2 families) or a state-dict
file (torchvision). flagsim then loads it through its ordinary local-weights path,
`create_embedder(model, weights=<path>)` or `embed.settings.<model>.weights: <path>`, so what is
measured is the registry's own preprocessing, pooling and loading code. `tiny=True` writes a
small model of the same family for CPU smoke runs (VGG16 stays real size: torchvision's builder
has one shape).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import archs

log = logging.getLogger(__name__)

#: Registry model -> its real-size config (tiny: bool) -> transformers config.
CONFIGS: dict[str, Callable[[bool], Any]] = {
    "clip": archs.clip_b32_config,
    "vit": archs.vit_l16_config,
    "dinov2": archs.dinov2_base_config,
    "efficientnet": archs.efficientnet_b7_config,
    "blip2": archs.blip2_config,
}
TORCHVISION = ("vgg16", "vgg16-fc7")
#: The registry models this module can write (the original experiment's six, and vgg16-fc7).
MODELS: tuple[str, ...] = (*CONFIGS, *TORCHVISION)


def _save_processor(spec: Any, folder: Path, tiny: bool) -> None:
    """The registry's processor settings as preprocessor_config.json (a smaller input for the
    tiny, fully convolutional EfficientNet, as its real checkpoint would carry)."""
    import transformers

    settings = dict(spec.processor)
    if tiny and spec.name == "efficientnet":
        settings["size"] = {"height": 64, "width": 64}
    getattr(transformers, spec.processor_class)(**settings).save_pretrained(str(folder))


def _transformers(spec: Any, folder: Path, tiny: bool) -> Path:
    import torch
    import transformers

    config = CONFIGS[spec.name](tiny)
    if spec.family == "blip2":
        from safetensors.torch import save_file

        from flagsim.models.blip2 import Blip2QFormerFeatures

        net = Blip2QFormerFeatures(config)
        with torch.no_grad():
            net.query_tokens.normal_(0.0, 0.02)
        config.save_pretrained(str(folder))
        save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()},
                  str(folder / "model.safetensors"))
    else:
        net = getattr(transformers, spec.architecture)(config)
        if spec.name == "efficientnet":
            archs.kaiming_convs(net)
        net.save_pretrained(str(folder))
    _save_processor(spec, folder, tiny)
    return folder


def _torchvision(spec: Any, folder: Path) -> Path:
    import torch
    import torchvision.models as tvm

    path = folder / f"{spec.architecture}-random.pth"
    if not path.is_file():  # vgg16 and vgg16-fc7 share one file shape
        net = tvm.get_model(spec.architecture, weights=None)
        torch.save({k: v.cpu() for k, v in net.state_dict().items()}, str(path))
    return path


def save_random_checkpoint(model: str, folder: Path, *, tiny: bool = False, seed: int = 0,
                           device: str = "cpu") -> str:
    """Write a random-weight checkpoint of registry model `model` under `folder`; return the
    weights path to give flagsim (`create_embedder(model, weights=...)`). `device` is where the
    weights are initialised (a GPU initialises a billion parameters much faster)."""
    import torch

    from flagsim.models import get_spec

    spec = get_spec(model)
    if model not in MODELS:
        raise ValueError(f"no random checkpoint recipe for {model!r} (have: {', '.join(MODELS)})")
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):
        if model in TORCHVISION:
            out = _torchvision(spec, folder)
        else:
            out = _transformers(spec, folder, tiny)
    log.info("%s: random %s checkpoint written in %.1fs", model, "tiny" if tiny and
             model not in TORCHVISION else "real-size", time.perf_counter() - t0)
    return str(out)
