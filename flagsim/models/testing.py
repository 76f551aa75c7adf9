"""Small random-weight checkpoints of the registered models, for tests and smoke benchmarks.

Why checkpoints on disk and not a `tiny` mode or a `random` source kind: a checkpoint written
here is a local directory in exactly the format its family's loader reads (save_pretrained for
transformers, a state-dict file for torchvision and timm), so a test loads it through the REAL
local-directory source: the same `resolve`, `check_weights`, loader, processor and pooling as a
user's weights, in this process or in a Ray actor (a local path works in any process on the
machine), and production code holds no branch for tests. A `random` kind would need the
architecture's real config in every ModelSpec and would still not give tests small models.

`write_random_checkpoint(name, dir)` writes one (tiny, or at real size with a `config`, for
benchmarks); `tiny_checkpoint(name)` writes it once per process, in a temporary folder removed
at exit, and returns the directory; `tiny_weights(name)` is the weights setting for it,
`tiny_embedder(name)` loads it, and `tiny_overrides(names)` are the
`embed.settings.<model>.weights=<dir>` config overrides that make a run use them. Each
architecture has one entry in TINY; a model of a registered architecture needs nothing more.
A weight-free model (pixels) has no checkpoint: `tiny_checkpoint` returns None.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flagsim.models.options import EmbedOptions
from flagsim.models.registry import FAMILIES, create_embedder, get_spec
from flagsim.models.sources import Layout
from flagsim.models.spec import ModelSpec

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _vit() -> Any:
    from transformers import ViTConfig

    return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, image_size=32, patch_size=8)


def _clip() -> Any:
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 64, "max_position_embeddings": 16,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=24,
    )


def _clip_tokenizer(directory: Path, config: Any) -> None:
    """A CLIP tokenizer over single letters (`a`..`z`, and each ending a word: `a</w>`), so
    that any lower-case text tokenises into ids below the tiny text tower's 64-word vocabulary;
    start and end of text are 0 and 1 as in the tiny config. Longer texts are truncated to
    the tower's positions."""
    import string

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    text = getattr(config, "text_config", config)
    if len(vocab) > text.vocab_size:
        raise ValueError(f"the tiny CLIP tokenizer needs a vocabulary of {len(vocab)} at least")
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=text.max_position_embeddings
                  ).save_pretrained(directory)


def _blip2() -> Any:
    from transformers import Blip2Config

    return Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "encoder_hidden_size": 32,
                        "cross_attention_frequency": 1},
        text_config={"model_type": "opt", "hidden_size": 16, "num_hidden_layers": 1,
                     "ffn_dim": 32, "num_attention_heads": 2, "vocab_size": 64,
                     "word_embed_proj_dim": 16, "max_position_embeddings": 64},
        num_query_tokens=4,
    )


def _efficientnet() -> Any:
    from transformers import EfficientNetConfig

    return EfficientNetConfig(image_size=64, width_coefficient=0.25, depth_coefficient=0.3,
                              hidden_dim=320, dropout_rate=0.0)


def _dinov2() -> Any:
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                        image_size=32, patch_size=8)


@dataclass(frozen=True)
class Tiny:
    """A small model of one architecture: its family config (transformers), or for
    torchvision the VGG widths of flagsim.models.tv.vgg_variant, its processor settings
    (transformers: saved as preprocessor_config.json; the other families use the spec's), and
    for a model with a text tower, `tokenizer(directory, config)` writing a tokenizer."""

    config: Callable[[], Any] | Mapping[str, Any] | None = None
    processor: Mapping[str, Any] = field(default_factory=dict)
    tokenizer: Callable[[Path, Any], None] | None = None


