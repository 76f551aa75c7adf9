"""The benchmark targets, stated once; every verdict in the figures and the summary comes from here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MET = "met"
NOT_MET = "not met"
NOT_MEASURED = "n/a"


@dataclass(frozen=True)
class Target:
    """A bound on one measured number (a ratio): at least, above and/or below a value."""

    label: str  # what is measured ("steady-state efficiency")
    at_least: float | None = None  # met when value >= at_least
    above: float | None = None  # met when value > above
    below: float | None = None  # met when value < below

    @property
    def text(self) -> str:
        """How the target reads in the tables, from its numbers: "steady-state efficiency >= 0.9"."""
        parts = [f"{op} {v:g}" for op, v in ((">=", self.at_least), (">", self.above),
                                              ("<", self.below)) if v is not None]
        return f"{self.label} {' and '.join(parts)}"

    def met(self, value: float | None) -> bool | None:
        """Whether `value` meets the target; None when nothing was measured."""
        if value is None or value != value:  # None or NaN
            return None
        return not ((self.at_least is not None and value < self.at_least)
                    or (self.above is not None and value <= self.above)
                    or (self.below is not None and value >= self.below))

    def verdict(self, value: float | None) -> str:
        return verdict_of([self.met(value)])


def verdict_of(results: Iterable[bool | None]) -> str:
    """`met` when every result is met, `not met` when any is not, `n/a` when none was measured."""
    got = [r for r in results if r is not None]
    if not got:
        return NOT_MEASURED
    return MET if all(got) else NOT_MET


#: Figure 1: the pipeline's steady-state rate over the bare batched forward's.
EFFICIENCY = Target("steady-state efficiency", at_least=0.9)
#: Figure 2: the best flagsim rate over the original per-image method's.
ORIGINAL = Target("speed-up over the original", above=1.0)
#: Figure 3: the slowest torchvision-backed processor's rate over its PIL twin's.
PREPROCESS = Target("torchvision / PIL, every processor", above=1.0)
#: Figure 3b: the smallest channels_last / contiguous forward throughput ratio.
MEMORY_FORMAT = Target("channels_last / contiguous, every CNN", above=1.0)
#: Figure 4: one pipeline per model over one pipeline for all models (wall time ratio).
MANY_MODELS = Target("per-model wall time / decode-once wall time", above=1.0)
#: Figure 5: 10x the images: peak memory ratio (flat) and throughput-per-image ratio.
SCALE_MEMORY = Target("peak memory ratio", below=1.25)
SCALE_THROUGHPUT = Target("throughput-per-image ratio", at_least=0.9)
#: Figure 6: the share of methods whose neighbours equal FAISS IndexFlatIP's (ties allowed).
KNN_EQUAL = Target("share of methods equal to FAISS", at_least=1.0)
#: Figure 8: the neighbour table through flagsim's CLI over a bare FAISS script, same index.
SEARCH_THROUGHPUT = Target("flagsim / bare FAISS throughput", at_least=0.8)
#: ... in the steady state: the neighbours job's part completion rate over bare FAISS's search
SEARCH_STEADY = Target("flagsim neighbours steady-state / bare FAISS search throughput",
                       at_least=0.8)
SEARCH_RECALL = Target("recall@10, automatic approximate index", at_least=0.95)
SEARCH_DRIVER_MEMORY = Target("neighbours driver peak RSS (it holds no index), largest / smallest N",
                              below=1.25)
SEARCH_DRIVER_PRIVATE = Target("neighbours driver private memory (RssAnon), largest / smallest N",
                               below=1.25)


# `flagsim query NAME` at 300k images (issue 13): under 1 GB, "about 1 s" (a fresh process,
# Python start-up and imports included, so the bound is set at 2 s)
QUERY_RSS_MIB = Target("peak RSS of `flagsim query NAME` (MiB)", below=1024)
QUERY_WALL_S = Target("wall time of `flagsim query NAME` (s)", below=2.0)
