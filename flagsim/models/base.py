"""The Embedder contract shared by every model family (an ABC), with device/dtype helpers."""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from flagsim.errors import ConfigError, DataError
from flagsim.models.options import EmbedOptions
from flagsim.models.sources import Resolved, Source
from flagsim.models.spec import ModelSpec

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: Any = "cpu") -> torch.device:
    """`"auto"` -> cuda when available else cpu; anything torch.device accepts otherwise."""
    if isinstance(device, torch.device):
        return device
    text = str(device or "cpu").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"invalid device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """`"auto"` -> float16 on CUDA, float32 elsewhere; float16/bfloat16/float32 by name."""
    if isinstance(dtype, torch.dtype):
        out = dtype
    else:
        text = str(dtype or "auto").strip().lower().removeprefix("torch.")
        if text == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        if text not in _DTYPES:
            raise ConfigError(f"invalid dtype {dtype!r} (use auto, float32, float16 or bfloat16)")
        out = _DTYPES[text]
    if out not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"invalid dtype {dtype!r} (use auto, float32, float16 or bfloat16)")
    if device.type == "cpu" and out != torch.float32:
        log.warning("%s on CPU is much slower than float32", str(out).removeprefix("torch."))
    return out


def check_images(images: Sequence[np.ndarray], name: str) -> list[np.ndarray]:
    """Validate a batch of HxWx3 uint8 RGB arrays (one clear line when one is not)."""
    out = []
    for i, im in enumerate(images):
        a = np.asarray(im)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or a.shape[0] < 1 or a.shape[1] < 1:
            raise DataError(
                f"{name}: image {i} must be an HxWx3 uint8 RGB array, got shape {a.shape} {a.dtype}"
            )
        if not a.flags.c_contiguous or not a.flags.writeable:
            a = np.array(a, order="C", copy=True)  # torch.from_numpy needs a writable array
        out.append(a)
    return out


def jsonable(value: Any) -> Any:
    """Processor settings as plain JSON values (enums by name, tuples as lists)."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): jsonable(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "name") and hasattr(value, "value"):  # enums (PIL resampling modes)
        return str(value.name).lower()
    return str(value)


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose code produced the vectors (for the manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "torchvision", "transformers", "timm"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def read_tensors(files: list, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Only the tensors whose names start with `prefixes`, from safetensors files (or
    `torch.load(weights_only=True)` for .bin files)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        name = str(f)
        if name.endswith(".json"):
            continue
        if name.endswith(".safetensors"):
            with safe_open(name, framework="pt", device="cpu") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if key.startswith(prefixes):
                        out[key] = fh.get_tensor(key)
        else:
            sd = torch.load(name, map_location="cpu", weights_only=True, mmap=True)
            out.update({k: v for k, v in sd.items() if k.startswith(prefixes)})
    return out


@dataclass(frozen=True)
class Pooling:
    """How one vector per image is taken from a family's model: `run(embedder, pixels)` ->
    [N, dim] tensor, and `dim(embedder)` -> dim, read from the loaded model."""

    run: Callable[[Any, torch.Tensor], torch.Tensor]
    dim: Callable[[Any], int]


class Embedder(abc.ABC):
    """One loaded model: `preprocess` RGB arrays into pixels, `forward` pixels into vectors.

    A family subclasses this with `POOLINGS` (its pooling table: adding a pooling is one entry)
    and the methods marked abstract: `_load` (from the resolved weights), `preprocess` and
    `processor_settings`. Everything else is shared.
    """

    #: The family's poolings, by the name a ModelSpec's `pooling` uses.
    POOLINGS: ClassVar[Mapping[str, Pooling]] = {}

    spec: ModelSpec
    options: EmbedOptions
    device: torch.device
    dtype: torch.dtype
    dim: int
    weights: str | None  # the source actually used (hub id, local path, ...); None: weight-free
    revision: str | None  # the hub commit, when known
    weights_file: str | None = None  # the single weight file read (torchvision/timm families)
    preprocess_device: torch.device  # where resizing/normalising runs (default: the model's)
    memory_format: torch.memory_format  # channels_last for CNNs whose spec asks for it
    model: Any = None

    def __init__(self, spec: ModelSpec, options: EmbedOptions | None = None, *,
                 source: Source | None = None, resolved: Resolved = None) -> None:
        """Build from `resolved` weights (what `sources.resolve` found for `source`);
        `create_embedder` resolves and calls this."""
        options = options or EmbedOptions()
        if spec.pooling not in self.POOLINGS:
            raise ValueError(
                f"{spec.name}: unknown pooling {spec.pooling!r} for the {spec.family} family "
                f"(poolings: {', '.join(self.POOLINGS)})"
            )
        self.spec = spec
        self.options = options
        self.pooling = self.POOLINGS[spec.pooling]
        self.device = resolve_device(options.device)
        self.preprocess_device = (
            self.device if options.preprocess_device is None
            else resolve_device(options.preprocess_device)
        )
        self.dtype = resolve_dtype(options.dtype, self.device)
        given = options.weights is not None
        self.weights = str(options.weights) if given else spec.weights
        self.revision = source.revision if source is not None else None
        self._load(resolved)
        self.dim = int(self.pooling.dim(self))
        self.memory_format = torch.contiguous_format
        if spec.channels_last and isinstance(self.model, torch.nn.Module):
            self.memory_format = torch.channels_last
            self.model = self.model.to(memory_format=self.memory_format)

    # --- what a family provides -------------------------------------------------------------------
    @abc.abstractmethod
    def _load(self, resolved: Resolved) -> None:
        """Build `self.model` (and the processor) from the resolved weights."""

    @abc.abstractmethod
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """HxWx3 uint8 RGB arrays (any sizes) -> a pixel batch on self.device in self.dtype.

        Resizing and normalising run on `self.preprocess_device` (the model's device unless told
        otherwise): on a GPU only the uint8 images cross the bus and the CPU stays free to decode.
        """

    @abc.abstractmethod
    def processor_settings(self) -> dict[str, Any]:
        """The preprocessing settings, as plain JSON values (for the manifest)."""

    # --- shared -------------------------------------------------------------------------------
    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pooling.run(self, pixels)

    def forward(self, pixels: torch.Tensor) -> np.ndarray:
        """Pixels -> [N, dim] float32 numpy vectors (under torch.inference_mode)."""
        if pixels.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        pixels = pixels.to(self.device, self.dtype)
        if pixels.dim() == 4 and self.memory_format is not torch.contiguous_format:
            pixels = pixels.contiguous(memory_format=self.memory_format)
        with torch.inference_mode():
            out = self._forward(pixels)
        return out.float().cpu().numpy().reshape(pixels.shape[0], -1)
    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.forward(self.preprocess(images))

    def describe(self) -> dict[str, Any]:
        """What produced the vectors, for the run manifest."""
        return {
            "model": self.spec.name,
            "family": self.spec.family,
            "architecture": self.spec.architecture,
            "checkpoint": self.weights,
            "revision": self.revision,
            "weights_file": self.weights_file,
            "dim": self.dim,
            "pooling": self.spec.pooling,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "preprocess_device": str(self.preprocess_device),
            "memory_format": str(self.memory_format).removeprefix("torch."),
            "processor": self.processor_settings(),
            "versions": library_versions(),
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec.name} {self.weights} dim={self.dim} {self.device} {self.dtype}>"


class TextEncoder(abc.ABC):
    """The text tower of a model that has one (`ModelSpec.text_tower`), loaded without the
    image side: `text_features(texts)` gives [N, dim] float32 vectors in the space of the
    model's image embeddings (for CLIP, what `CLIPModel.get_text_features` gives)."""

    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    dim: int
    weights: str | None
    revision: str | None

    def __init__(self, spec: ModelSpec, options: EmbedOptions | None = None, *,
                 source: Source | None = None, resolved: Resolved = None) -> None:
        options = options or EmbedOptions()
        self.spec = spec
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self.weights = str(options.weights) if options.weights is not None else spec.weights
        self.revision = source.revision if source is not None else None
        self._load(source, resolved)

    @abc.abstractmethod
    def _load(self, source: Source | None, resolved: Resolved) -> None:
        """Build the text tower and its tokenizer from the resolved weights; set `self.dim`."""

    @abc.abstractmethod
    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> [N, dim] float32 numpy vectors (unnormalised, like the image embeddings)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec.name} {self.weights} dim={self.dim} {self.device}>"
