"""The model registry: one `ModelSpec` per model name, the embedder families, `check_weights`,
and the text encoders of models with a text tower."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flagsim.errors import DataError, UnknownModelError, WeightsUnavailableError
from flagsim.models.options import EmbedOptions
from flagsim.models.sources import (
    Kind,
    Layout,
    NotCached,
    Source,
    hub_offline,
    parse_source,
    resolve,
)
from flagsim.models.spec import ModelSpec

if TYPE_CHECKING:  # the family modules import torch; they are imported when a model is created
    from flagsim.models.base import Embedder, TextEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """An embedder family: the module and class that run it (imported on first use, so that
    validating a config does not import torch), the weights `layout` it reads, and the class
    in the same module that loads a model's text tower (`text_cls`; None: no text towers)."""

    module: str
    cls: str
    layout: Layout
    text_cls: str | None = None

    def embedder_class(self) -> type[Embedder]:
        return getattr(importlib.import_module(self.module), self.cls)

    def text_encoder_class(self) -> type[TextEncoder]:
        return getattr(importlib.import_module(self.module), self.text_cls or "")


#: Embedder families. Adding one: an entry here and its module (an `Embedder` subclass).
FAMILIES: dict[str, Family] = {
    "transformers": Family("flagsim.models.hf", "TransformersEmbedder", Layout.CHECKPOINT,
                           text_cls="TransformersTextEncoder"),
    "blip2": Family("flagsim.models.blip2", "Blip2QFormerEmbedder", Layout.CHECKPOINT),
    "torchvision": Family("flagsim.models.tv", "TorchvisionEmbedder", Layout.FILE),
    "timm": Family("flagsim.models.timm_models", "TimmEmbedder", Layout.FILE),
    "pixels": Family("flagsim.models.pixels", "PixelsEmbedder", Layout.NONE),
}

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
    return FAMILIES[family].embedder_class()


def model_source(spec: ModelSpec, weights: str | None = None, revision: str | None = None) -> Source:
    """The parsed source of `spec` with `weights`/`revision` overrides (the registry default
    when `weights` is None; `revision` alone then applies to the default)."""
    if weights is None:
        weights = spec.weights
        revision = revision if revision is not None else spec.revision
    if FAMILIES[spec.family].layout is Layout.NONE:
        return Source(Kind.NONE)  # weight-free: nothing configured is read
    return parse_source(weights, revision, model=spec.name)


def create_embedder(name: str, options: EmbedOptions | None = None, **changes: Any) -> Embedder:
    """Build the embedder of model `name` with `options` (keywords: EmbedOptions fields).

    Missing weights raise WeightsUnavailableError with one line naming the model and how to
    supply them.
    """
    spec = get_spec(name)
    options = EmbedOptions.of(options, **changes)
    cls = family_class(spec.family)
    source = model_source(spec, options.weights, options.revision)
    resolved = resolve(spec, source, FAMILIES[spec.family].layout, download=True)
    return cls(spec, options, source=source, resolved=resolved)


def has_text_tower(name: str) -> bool:
    """Whether model `name` is registered with a text tower its family can load (text queries)."""
    spec = _REGISTRY.get(name)
    return spec is not None and spec.text_tower is not None and FAMILIES[spec.family].text_cls is not None


def text_models() -> list[str]:
    """The registered models with a text tower, in registration order."""
    return [n for n in _REGISTRY if has_text_tower(n)]


def no_text_tower(name: str) -> DataError:
    """The one-line error for a text query of a model without a text tower."""
    return DataError(
        f"model {name} has no text tower (text queries work with: {', '.join(text_models()) or 'none'})"
    )


def create_text_encoder(name: str, options: EmbedOptions | None = None, **changes: Any) -> TextEncoder:
    """The text tower of model `name` alone (no image side loaded), with `options` as for
    `create_embedder` (weights, revision, device, dtype). A model without one raises
    `no_text_tower(name)`; missing weights or tokenizer raise WeightsUnavailableError."""
    spec = get_spec(name)
    if not has_text_tower(name):
        raise no_text_tower(name)
    options = EmbedOptions.of(options, **changes)
    family = FAMILIES[spec.family]
    source = model_source(spec, options.weights, options.revision)
    resolved = resolve(spec, source, family.layout, download=True)
    return family.text_encoder_class()(spec, options, source=source, resolved=resolved)


def check_weights(
    name: str,
    weights: str | None = None,
    revision: str | None = None,
    *,
    offline: bool | None = None,
) -> str | None:
    """Can model `name`'s weights be had? None if so, else one line saying how to supply them.

    Loads nothing: the same `resolve` as loading, without downloads. A local directory or file
    must exist (a transformers directory must hold config.json and weights); a hub id must be
    in the local Hugging Face cache, or, when the hub is not offline (HF_HUB_OFFLINE unset and
    `offline` not True), answer a metadata request within a few seconds. `weights=None` checks
    the registry default (with `revision` or the default revision).
    """
    spec = get_spec(name)
    off = hub_offline() if offline is None else offline
    try:
        source = model_source(spec, weights, revision)
        try:
            resolve(spec, source, FAMILIES[spec.family].layout, download=False)
        except NotCached as missing:
            if off:
                raise
            missing.probe()
    except WeightsUnavailableError as exc:
        return str(exc)
    return None
