"""`ModelSpec`: what one registered model is (a leaf module: it imports nothing of flagsim)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build, preflight and describe one registered model.

    `weights` is the default source (see flagsim.models.sources): a Hugging Face hub id
    (`org/name` or `hub:org/name`), a local directory or file, `torchvision:<WEIGHTS_ENUM>`,
    `package:<python_package>` or None (weight-free).
    `architecture` names the model class within the family (a transformers class name, a
    torchvision builder, a timm model name). `pooling` names how one vector is taken from the
    model's outputs (a key of the family's pooling table). `processor` holds the preprocessing
    settings used when the weights bring none (a transformers checkpoint without
    preprocessor_config.json, torchvision, timm).
    `channels_last` runs a convolutional network in the NHWC memory format (model and input):
    the same numbers up to float summation order, faster convolutions on CPUs (figure 3b of
    docs/benchmarks.md) and on GPU tensor cores. `light` marks a model whose compute is
    negligible next to a network's (the weight-free `pixels` baseline): next to a network its
    actor gets a quarter of a CPU and one thread, and the networks share the rest.
    `text_tower` names the class of the model's text tower (a transformers class, CLIP's
    `CLIPTextModelWithProjection`), loaded alone from the same checkpoint for text queries
    (`flagsim query --text`); None: the model embeds images only.
    `dedup_threshold` is the cosine at or above which `flagsim dedup` calls two images copies,
    calibrated on the bundled flags (docs/query.md, "flagsim dedup"); None: not calibrated.
    A spec describes a real model only; tests build small random-weight checkpoints of the same
    architecture with flagsim.models.testing.
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
    options: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    channels_last: bool = False
    light: bool = False  # negligible compute (a weight-free baseline): a sliver of one CPU
    text_tower: str | None = None  # the text tower's class (text queries); None: images only
    dedup_threshold: float | None = None  # calibrated near-duplicate cosine (flagsim dedup)
