"""The default run's offline ranking on the labelled flags: `flagsim eval`'s figures, recomputed
by brute force from the run's own neighbour and embedding tables, and the targets they meet."""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flagsim.cli import main
from flagsim.config import load_config
from flagsim.images import bundled_table
from flagsim.models import check_weights

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs" / "default.yaml"
PAIRS = {"development": "similar_flags.csv", "check": "similar_flags_check.csv"}
NEW_MODELS = {"efficientnet-lite0-ms", "colour-layout"}

pytestmark = pytest.mark.ray


def _labelled(path: Path) -> list[tuple[str, list[str]]]:
    """The rows of a labels file, parsed here on their own (not with flagsim.evaluate)."""
    lines = [line for line in path.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    rows = list(csv.reader(lines))
    assert rows[0] == ["query", "similar"]
    return [(r[0], [s for s in r[1].split(";") if s]) for r in rows[1:]]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, ray_local) -> Path:
    """`flagsim pipeline` with configs/default.yaml on the bundled flags, with the default
    models whose weights are here (the hub models are skipped offline either way)."""
    models = [m for m in load_config(DEFAULT).embed.models if check_weights(m) is None]
    assert NEW_MODELS <= set(models)
    run = tmp_path_factory.mktemp("default") / "run"
    assert main(["-q", "pipeline", "--config", str(DEFAULT), "--set",
                 f"embed.models=[{','.join(models)}]", "--run", str(run), "--no-progress"]) == 0
    return run


def _ids(run: Path) -> dict[str, str]:
    images = pq.read_table(run / "images.parquet", columns=["image_id", "name"]).to_pylist()
    return {r["name"].lower(): r["image_id"] for r in images}


def _neighbour_lists(run: Path, model: str) -> dict[str, list[str]]:
    """query_id -> neighbour ids by rank, read from the neighbour table's parquet parts."""
    parts = sorted((run / "neighbours" / f"model={model}").glob("part-*.parquet"))
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    out: dict[str, list[tuple[int, str]]] = {}
    for r in rows:
        out.setdefault(r["query_id"], []).append((r["rank"], r["neighbour_id"]))
    return {q: [n for _, n in sorted(v)] for q, v in out.items()}


def _ensemble_lists(run: Path, models: list[str], k: int) -> dict[str, list[str]]:
    """Top-k by the mean over models of the cosine similarity, from the embedding shards."""
    sims, ids = [], None
    for m in models:
        parts = sorted((run / "embeddings" / f"model={m}").glob("part-*.parquet"))
        table = [r for p in parts for r in pq.read_table(p).to_pylist()]
        table.sort(key=lambda r: r["image_id"])
        these = [r["image_id"] for r in table]
        assert ids is None or these == ids
        ids = these
        vec_col = next(c for c in table[0] if c not in ("image_id", "name"))
        x = np.array([r[vec_col] for r in table], dtype=np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sims.append(x @ x.T)
    mean = np.mean(sims, axis=0)
    np.fill_diagonal(mean, -np.inf)
    order = np.argsort(-mean, axis=1, kind="stable")[:, :k]
    return {ids[i]: [ids[j] for j in order[i]] for i in range(len(ids))}


def _hits(lists: dict[str, list[str]], labelled, ids: dict[str, str]) -> tuple[int, float, float]:
    used = []
    for query, similar in labelled:
        q = ids.get(query.lower())
        sims = {ids[s.lower()] for s in similar if s.lower() in ids} - {q}
        if q is not None and sims:
            used.append((q, sims))
    h1 = np.mean([lists[q][0] in sims for q, sims in used])
    h5 = np.mean([bool(set(lists[q][:5]) & sims) for q, sims in used])
    return len(used), float(h1), float(h5)


@pytest.mark.parametrize("part", list(PAIRS))
def test_eval_figures_are_the_run_tables_and_meet_the_target(default_run, part, capsys):
    path = Path(str(resources.files("flagsim") / "configs" / PAIRS[part]))
    capsys.readouterr()
    assert main(["-q", "eval", "--run", str(default_run), "--pairs", str(path), "--json"]) == 0
    figures = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    models = [m for m in figures if m != "all"]
    assert NEW_MODELS <= set(models)
    labelled, ids = _labelled(path), _ids(default_run)
    brute = {m: _hits(_neighbour_lists(default_run, m), labelled, ids) for m in models}
    brute["all"] = _hits(_ensemble_lists(default_run, models, 5), labelled, ids)
    for m, (pairs, h1, h5) in brute.items():
        assert figures[m]["pairs"] == pairs == len(labelled), m
        assert figures[m]["hit@1"] == pytest.approx(h1, abs=1e-9), m
        assert figures[m]["hit@5"] == pytest.approx(h5, abs=1e-9), m
    # the target of the issue, met by the ensemble of the default run's offline models
    # (docs/query.md: development 0.841 / 0.942, check 0.750 / 1.000)
    assert brute["all"][2] >= 0.9
    assert brute["all"][1] >= (0.75 if part == "development" else 0.7)


def test_check_part_is_bundled_and_shares_no_flag_with_the_development_part():
    shipped = Path(str(resources.files("flagsim") / "configs"))
    names = set(bundled_table().column("name").to_pylist())
    flags = {}
    for part, file in PAIRS.items():
        assert (shipped / file).read_bytes() == (REPO / "configs" / file).read_bytes()
        rows = _labelled(shipped / file)
        for q, similar in rows:
            assert q in names and set(similar) <= names and q not in similar, (file, q)
        flags[part] = {q for q, _ in rows} | {s for _, sim in rows for s in sim}
    assert len(_labelled(shipped / PAIRS["development"])) == 69
    assert len(_labelled(shipped / PAIRS["check"])) == 32
    assert not flags["development"] & flags["check"]
