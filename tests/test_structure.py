"""The package's structure: no import cycles, the library never imports the CLI, thin jobs.

Imports are read with `ast`, not by importing: every `import x` and `from x import y` anywhere in
a module counts, at module level, under `if TYPE_CHECKING:` and inside functions alike. A
deferred import hides a cycle from the interpreter without removing it from the design, and the
tree has no function-level cycle today, so none is allowed. `from x import y` is an edge to the
module `x.y` when that is a module of flagsim, else to `x`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "flagsim"
JOBS = REPO / "jobs"
JOB_LINES = 30  # non-blank, non-comment lines of one jobs/*.py

#: Cycles tolerated for now: none (models/base.py <-> models/registry.py went with models/spec.py).
KNOWN_CYCLES: set[frozenset[str]] = set()

#: Modules that are the CLI, or start it (`python -m flagsim`): they may import it.
CLI = ("flagsim.cli", "flagsim.commands", "flagsim.__main__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The flagsim modules that module `name` imports anywhere in its text."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..models import y
                parent = package[: len(package) - (node.level - 1)]
                base = ".".join([*parent, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_walk_sees_a_planted_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert "flagsim.app.checks" in _imports("flagsim.app.stages")  # from x import y
    assert "flagsim.app.stages" in _imports("flagsim.app.jobs")  # from package import module
    assert "flagsim.errors" in _imports("flagsim.config")


def test_flagsim_has_no_import_cycle() -> None:
    graph = {m: _imports(m) for m in MODULES}
    cycles = [sorted(c) for c in _cycles(graph) if c not in KNOWN_CYCLES]
    assert cycles == [], f"import cycles in flagsim/: {cycles}"


def test_only_the_cli_imports_the_cli() -> None:
    offenders = {
        m: sorted(i for i in _imports(m) if i.startswith(CLI[:2]))
        for m in MODULES if not m.startswith(CLI)
    }
    assert {m: i for m, i in offenders.items() if i} == {}


def test_the_library_never_imports_the_application_layer() -> None:
    """flagsim.app (stages, checks, logging) sits above the library: only the CLI and the app
    itself may import it (docs/architecture.md)."""
    offenders = {
        m: sorted(i for i in _imports(m) if i == "flagsim.app" or i.startswith("flagsim.app."))
        for m in MODULES if not m.startswith((*CLI, "flagsim.app"))
    }
    assert {m: i for m, i in offenders.items() if i} == {}


def _code_lines(path: Path) -> int:
    return sum(1 for ln in path.read_text(encoding="utf-8").splitlines()
               if ln.strip() and not ln.lstrip().startswith("#"))


@pytest.mark.parametrize("job", sorted(p.name for p in JOBS.glob("*.py")))
def test_every_job_is_a_thin_entry_point(job: str) -> None:
    """A job parses, calls one function of flagsim.app and exits; the logic lives in flagsim/."""
    assert _code_lines(JOBS / job) <= JOB_LINES


def test_no_check_of_a_status_that_is_never_set() -> None:
    """ModelResult.status is embedded, up to date or skipped; a model that fails raises."""
    checks = [f"{p.relative_to(REPO)}" for root in (PACKAGE, JOBS) for p in sorted(root.rglob("*.py"))
              if 'status == "failed"' in p.read_text(encoding="utf-8")]
    assert checks == []


def test_the_gpu_per_actor_rule_is_one_function_both_sides_use() -> None:
    """The pre-flight checks and the embed actors ask for the same GPUs (config.gpus_per_actor,
    importable without Ray); it was written twice, in pipeline/embed.py and jobs/_common.py.
    The embed's resource plan (pipeline/plan.py) uses it."""
    from flagsim.config import ModelRunConfig, gpus_per_actor

    assert gpus_per_actor(ModelRunConfig(), "cuda") == 1.0  # a whole GPU when none is set
    assert gpus_per_actor(ModelRunConfig(num_gpus=0.5), "cuda") == 0.5
    assert gpus_per_actor(ModelRunConfig(num_gpus=2), "cpu") == 0.0
    for module in ("flagsim.app.checks", "flagsim.pipeline.plan"):
        names = {n.id for n in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8")))
                 if isinstance(n, ast.Name)}
        assert "gpus_per_actor" in names, module
