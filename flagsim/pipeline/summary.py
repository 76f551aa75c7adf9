"""What `flagsim embed` reports: per-model results, the progress bar and the end-of-run table."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelResult:
    """One row of the end-of-run summary."""

    model: str
    status: str  # embedded | up to date | skipped | failed
    images: int = 0
    dim: int | None = None
    device: str = ""
    dtype: str = ""
    seconds: float | None = None
    images_per_s: float | None = None
    errors: int = 0
    reason: str = ""


@dataclass
class EmbedSummary:
    run_dir: str
    images: int
    results: list[ModelResult] = field(default_factory=list)
    decode_errors: int = 0

    def result(self, model: str) -> ModelResult:
        return next(r for r in self.results if r.model == model)


class progress:
    """A rich progress bar over images on stderr (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total

    def __enter__(self):
        if not self.enabled:
            return lambda _n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        from flagsim.console import stderr_console

        self._p = Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), console=stderr_console(), transient=False,
        )
        self._p.__enter__()
        task = self._p.add_task("embedding images", total=self.total)
        return lambda n: self._p.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._p.__exit__(*exc)


#: Below the summary table: what its time columns measure.
STREAM_NOTE = (
    "stream s, stream images/s: the shared stream's wall time and rate (decode and every model "
    "together, one pass over the images), not one model's own"
)


def summary_table(summary: EmbedSummary):
    """A rich Table: model, status, images, dim, device, dtype, stream s, stream images/s,
    errors, note. Every cell is escaped (names and reasons are shown literally)."""
    from rich.table import Table

    from flagsim.console import safe

    t = Table(title=f"flagsim embed: {summary.images} images -> {safe(summary.run_dir)}")
    numeric = ("images", "dim", "stream s", "stream images/s", "errors")
    for col in ("model", "status", "images", "dim", "device", "dtype", "stream s", "stream images/s",
                "errors", "note"):
        t.add_column(col, justify="right" if col in numeric else "left")
    for r in summary.results:
        t.add_row(
            safe(r.model), r.status, str(r.images), str(r.dim or ""), safe(r.device), safe(r.dtype),
            f"{r.seconds:.1f}" if r.seconds is not None else "",
            f"{r.images_per_s:.1f}" if r.images_per_s is not None else "",
            str(r.errors), safe(_short(r.reason)),
        )
    return t


def _short(reason: str) -> str:
    if not reason:
        return ""
    return "weights unavailable (see below)" if "weights" in reason else reason[:40]


def print_summary(summary: EmbedSummary) -> None:
    """The summary table, a note on its time columns, then each skip reason in full on its own
    line (one line each however long: a pipe gets the full width)."""
    from flagsim.console import safe, stdout_console

    console = stdout_console()
    console.print(summary_table(summary))
    if any(r.seconds is not None for r in summary.results):
        console.print(STREAM_NOTE, markup=False, highlight=False)
    for r in summary.results:
        if r.reason:
            console.print(f"  {safe(r.model)} {r.status}: {safe(r.reason)}", soft_wrap=True,
                          highlight=False)
