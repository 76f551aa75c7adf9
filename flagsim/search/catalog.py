"""Which models a run can search, in which order, and the names and ids of its images."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from flagsim.errors import AmbiguousNameError, DataError, UnknownNameError
from flagsim.images import safe_stem
from flagsim.rundir import RunDir
from flagsim.search.columns import as_string_array

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


def model_order(models: Iterable[str]) -> list[str]:
    """`models` in flagsim's one stable order: registered models in registry order, then the
    others alphabetically (duplicates dropped).

    The ensemble's vectors are its models' vectors concatenated in this order, whatever order
    the models were named in, so that every query, index and table of `all` agrees.
    """
    try:
        from flagsim.models import list_models

        order = {name: i for i, name in enumerate(list_models())}
    except ImportError:
        order = {}
    return sorted(set(models), key=lambda m: (order.get(m, len(order)), m))


def complete_models(run: RunDir) -> list[str]:
    """Models of the run whose embeddings are complete (have a manifest), in `model_order`."""
    found = [m for m in run.embedded_models() if run.manifest(m).exists()]
    incomplete = sorted(set(run.embedded_models()) - set(found))
    if incomplete:
        from flagsim.shards import no_manifest_error

        holder = _in_use(run)
        for m in incomplete:  # layout 1, or an embed still running or cut short
            log.warning("skipping %s: %s", m, no_manifest_error(run, m, holder))
    return model_order(found)


def _in_use(run: RunDir) -> str:
    """`RUN is in use by <holder>` while another process holds the run's lock, else ''."""
    from flagsim.runlock import in_use_by

    holder = in_use_by(run.root)
    return f"{run.root} is in use by {holder}" if holder else ""


def resolve_models(run: RunDir, models: Sequence[str] | None) -> list[str]:
    """`models` checked against the run (None or ["all"]: every complete model)."""
    available = complete_models(run)
    if not models or list(models) == [ENSEMBLE]:
        if not available:
            holder = _in_use(run)
            raise DataError(f"no embeddings in {run.root} (" + (
                f"{holder}: wait for it" if holder else
                "run `flagsim embed` or `flagsim import-csv` first") + ")")
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
        if m not in available:  # no manifest: layout 1, or an embed still running or cut short
            from flagsim.shards import no_manifest_error

            raise no_manifest_error(run, m, _in_use(run))
    return out


def search_tables(run: RunDir, models: Sequence[str] | None) -> list[tuple[str, tuple[str, ...]]]:
    """(table, ensemble members) in order: the models asked for (default: every complete
    model), then `all` over them (members in `model_order`) when it is named or, by default,
    when there are two or more. The tables `flagsim index`, `neighbours` and `search` make."""
    explicit = bool(models) and list(models or []) != [ENSEMBLE]
    names = resolve_models(run, models)
    out: list[tuple[str, tuple[str, ...]]] = [(m, ()) for m in names]
    if (not explicit) or ENSEMBLE in (models or []):
        if len(names) >= 2:
            if ENSEMBLE not in (models or []) and _no_common_image(run, names):
                log.warning("no image is in every one of the models %s: no ensemble %s (name "
                            "the models that share images with --models)", ", ".join(names),
                            ENSEMBLE)
            else:
                out.append((ENSEMBLE, tuple(model_order(names))))
        elif explicit:
            raise DataError(f"the ensemble {ENSEMBLE} needs at least two models, got {', '.join(names)}")
    return out


def _no_common_image(run: RunDir, names: Sequence[str]) -> bool:
    """Whether the models share no image (e.g. one imported from another collection), lined up
    as the ensemble lines them up: in shard files of the same name. Models that `flagsim embed`
    made from one images table share them: only other runs' ids are read, and only until a
    shared one is found."""
    from flagsim.shards import read_manifest, shared_rows

    mans = [read_manifest(run, m) for m in names]
    if any(man is None for man in mans):
        return False  # incomplete models are not searched anyway
    made = {(man.images_hash, man.source) for man in mans}
    if len(made) == 1 and next(iter(made))[1] == "flagsim embed":
        return False
    common = set.intersection(*(set(man.shards) for man in mans))
    return not any(shared_rows(run, names, shard).num_rows for shard in sorted(common))


# --- names -----------------------------------------------------------------------------------


def _fold_array(strings: pa.Array) -> pa.Array:
    """Names folded for matching: whitespace trimmed, Unicode NFC, lower case (a final sigma
    as a sigma, as `str.casefold` does: Arrow lowers `ΣΑΣ` to `σασ`, a person types `σας`)."""
    lower = pc.utf8_lower(pc.utf8_normalize(pc.utf8_trim_whitespace(strings), "NFC"))
    return pc.replace_substring(lower, "ς", "σ")


