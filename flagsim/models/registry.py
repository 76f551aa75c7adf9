"""The model registry: one `ModelSpec` per model name, and the embedder families that run them."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flagsim.errors import UnknownModelError

if TYPE_CHECKING:
    from flagsim.models.base import Embedder

log = logging.getLogger(__name__)

#: Embedder families: family name -> "module:Class" (imported only when a model is created, so
#: that importing the registry, e.g. to validate a config, does not import torch).
FAMILIES: dict[str, str] = {
    "transformers": "flagsim.models.hf:TransformersEmbedder",
    "blip2": "flagsim.models.blip2:Blip2QFormerEmbedder",
    "torchvision": "flagsim.models.tv:TorchvisionEmbedder",
    "timm": "flagsim.models.timm_models:TimmEmbedder",
    "pixels": "flagsim.models.pixels:PixelsEmbedder",
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build, preflight and describe one registered model.

    `weights` is the default source: a Hugging Face hub id (`org/name`), a local directory or
    file, `torchvision:<WEIGHTS_ENUM>`, `package:<python_package>` or None (weight-free).
    `architecture` names the model class within the family (a transformers class name, a
    torchvision builder, a timm model name). `pooling` names how one vector is taken from the
    model's outputs. `processor` holds the preprocessing settings used when the weights bring
    none (a transformers checkpoint without preprocessor_config.json, torchvision, timm).
    `channels_last` runs a convolutional network in the NHWC memory format (model and input):
    the same numbers up to float summation order, faster convolutions on CPUs (figure 3b of
    docs/benchmarks.md) and on GPU tensor cores. `light` marks a model whose compute is
    negligible next to a network's (the weight-free `pixels` baseline): next to a network its
    actor gets a quarter of a CPU and one thread, and the networks share the rest. `tiny_config` returns
    the family-specific config of a small random-weight model of the same architecture, and
    `tiny_processor` its preprocessing settings (used by tests, `tiny=True`).
    """

    name: str
    family: str
    weights: str | None
    revision: str | None
    dim: int
    pooling: str
    image_size: int
    default_batch_size: int
    description: str
    architecture: str = ""
    processor_class: str | None = None
    processor: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    tiny_config: Callable[[], Any] | None = field(default=None, hash=False, compare=False)
    tiny_processor: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    options: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    channels_last: bool = False
    light: bool = False  # negligible compute (a weight-free baseline): a sliver of one CPU


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Add `spec` to the registry (a name may be registered once unless `replace`)."""
    if spec.family not in FAMILIES:
        raise ValueError(
            f"model {spec.name!r}: unknown family {spec.family!r} (families: {', '.join(FAMILIES)})"
        )
    if not spec.name or spec.name != spec.name.strip() or "," in spec.name:
        raise ValueError(f"invalid model name {spec.name!r}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"model {spec.name!r} is already registered")
    if spec.dim <= 0 or spec.image_size <= 0 or spec.default_batch_size <= 0:
        raise ValueError(f"model {spec.name!r}: dim, image_size and default_batch_size must be > 0")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_model(name: str) -> None:
    """Remove a registered model (tests that register temporary entries use this)."""
    _REGISTRY.pop(name, None)


def list_models() -> list[str]:
    """Registered model names, in registration order."""
    return list(_REGISTRY)


def _unknown(name: object) -> UnknownModelError:
    return UnknownModelError(f"unknown model {name!r}; valid models: {', '.join(_REGISTRY)}")


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model; UnknownModelError (listing valid names) otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise _unknown(name) from None


def check_model_names(names: Iterable[str]) -> None:
    """Raise UnknownModelError for the first name that is not registered."""
    for n in names:
        if n not in _REGISTRY:
            raise _unknown(n)


def family_class(family: str) -> type[Embedder]:
    """The Embedder class of a family (imported on first use)."""
    module, _, cls = FAMILIES[family].partition(":")
    return getattr(importlib.import_module(module), cls)


def create_embedder(
    name: str,
    *,
    weights: str | None = None,
    revision: str | None = None,
    device: Any = "cpu",
    dtype: Any = "auto",
    tiny: bool = False,
    seed: int = 0,
    preprocess_device: Any = None,
) -> Embedder:
    """Build the embedder of model `name`.

    `weights`/`revision` override the registry default source (a hub id or a local path);
    `revision` applies to the default hub id only when `weights` is not given. `dtype` "auto"
    means float16 on CUDA and float32 on CPU. `tiny=True` builds a small random-weight model of
    the same architecture (seeded by `seed`) and loads no files. `preprocess_device` is where
    images are resized and normalised (default: `device`). Missing weights raise
    WeightsUnavailableError with one line naming the model and how to supply them.
    """
    spec = get_spec(name)
    if weights is None:
        weights = spec.weights
        revision = revision if revision is not None else spec.revision
    cls = family_class(spec.family)
    return cls(spec, weights=weights, revision=revision, device=device, dtype=dtype, tiny=tiny,
               seed=seed, preprocess_device=preprocess_device)