#: One entry per architecture (ModelSpec.architecture).
TINY: dict[str, Tiny] = {
    "ViTModel": Tiny(_vit, {"size": {"height": 32, "width": 32}, "resample": 2,
                            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
    "CLIPModel": Tiny(_clip, {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
                              "do_center_crop": True, "resample": 3,
                              "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
                  tokenizer=_clip_tokenizer),
    "Blip2Model": Tiny(_blip2, {"size": {"height": 32, "width": 32}, "resample": 3,
                                "image_mean": CLIP_MEAN, "image_std": CLIP_STD}),
    "EfficientNetModel": Tiny(_efficientnet, {
        "size": {"height": 64, "width": 64}, "resample": 0, "do_center_crop": False,
        "image_mean": IMAGENET_MEAN, "image_std": [0.47853944, 0.4732864, 0.47434163],
        "include_top": True}),
    "Dinov2Model": Tiny(_dinov2, {"size": {"shortest_edge": 36},
                                  "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
                                  "resample": 3, "image_mean": IMAGENET_MEAN,
                                  "image_std": IMAGENET_STD}),
    # a VGG (same class and forward as vgg16) with 2 conv stages and a 64-wide classifier
    "vgg16": Tiny({"layers": [8, "M", 16, "M"], "hidden": [64, 48], "num_classes": 10}),
    "efficientnet_lite0": Tiny(),  # already small: the real architecture, random weights
}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG inside the block without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def calibrate_batchnorm(model: Any, run: Callable[[list[np.ndarray]], Any], seed: int = 0) -> None:
    """Give a random-weight model's BatchNorm layers unit scale and the running statistics of one
    batch of random images (`run(images)` does the forward), so that activations neither vanish
    nor explode through a deep tiny CNN. No-op for models without BatchNorm."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_parameters()
        m.momentum = None  # cumulative average: after one batch, exactly its statistics
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8) for _ in range(8)]
    model.train()
    with torch.no_grad():
        run(images)
    model.eval()
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def _save_state_dict(module: Any, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))


def _write_transformers(spec: ModelSpec, processor_settings: Mapping[str, Any], directory: Path,
                        config: Any) -> None:
    import torch
    import transformers

    model = getattr(transformers, spec.architecture)(config).eval()
    processor = getattr(transformers, spec.processor_class or "")(**dict(processor_settings))

    def run(images: list[np.ndarray]) -> None:
        pixels = processor(images=images, return_tensors="pt", input_data_format="channels_last")
        model(pixel_values=pixels["pixel_values"].to(torch.float32))

    # HF initialises BatchNorm scales ~N(0, 0.02): through a deep random CNN the activations
    # vanish to exactly 0. Calibrate them so tiny outputs carry information.
    calibrate_batchnorm(model, run)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def _write_blip2(spec: ModelSpec, processor_settings: Mapping[str, Any], directory: Path,
                 config: Any) -> None:
    import transformers

    from flagsim.models.blip2 import Blip2QFormerFeatures

    config.save_pretrained(directory)  # the vision tower + Q-Former: what the loader reads
    _save_state_dict(Blip2QFormerFeatures(config), directory / "model.safetensors")
    processor = getattr(transformers, spec.processor_class or "")(**dict(processor_settings))
    processor.save_pretrained(directory)


def _write_torchvision(spec: ModelSpec, processor_settings: Mapping[str, Any], directory: Path,
                       config: Any) -> None:
    """`config`: VGG widths (written as config.json, see flagsim.models.tv.vgg_variant) or a
    built module of `spec.architecture` itself (e.g. torchvision's vgg16(weights=None))."""
    import torch

    from flagsim.models.tv import vgg_variant

    if isinstance(config, torch.nn.Module):
        _save_state_dict(config, directory / "model.safetensors")
        return
    model = vgg_variant(config).to_empty(device="cpu")
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.reset_parameters()
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    _save_state_dict(model, directory / "model.safetensors")


def _write_timm(spec: ModelSpec, processor_settings: Mapping[str, Any], directory: Path,
               config: Any) -> None:
    import timm
    import torch

    from flagsim.models.transforms import ImageTransform

    model = timm.create_model(spec.architecture, pretrained=False, num_classes=0).eval()
    transform = ImageTransform(spec.processor)
    calibrate_batchnorm(model, lambda ims: model(transform(ims).to(torch.float32)))
    _save_state_dict(model, directory / "model.safetensors")


_WRITERS: dict[str, Callable[[ModelSpec, Mapping[str, Any], Path, Any], None]] = {
    "transformers": _write_transformers,
    "blip2": _write_blip2,
    "torchvision": _write_torchvision,
    "timm": _write_timm,
}


def write_random_checkpoint(name: str, directory: str | Path, *, seed: int = 0, config: Any = None,
                            processor: Mapping[str, Any] | None = None) -> Path:
    """Write a random-weight checkpoint of model `name` into `directory` (created) and return
    it. Without `config`, the architecture's tiny model and processor (TINY); with one (e.g.
    the real hyperparameters, for a benchmark at real size), that model and the spec's
    processor settings unless `processor` is given. Seeded: the same seed, the same weights."""
    spec = get_spec(name)
    if config is None:
        if spec.architecture not in TINY:
            raise KeyError(f"{name}: no tiny entry for architecture {spec.architecture!r} in TINY")
        tiny = TINY[spec.architecture]
        config = tiny.config() if callable(tiny.config) else tiny.config
        processor = tiny.processor if processor is None else processor
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with seeded(seed):
        _WRITERS[spec.family](spec, spec.processor if processor is None else processor, d, config)
    tokenizer = TINY[spec.architecture].tokenizer if spec.architecture in TINY else None
    if tokenizer is not None and spec.text_tower is not None:
        tokenizer(d, config)
    return d


_cache: dict[tuple[str, str, int], Path] = {}
_root: Path | None = None


def _cache_root() -> Path:
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="flagsim-tiny-"))
        atexit.register(shutil.rmtree, _root, True)
    return _root


def tiny_checkpoint(name: str, seed: int = 0) -> Path | None:
    """The directory of model `name`'s tiny checkpoint (written on first use in this process);
    None for a weight-free model."""
    if FAMILIES[get_spec(name).family].layout is Layout.NONE:
        return None
    return random_checkpoint(name, "tiny", seed=seed)


def random_checkpoint(name: str, label: str, *, config: Any = None,
                      processor: Mapping[str, Any] | None = None, seed: int = 0) -> Path:
    """`write_random_checkpoint` once per process per (name, label, seed), in a temporary
    folder removed at exit (`label` names the config: "tiny", "real-size", ...)."""
    key = (name, label, seed)
    if key not in _cache:
        _cache[key] = write_random_checkpoint(
            name, _cache_root() / f"{name}-{label}-seed{seed}", seed=seed, config=config,
            processor=processor,
        )
    return _cache[key]


def tiny_weights(name: str, seed: int = 0) -> str | None:
    """The weights setting that loads model `name`'s tiny checkpoint (None: weight-free)."""
    path = tiny_checkpoint(name, seed)
    return None if path is None else str(path)


def tiny_embedder(name: str, seed: int = 0, options: EmbedOptions | None = None, **changes: Any):
    """Model `name` loaded from its tiny checkpoint (through the real local-directory source)."""
    return create_embedder(name, options, **{"weights": tiny_weights(name, seed), **changes})


def tiny_overrides(names: Iterable[str], seed: int = 0) -> dict[str, str]:
    """`embed.settings.<model>.weights` -> the tiny checkpoint, for each model with weights."""
    weights = {name: tiny_weights(name, seed) for name in names}
    return {f"embed.settings.{n}.weights": w for n, w in weights.items() if w is not None}