class Catalogue:
    """Image ids and display names known to a run (over the models searched).

    Kept as two Arrow columns; every lookup is one vectorised scan or hash, so resolving a name
    costs about a millisecond at 300k images and nothing per image is built in Python.
    Matching: the exact id, then the exact name, then both folded (`_candidates`).
    """

    def __init__(self, names: Mapping[str, str] | None = None, *, ids: Any = None,
                 display: Any = None) -> None:
        if names is not None:
            ids, display = list(names), list(names.values())
        self.ids = as_string_array(ids if ids is not None else [])
        self.display = as_string_array(display if display is not None else [])
        if len(self.ids) != len(self.display):
            raise ValueError("a catalogue needs one name per id")

    @classmethod
    def of(cls, sets: Iterable[Any]) -> Catalogue:
        """The union over objects with `ids` and `names` (first occurrence of an id wins)."""
        ids, names = None, None
        for s in sets:
            sid, sname = as_string_array(s.ids), as_string_array(s.names)
            if ids is None:
                ids, names = sid, sname
                continue
            new = pc.invert(pc.is_in(sid, value_set=ids))
            ids = pa.concat_arrays([ids, sid.filter(new)])
            names = pa.concat_arrays([names, sname.filter(new)])
        return cls(ids=ids, display=names)

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def names(self) -> dict[str, str]:
        """image_id -> display name, as a dict (built on first use: O(images) Python objects)."""
        return dict(zip(self.ids.to_pylist(), self.display.to_pylist(), strict=True))

    @cached_property
    def _folded_names(self) -> pa.Array:
        return _fold_array(self.display)

    @cached_property
    def _folded_ids(self) -> pa.Array:
        return _fold_array(self.ids)

    @staticmethod
    def _matches(keys: pa.Array, values: pa.Array, key: str) -> list[str]:
        """`values` where `keys` equals `key` (one vectorised scan)."""
        return values.filter(pc.equal(keys, pa.scalar(key, pa.string()))).to_pylist()

    @staticmethod
    def _fold(text: str) -> str:
        """`text` as the folded columns hold names: trimmed, NFC, lower case (Arrow's, so a
        name and its query fold alike: final sigma, dotted capital I)."""
        return _fold_array(pa.array([text], pa.string()))[0].as_py()

    def _candidates(self, text: str) -> list[str]:
        """The ids `text` names, by the first rule that matches: the exact image id, the exact
        display name, then both folded (trimmed, Unicode NFC, case-insensitive), then the
        folded id `safe_stem` makes of it (`Denmark[i]` -> Denmarki; an extension is kept, so
        `Chad.png` is not Chad). Several ids: a shared name."""
        exact = [(self.ids, text), (self.display, text)]
        if text.strip() != text:
            exact.append((self.display, text.strip()))
        for keys, key in exact:
            if found := self._matches(keys, self.ids, key):
                return found
        folded = self._fold(text)
        if not folded:
            return []
        for keys, key in ((self._folded_names, folded), (self._folded_ids, folded),
                          (self._folded_ids, self._fold(safe_stem(text.strip())))):
            if found := self._matches(keys, self.ids, key):
                return found
        return []

    def count_named(self, text: str) -> int:
        """How many images `text` names (as `resolve` matches; more than one: ambiguous)."""
        return len(self._candidates(text))

    def first(self, n: int) -> list[str]:
        return self.ids.slice(0, n).to_pylist()

    def knows(self, text: str) -> bool:
        """True when `text` names one of the run's images as `resolve` matches them (a name
        shared by several images counts)."""
        return bool(self._candidates(text))

    def resolve(self, text: str, suggest: bool = True) -> str:
        """The image id named by `text`: the exact image id, else the exact display name, else
        either folded (trimmed, NFC, case-insensitive); see `_candidates`.

        Unknown names raise UnknownNameError, with up to five close matches when `suggest`
        (finding them compares against every name: callers resolving many names that may be
        absent, like `eval`, pass False); a name of several images raises AmbiguousNameError
        listing their ids (each of which resolves exactly).
        """
        if not text.strip():
            raise UnknownNameError("empty query name")
        ids = self._candidates(text)
        if len(ids) > 1:
            raise AmbiguousNameError(
                f"{text!r} names {len(ids)} images; use one of the ids {', '.join(sorted(ids)[:5])}"
            )
        if ids:
            return ids[0]
        if not suggest:
            raise UnknownNameError(f"unknown name {text!r}")
        raise UnknownNameError(self.unknown_message(text))

    def unknown_message(self, text: str) -> str:
        display = sorted(set(self.display.to_pylist()) | set(self.ids.to_pylist()))
        folded: dict[str, str] = {}
        for d in display:
            folded.setdefault(d.casefold(), d)
        close = difflib.get_close_matches(text.strip().casefold(), list(folded), n=5, cutoff=0.6)
        if not close:  # a prefix or substring is a good guess for short or partial names
            close = [f for f in folded if text.strip().casefold() in f][:5]
        hint = ("; did you mean: " + ", ".join(folded[c] for c in close) + "?") if close else (
            f"; no close match among {len(self)} images"
        )
        return f"unknown name {text!r}{hint}"

    def name(self, image_id: str) -> str:
        pos = pc.index(self.ids, pa.scalar(image_id, pa.string())).as_py()
        return image_id if pos is None or pos < 0 else self.display[pos].as_py()
