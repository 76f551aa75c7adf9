"""Typed, frozen run configuration loaded from YAML and validated before any work starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flagsim.errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "float16", "bfloat16"]

#: Upper bounds on batch sizes: a larger value is a typo (or would not fit in memory), refused
#: up front in one line naming the key rather than failing inside a worker.
MAX_BATCH_SIZE = 8192  # images per forward pass
MAX_DECODE_BATCH_SIZE = 4096  # images decoded per read task batch
MAX_QUERY_BATCH_SIZE = 65536  # query vectors per index search


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelRunConfig(_Frozen):
    """How one model runs: weights location, batch size and its actor pool."""

    weights: str | None = None  # hub id or local directory/file; None = the registry default
    revision: str | None = None  # hub revision (branch, tag or commit)
    batch_size: int | None = Field(default=None, gt=0, le=MAX_BATCH_SIZE)
    num_actors: int = Field(default=1, gt=0, le=4096)
    max_actors: int | None = Field(default=None, gt=0, le=4096)  # autoscale up to this
    num_gpus: float = Field(default=0.0, ge=0, le=64)
    num_cpus: float | None = Field(default=None, gt=0, le=1024)
    torch_threads: int | None = Field(default=None, gt=0, le=1024)
    dtype: DType = "auto"
    # where images are resized and normalised: on the model's device (a GPU when it runs on one),
    # or always on the actor's CPU (saves GPU memory, costs CPU time)
    preprocess_on: Literal["device", "cpu"] = "device"

    @model_validator(mode="after")
    def _actors(self) -> ModelRunConfig:
        if self.max_actors is not None and self.max_actors < self.num_actors:
            raise ValueError("max_actors must be >= num_actors")
        return self


def gpus_per_actor(mcfg: ModelRunConfig, device: str) -> float:
    """GPUs one embed actor asks Ray for on `device` (cpu or cuda): its num_gpus, one whole GPU
    when that is 0 on CUDA, none on the CPU. The one place this rule is written."""
    if device != "cuda":
        return 0.0
    return mcfg.num_gpus if mcfg.num_gpus > 0 else 1.0


class DownloadConfig(_Frozen):
    """How `images.source: urls` downloads (the scraper's fetcher; see docs/scraper.md)."""

    concurrency: int = Field(default=4, ge=1, le=64)
    # seconds, at most a day (as the scraper's options; NaN and inf refused)
    timeout: float = Field(default=30.0, gt=0, le=86_400)
    deadline: float | None = Field(default=None, gt=0, le=86_400)
    max_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    retries: int = Field(default=3, ge=0, le=20)
    backoff: float = Field(default=1.0, ge=0, le=86_400)
    max_wait: float = Field(default=60.0, ge=0, le=86_400)
    user_agent: str | None = None  # None: the scraper's default
    allow_hosts: tuple[str, ...] = ()
    allow_private: bool = False  # tests only


class ImagesConfig(_Frozen):
    """Where the images come from when the run directory has no images table yet."""

    source: Literal["bundled", "folder", "csv", "table", "webdataset", "parquet", "urls"] = "bundled"
    # folder (path or s3:// / gs:// prefix), CSV, images.parquet, webdataset shard pattern
    # (`shard-{00000..00099}.tar`), Parquet file or folder, or URL table (CSV or Parquet)
    path: str | None = None
    image_dir: str | None = None  # for source: csv
    image_column: str | None = None  # for source: parquet (binary, or an HF {bytes, path} struct)
    id_column: str | None = None  # for source: parquet or urls
    name_column: str | None = None  # for source: parquet or urls
    url_column: str = "url"  # for source: urls
    download: DownloadConfig = DownloadConfig()  # for source: urls

    @model_validator(mode="after")
    def _keys(self) -> ImagesConfig:
        if self.source == "parquet" and not self.image_column:
            raise ValueError("images.source parquet needs images.image_column")
        return self


class RayConfig(_Frozen):
    address: str | None = None  # None: start an embedded local Ray; "auto" or ray://host:port
    connect_timeout_s: float = Field(default=15.0, gt=0, le=3600)  # wait for ray.address's port
    num_cpus: int | None = Field(default=None, gt=0)  # local Ray only
    num_gpus: int | None = Field(default=None, ge=0)  # local Ray only
    read_cpus: float = Field(default=1.0, gt=0)  # CPUs kept free for reading + decoding
    object_store_memory_gb: float | None = Field(default=None, gt=0)


class EmbedConfig(_Frozen):
    models: tuple[str, ...] = ("efficientnet-lite0", "pixels")
    strict: bool = False  # True: a model whose weights are missing fails the job
    device: Device = "auto"
    dtype: DType = "auto"  # auto: float16 on CUDA, float32 on CPU
    shard_size: int = Field(default=1000, gt=0, le=10_000_000)
    decode_batch_size: int = Field(default=32, gt=0, le=MAX_DECODE_BATCH_SIZE)
    max_image_pixels: int = Field(default=64_000_000, gt=0)  # decompression-bomb limit
    # pil: every image with PIL in the CPU read tasks. torchvision: JPEGs with
    # torchvision.io.decode_jpeg, on the GPU when the models run on one (each read task then
    # takes decode_gpus of a GPU: give the models num_gpus <= 1 - decode_gpus), other formats
    # and undecodable files with PIL. Off until measured (scripts/gpu_check.py).
    jpeg_decoder: Literal["pil", "torchvision"] = "pil"
    decode_gpus: float = Field(default=0.1, gt=0, le=1)
    defaults: ModelRunConfig = ModelRunConfig()
    model_settings: dict[str, ModelRunConfig] = Field(default_factory=dict, alias="settings")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("models")
    @classmethod
    def _known_models(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from flagsim.models import check_model_names

        if not v:
            raise ValueError("at least one model is required")
        check_model_names(v)
        if len(set(v)) != len(v):
            raise ValueError("models are listed more than once")
        return v

    @field_validator("model_settings")
    @classmethod
    def _known_settings(cls, v: dict[str, ModelRunConfig]) -> dict[str, ModelRunConfig]:
        from flagsim.models import check_model_names

        check_model_names(tuple(v))
        return v

    def for_model(self, name: str) -> ModelRunConfig:
        """Per-model settings over `defaults`."""
        base = self.defaults.model_dump()
        if name in self.model_settings:
            base.update(self.model_settings[name].model_dump(exclude_unset=True))
        return ModelRunConfig(**base)


class IndexConfig(_Frozen):
    kind: Literal["auto", "flat", "ivf", "hnsw", "ivfpq"] = "auto"
    memory_budget_gb: float = Field(default=8.0, gt=0)  # per index part (one worker's share)
    max_parts: int = Field(default=16, gt=0, le=4096)  # most parts an index is split into
    # auto: exact up to this many rows; None: the measured time crossover (search/choice.py)
    exact_max_rows: int | None = Field(default=None, gt=0)
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    recall_sample: int = Field(default=1000, gt=0)
    nlist: int | None = Field(default=None, gt=0)
    nprobe: int = Field(default=32, gt=0)
    hnsw_m: int = Field(default=32, gt=0)
    pq_m: int | None = Field(default=None, gt=0)

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _yaml_yes_no(cls, v: Any) -> Any:
        # YAML 1.1 (PyYAML) reads the documented `use_gpu: yes` / `no` unquoted as booleans
        return {True: "yes", False: "no"}.get(v, v) if isinstance(v, bool) else v


class NeighboursConfig(_Frozen):
    k: int = Field(default=10, gt=0, le=10_000)
    batch_size: int = Field(default=4096, gt=0, le=MAX_QUERY_BATCH_SIZE)  # queries per search
    num_actors: int = Field(default=1, gt=0, le=1024)  # search actors per index part
    # object store the job may fill at once (query shards read ahead, batches between stages,
    # rows the driver has not written yet); None: (actors + 3) query shards' worth, >= 64 MiB
    buffer_mb: float | None = Field(default=None, gt=0)


class ReportConfig(_Frozen):
    queries: tuple[str, ...] = ("Chad", "Australia", "Indonesia", "Ireland", "Denmark", "Japan")
    k: int = Field(default=5, gt=0, le=100)
    pairs: str | None = None  # labelled pairs for `eval` (default: the bundled file)
    map_max: int = Field(default=5000, ge=10, le=1_000_000)  # maps sample above this many images
    thumbs_max: int = Field(default=1000, ge=0, le=1_000_000)  # search-box thumbnails embedded
    projection: Literal["auto", "pca"] = "auto"  # auto: also UMAP / t-SNE when installed


class Config(_Frozen):
    """The whole run configuration (`configs/*.yaml`)."""

    run_dir: str = "runs/default"
    images: ImagesConfig = ImagesConfig()
    ray: RayConfig = RayConfig()
    embed: EmbedConfig = EmbedConfig()
    index: IndexConfig = IndexConfig()
    neighbours: NeighboursConfig = NeighboursConfig()
    report: ReportConfig = ReportConfig()


def _format_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
    msg = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    msg = msg.removeprefix("Value error, ")
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}" if loc else f"{source}: {msg}{more}"


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping names one key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # the mapping's own plain keys only: `<<:` merges may be overridden, and a key that is a
        # list or mapping is left to PyYAML's own error
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise DuplicateKeyError(
                    None, None, f"key {key_node.value!r} given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def parse_override(text: str) -> tuple[str, Any]:
    """`embed.models=[a,b]` → ("embed.models", ["a", "b"]); values parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r}: no key before '=' (write key.path=value)")
    if any(not part.strip() for part in key.split(".")):
        raise ConfigError(f"override {text!r}: key {key.strip()!r} has an empty part")
    if not raw.strip():
        raise ConfigError(
            f"override {text!r} has no value; leave the --set out to keep the default"
        )
    try:
        value = _load_yaml(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: not a valid YAML value") from exc
    return key.strip(), value


def load_config(
    path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
) -> Config:
    """Read YAML (or defaults when `path` is None), apply overrides, validate. Raises ConfigError."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {path}")
        if p.is_dir():
            raise ConfigError(f"{source}: is a directory, not a config file")
        try:  # any readable file: /dev/null (the defaults) and `<(...)` pipes included
            loaded = _load_yaml(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{source}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
        except DuplicateKeyError as exc:
            line = exc.problem_mark.line + 1 if exc.problem_mark is not None else "?"
            raise ConfigError(f"{source}: line {line}: {exc.problem}") from None
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"{source}: not valid YAML{where}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping")
        data = loaded
    if isinstance(overrides, dict):  # options: None means "not given on the command line"
        items = [(k, v) for k, v in overrides.items() if v is not None]
    else:  # --set key=value: an explicit null is a value, for the validation to judge
        items = [parse_override(o) for o in (overrides or [])]
    if overrides:  # where a bad value may come from, for the error line
        source = "--set" if path is None else f"{path} and --set"
    for key, value in items:
        _set_dotted(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
    except ConfigError:
        raise
    except Exception as exc:  # UnknownModelError from a validator
        raise ConfigError(f"{source}: {exc}") from None


def check_writable(location: str) -> None:
    """Fail fast when a local output directory cannot be created or written."""
    from flagsim.storage import is_uri

    if is_uri(location):
        return
    p = Path(location).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"output directory {location} is a file, not a directory")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {location} is not writable")
