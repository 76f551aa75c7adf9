"""Which models a run can search, in which order, and the names and ids of its images."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

from flagsim.errors import DataError, UnknownNameError
from flagsim.images import safe_stem
from flagsim.rundir import RunDir
from flagsim.shards import EmbeddingSet

log = logging.getLogger(__name__)

ENSEMBLE = "all"  # the name of the ensemble ranking (mean cosine over models)


def model_dim(model: str) -> int | None:
    """The registry's embedding dimension of `model`, or None when it is not registered."""
    try:
        from flagsim.models import get_spec
    except ImportError:  # registry not importable: nothing to check against
        return None
    try:
        return int(get_spec(model).dim)
    except KeyError:  # UnknownModelError is a KeyError
        return None


def complete_models(run: RunDir) -> list[str]:
    """Models of the run whose embeddings are complete (have a manifest), in a stable order.

    Registered models come in registry order, then the others alphabetically.
    """
    found = [m for m in run.embedded_models() if run.manifest(m).exists()]
    incomplete = sorted(set(run.embedded_models()) - set(found))
    for m in incomplete:
        log.warning("skipping %s: its embeddings are incomplete (no _manifest.json)", m)
    try:
        from flagsim.models import list_models

        order = {name: i for i, name in enumerate(list_models())}
    except ImportError:
        order = {}
    return sorted(found, key=lambda m: (order.get(m, len(order)), m))


def resolve_models(run: RunDir, models: Sequence[str] | None) -> list[str]:
    """`models` checked against the run (None or ["all"]: every complete model)."""
    available = complete_models(run)
    if not models or list(models) == [ENSEMBLE]:
        if not available:
            raise DataError(
                f"no embeddings in {run.root} (run `flagsim embed` or `flagsim import-csv` first)"
            )
        return available
    out: list[str] = []
    for m in models:
        if m == ENSEMBLE:
            continue
        if m not in out:
            out.append(m)
    for m in out:
        if not run.model_dir(m).exists():
            have = ", ".join(available) or "none"
            raise DataError(f"no embeddings for model {m} in {run.root} (models present: {have})")
    return out


# --- names -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Catalogue:
    """Image ids and display names known to a run (over the models searched)."""

    names: dict[str, str]  # image_id -> display name

    @classmethod
    def of(cls, sets: Iterable[EmbeddingSet]) -> Catalogue:
        names: dict[str, str] = {}
        for s in sets:
            for i, n in zip(s.ids, s.names, strict=True):
                names.setdefault(i, n)
        return cls(names)

    def knows(self, text: str) -> bool:
        """True when `text` is one of the run's display names or image ids (case-insensitive,
        as `resolve` matches them; a name shared by several images counts)."""
        key = text.strip().casefold()
        if not key:
            return False
        return key in self._keys or safe_stem(text.strip()).casefold() in self._keys

    @cached_property
    def _keys(self) -> set[str]:
        return {k.casefold() for k in self.names} | {n.casefold() for n in self.names.values()}

    @cached_property
    def _by_name(self) -> dict[str, list[str]]:
        by_name: dict[str, list[str]] = {}
        for i, n in self.names.items():
            by_name.setdefault(n.casefold(), []).append(i)
        return by_name

    @cached_property
    def _by_id(self) -> dict[str, str]:
        return {i.casefold(): i for i in self.names}

    def resolve(self, text: str) -> str:
        """The image id named by `text` (a display name or image id, case-insensitive).

        Unknown names raise UnknownNameError with up to five close matches.
        """
        key = text.strip().casefold()
        if not key:
            raise UnknownNameError("empty query name")
        by_name = self._by_name
        if key in by_name:
            ids = by_name[key]
            if len(ids) > 1:
                raise UnknownNameError(
                    f"{text!r} names {len(ids)} images; use one of the ids {', '.join(sorted(ids)[:5])}"
                )
            return ids[0]
        by_id = self._by_id
        for candidate in (key, safe_stem(text.strip()).casefold()):
            if candidate in by_id:
                return by_id[candidate]
        raise UnknownNameError(self.unknown_message(text))

    def unknown_message(self, text: str) -> str:
        display = sorted(set(self.names.values()) | set(self.names))
        folded: dict[str, str] = {}
        for d in display:
            folded.setdefault(d.casefold(), d)
        close = difflib.get_close_matches(text.strip().casefold(), list(folded), n=5, cutoff=0.6)
        if not close:  # a prefix or substring is a good guess for short or partial names
            close = [f for f in folded if text.strip().casefold() in f][:5]
        hint = ("; did you mean: " + ", ".join(folded[c] for c in close) + "?") if close else (
            f"; no close match among {len(self.names)} images"
        )
        return f"unknown name {text!r}{hint}"

    def name(self, image_id: str) -> str:
        return self.names.get(image_id, image_id)
