"""The benchmark and GPU-check harness measures flagsim's own code, and computes its verdicts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import targets
from bench.checkpoints import save_random_checkpoint
from flagsim.models import create_embedder
from flagsim.pipeline.mapper import EmbedActor

REPO = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test",
                                                  REPO / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _images(n: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (90 + 10 * i, 140, 3), dtype=np.uint8) for i in range(n)]


def test_verdicts_follow_the_numbers() -> None:
    t = targets.EFFICIENCY
    assert t.text == "steady-state efficiency >= 0.9"
    assert (t.verdict(0.95), t.verdict(0.9), t.verdict(0.89), t.verdict(None)) == (
        "met", "met", "not met", "n/a")
    assert targets.ORIGINAL.verdict(1.0) == "not met"  # strictly faster
    assert targets.SCALE_MEMORY.verdict(1.3) == "not met"
    assert targets.verdict_of([True, None]) == "met"
    assert targets.verdict_of([True, False]) == "not met"


@pytest.mark.parametrize("model", ["vit", "blip2"])
def test_random_checkpoint_loads_through_flagsims_local_weights_path(model: str,
                                                                     tmp_path: Path) -> None:
    weights = save_random_checkpoint(model, tmp_path / model, tiny=True)
    emb = create_embedder(model, weights=weights, device="cpu", dtype="float32")
    info = emb.describe()
    assert info["checkpoint"] == weights and "tiny" not in info  # loaded as a real checkpoint
    vecs = emb(_images())
    assert vecs.shape == (4, emb.dim) and np.isfinite(vecs).all()
    assert np.std(vecs) > 0  # random weights, not a degenerate constant
    actor = EmbedActor(model, weights=weights, device="cpu", dtype="float32")
    pix = np.empty(4, dtype=object)
    for i, im in enumerate(_images()):
        pix[i] = im
    out = actor({"ok": np.ones(4, bool), "pixels": pix, "image_id": np.arange(4)})
    np.testing.assert_allclose(out[f"emb:{model}"], vecs, rtol=1e-5, atol=1e-5)


def test_gpu_check_knn_searches_through_flagsim_index(tmp_path: Path) -> None:
    gc = _gpu_check()
    rec: dict = {}
    gc.knn_check(rec, n=600, d=64, k=5, device="cpu", budget=gc.Budget(120), n_check=50,
                 q_tile=256, workdir=tmp_path)
    assert rec["index_kind"] == "flat" and rec["index_device"] == "cpu"
    assert rec["complete"] and rec["queries_done"] == 600
    assert rec["identical_rows"] == 1.0 and rec["exact"]
    manifest = json.loads((tmp_path / "knn-run" / "index" / "model=random" /
                           "_manifest.json").read_text())
    assert manifest["count"] == 600


def test_gpu_check_model_section_runs_the_registry_entry(tmp_path: Path) -> None:
    gc = _gpu_check()
    rec: dict = {}
    gc.check_model("vit", rec, _images(8), "cpu", True, gc.Budget(300), 0.0, tmp_path)
    assert rec["parity_ok"] and rec["parity_min_cosine"] >= gc.PARITY_MIN_COSINE
    assert rec["processor"]["image_mean"] == [0.5, 0.5, 0.5]  # the registry's ViT processor
    assert rec["forward_img_s"] > 0 and rec["actor_img_s"] > 0


def test_search_scale_figure_runs_flagsims_cli_next_to_bare_faiss(tmp_path: Path) -> None:
    from bench import search_scale as S

    fig = S.run(sizes=[(32, [1500, 3000])], case_s=600, total_s=600, n_clusters=20,
                workdir=str(tmp_path), sample_size=300)
    rows = fig.raw["rows"]
    assert [(r["kind"], r["n"]) for r in rows] == [("flat", 1500), ("approx", 1500),
                                                   ("flat", 3000), ("approx", 3000)]
    assert all(r["measured"] for r in rows)
    for r in rows:
        assert r["neighbours_manifest"]["rows"] == r["n"] * S.K  # the CLI wrote the whole table
        assert r["neighbours"]["peak_tree_mib"] >= r["neighbours"]["peak_driver_mib"] > 50
        assert r["bare"]["peak_driver_mib"] > 0 and r["flagsim_s"] > 0 and r["bare_s"] > 0
        # the driver's private memory and the object-store pages it maps are sampled apart
        assert 0 < r["neighbours"]["peak_driver_anon_mib"] < r["neighbours"]["peak_driver_mib"]
        if r["kind"] == "flat":  # exact: both tables equal the streaming brute force
            assert r["index_kind"] == "flat" and r["flagsim_recall"] == r["bare_recall"] == 1.0
        else:  # flagsim's own approximate choice, and the bare script rebuilt the same index
            assert r["index_kind"] in ("ivf", "ivfpq") and r["factory"].startswith("IVF")
            assert r["params"]["nprobe"] > 0
            assert abs(r["flagsim_recall"] - r["bare_recall"]) <= 0.02
            assert r["flagsim_recall"] == pytest.approx(r["manifest_recall"], abs=0.1)
    assert all(g["slope"] is not None for g in fig.raw["growth"])
    v = fig.raw["verdicts"]
    assert {v["throughput"], v["recall"], v["driver"]} <= {"met", "not met"}
    assert not list(tmp_path.iterdir())  # each size's files are removed after it


def test_search_scale_running_ray_mode_uses_one_head_and_counts_its_processes(
        monkeypatch, tmp_path: Path) -> None:
    import psutil

    from bench import search_scale as S

    with S.running_ray(tmp_path) as head:
        probe = S.measure([sys.executable, "-c", "import ray; ray.init(); "
                           "print(ray.get_runtime_context().gcs_address); ray.shutdown()"],
                          S._env(head), also=head.pid)
        assert probe.rc == 0, probe.stderr_tail
        # the driver joined this head (its GCS port; Ray reports the node's own IP)
        assert probe.stdout.split()[-1].rsplit(":", 1)[1] == head.address.rsplit(":", 1)[1]
        assert probe.max_processes > 2  # the head's GCS and raylet count in the tree
        assert probe.peak_tree_mib > probe.peak_driver_mib
    assert not psutil.pid_exists(head.pid) or psutil.Process(head.pid).status() == "zombie"

    monkeypatch.setenv("FLAGSIM_BENCH_SEARCH_RAY", "running")
    monkeypatch.setenv("FLAGSIM_BENCH_SEARCH_KINDS", "approx")
    fig = S.run(sizes=[(32, [1500])], case_s=600, total_s=600, n_clusters=20,
                workdir=str(tmp_path / "work"), sample_size=300)
    (row,) = fig.raw["rows"]
    assert fig.raw["ray"] == row["ray"] == "running"
    assert row["neighbours_manifest"]["rows"] == 1500 * S.K
    assert "(running Ray)" in fig.tables[0].rows[0][2]
    assert any(n.startswith("Ray: rows marked (running Ray)") for n in fig.notes)


def test_search_scale_ray_mode_is_checked(monkeypatch) -> None:
    from bench import search_scale as S

    monkeypatch.setenv("FLAGSIM_BENCH_SEARCH_RAY", "cluster")
    with pytest.raises(ValueError, match="valid: embedded, running"):
        S.ray_mode()


def test_search_scale_steady_state_is_the_part_completion_slope_after_the_first_part(
        tmp_path: Path) -> None:
    import json
    import os

    from bench import search_scale as S

    parts = tmp_path / "_meta" / "neighbours" / f"model={S.MODEL}" / "parts"
    parts.mkdir(parents=True)
    # the first part lands 30 s after the start (the job's start-up), then one every 10 s
    for i, at in enumerate([1030.0, 1040.0, 1050.0, 1060.0]):
        path = parts / f"part-{i:05d}.json"
        path.write_text(json.dumps({"queries": 1000}))
        os.utime(path, (at, at))
    got = S.steady_state(tmp_path, wall_s=62.0)
    assert got["parts"] == 4
    assert got["rate"] == pytest.approx(100.0)  # 1000 queries per 10 s
    assert got["fixed_s"] == pytest.approx(62.0 - 4000 / 100.0)
    (parts / "part-00003.json").unlink()
    (parts / "part-00002.json").unlink()
    assert S.steady_state(tmp_path, wall_s=62.0)["rate"] is None  # two parts: no slope


def test_search_scale_projects_sizes_over_the_budget_from_the_fitted_slope() -> None:
    from bench import search_scale as S

    assert S.parse_sizes("256:100k,1M; 768:300k") == [(256, [100_000, 1_000_000]),
                                                     (768, [300_000])]
    with pytest.raises(ValueError):
        S.parse_sizes("256:")
    value, slope, fitted = S.predict([(1000, 1.0), (2000, 4.0)], 8000, "flat")
    assert fitted and slope == pytest.approx(2.0) and value == pytest.approx(64.0)
    value, slope, fitted = S.predict([(1000, 2.0)], 4000, "approx")
    assert not fitted and slope == 1.5 and value == pytest.approx(16.0)
    rows = [{"n": 1000, "d": 8, "kind": "flat", "measured": True, "flagsim_s": 1.0, "bare_s": 0.5},
            {"n": 2000, "d": 8, "kind": "flat", "measured": True, "flagsim_s": 2.0, "bare_s": 1.0},
            {"n": 4000, "d": 8, "kind": "flat", "measured": False}]
    S._project(rows)
    assert rows[2]["flagsim_s"] == pytest.approx(4.0) and rows[2]["flagsim_s_fitted"]
    assert rows[2]["bare_s"] == pytest.approx(2.0)


def test_synthetic_clusters_are_seeded_unit_vectors_and_exact_search_excludes_itself() -> None:
    from bench import search_scale as S

    gen = S.Clusters(16, n_clusters=5)
    x = np.concatenate([b for _, b in gen.rows(12_345, block=4096)])
    y = np.concatenate([b for _, b in S.Clusters(16, n_clusters=5).rows(12_345)])
    assert x.shape == (12_345, 16) and np.array_equal(x, y)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    sample = S.sample_rows(len(x), 50)
    got = S.exact_topk(gen, len(x), sample, k=5)
    sims = x[sample] @ x.T
    sims[np.arange(len(sample)), sample] = -np.inf
    want = np.argsort(-sims, axis=1)[:, :5]
    assert S.recall_at_k(want, got, k=5) == 1.0
    assert not np.any(got == sample[:, None])


def test_search_scale_budget_uses_another_dimension_scaled_when_none_was_measured() -> None:
    from bench import search_scale as S

    measured = [{"n": 1000, "d": 64, "kind": "flat", "measured": True, "flagsim_s": 1.0,
                 "bare_s": 1.0}]
    assert S._points(measured, 256, "flat") == [(1000, 8.0)]  # another d, scaled by d
    assert S._points(measured, 256, "approx") == []


def test_search_scale_runs_a_size_only_while_its_predicted_time_fits(monkeypatch, tmp_path) -> None:
    from bench import search_scale as S

    ran: list[tuple[int, int]] = []

    def fake_size(root, gen, n, kinds, sample_size, setup, ray_head=None):  # cost n^2 / 1e6 s for both systems
        ran.append((gen.d, n))
        return [{"n": n, "d": gen.d, "kind": k, "measured": True, "flagsim_s": n * n / 1e6,
                 "bare_s": n * n / 1e6, "throughput_ratio": 1.0, "flagsim_recall": 1.0,
                 "bare_recall": 1.0, "driver_beyond_index_mib": 100.0, "index_kind": "flat",
                 "factory": "Flat", "params": {}, "manifest_recall": 1.0, "cpu_ratio": 1.0,
                 "max_load": 1.0, "neighbours": {"peak_driver_mib": 1.0, "peak_tree_mib": 1.0},
                 "index": {"peak_driver_mib": 1.0, "peak_tree_mib": 1.0}, "index_file_mib": 1.0}
                for k in kinds]

    monkeypatch.setattr(S, "_one_size", fake_size)
    fig = S.run(sizes=[(8, [1000, 2000, 20_000]), (16, [1000, 100_000])], case_s=100,
                total_s=1e6, workdir=str(tmp_path))
    # 20k at d=8: fitted slope 2 from 1k and 2k -> 800 s > 100 s; 100k at d=16: 1k at d=16
    # measured first (it predicts from d=8 scaled x2: 4 s), then 100k: 2e4 s with slope 2
    assert ran == [(8, 1000), (8, 2000), (16, 1000)]
    skipped = [r for r in fig.raw["rows"] if not r["measured"]]
    assert {(r["d"], r["n"]) for r in skipped} == {(8, 20_000), (16, 100_000)}
    flat = next(r for r in skipped if r["d"] == 8 and r["kind"] == "flat")
    assert flat["flagsim_s"] == pytest.approx(400.0) and flat["flagsim_s_fitted"]
    assert "predicted" in flat["skipped_because"]
    assert any("projected" in str(row) for row in fig.tables[0].rows)


def test_search_scale_measures_only_the_kinds_named_in_the_environment(monkeypatch, tmp_path) -> None:
    from bench import search_scale as S

    asked: list[tuple[int, tuple[str, ...]]] = []

    def fake_size(root, gen, n, kinds, sample_size, setup, ray_head=None):
        asked.append((n, tuple(kinds)))
        return []

    monkeypatch.setattr(S, "_one_size", fake_size)
    monkeypatch.setenv("FLAGSIM_BENCH_SEARCH_KINDS", "approx")
    S.run(sizes=[(8, [1000])], case_s=100, total_s=1e6, workdir=str(tmp_path))
    assert asked == [(1000, ("approx",))]
    monkeypatch.setenv("FLAGSIM_BENCH_SEARCH_KINDS", "ivf")
    with pytest.raises(ValueError, match="unknown kind"):
        S.run(sizes=[(8, [1000])], case_s=100, total_s=1e6, workdir=str(tmp_path))


def test_search_scale_combines_runs_keeping_measured_rows_and_dropping_local_paths() -> None:
    from bench import search_scale as S

    def row(n, kind, measured=True, **extra):
        base = {"n": n, "d": 8, "kind": kind, "measured": measured}
        if not measured:
            return {**base, "skipped_because": "over budget", **extra}
        return {**base, "flagsim_s": n / 1e3, "bare_s": n / 1e3, "throughput_ratio": 1.0,
                "flagsim_recall": 1.0, "bare_recall": 1.0, "driver_beyond_index_mib": -5.0,
                "index_kind": "flat", "factory": "Flat", "params": {}, "manifest_recall": 1.0,
                "cpu_ratio": 1.0, "max_load": 1.0, "index_file_mib": 1.0,
                "neighbours": {"peak_driver_mib": 300.0 + n / 1e3, "peak_tree_mib": 1.0,
                               "cmd": ["/local/python", "-m", "flagsim.cli"]},
                "index": {"peak_driver_mib": 1.0, "peak_tree_mib": 1.0, "stderr_tail": "/local"}}

    raw = {"k": 10, "sample": 100, "n_clusters": 4, "faiss_threads": 2, "cpu_count": 2,
           "shard_rows": 10}
    a = {"raw": {**raw, "setup": [], "rows": [row(1000, "flat"), row(1000, "approx"),
                                               row(4000, "approx", measured=False)]}}
    b = {"raw": {**raw, "setup": [], "rows": [row(4000, "approx")]}}
    fig = S.combine([a, b])
    rows = fig.raw["rows"]
    assert sorted((r["n"], r["kind"], r["measured"]) for r in rows) == [
        (1000, "approx", True), (1000, "flat", True), (4000, "approx", True)]
    assert "/local" not in json.dumps(fig.as_dict())
    v = fig.raw["verdicts"]  # driver memory: the neighbours driver's own peak, 304 / 301
    assert v["driver_ratio"] == pytest.approx(304 / 301)
    assert [x["slope"] for x in fig.raw["growth"] if x["kind"] == "approx"] == [
        pytest.approx(1.0), pytest.approx(1.0)]


def test_search_scale_growth_is_fitted_per_ray_mode() -> None:
    from bench import search_scale as S

    def row(n: int, flagsim_s: float, ray: str) -> dict:
        return {"n": n, "d": 8, "kind": "approx", "measured": True, "ray": ray,
                "flagsim_s": flagsim_s, "bare_s": n / 1e3}

    rows = [row(1000, 10.0, "embedded"), row(4000, 20.0, "embedded"),  # slope 0.5
            row(1000, 1.0, "running"), row(4000, 4.0, "running")]  # slope 1
    got = {g["system"]: g for g in S.growth(rows) if g["kind"] == "approx"}
    assert set(got) == {"flagsim", "flagsim (running Ray)", "bare FAISS"}
    assert got["flagsim"]["slope"] == pytest.approx(0.5)
    assert got["flagsim (running Ray)"]["slope"] == pytest.approx(1.0)
    assert got["bare FAISS"]["sizes"] == [1000, 4000, 1000, 4000]


def test_gpu_check_jpeg_section_compares_pil_and_torchvision_on_the_cpu() -> None:
    gc = _gpu_check()
    rec: dict = {}
    gc.jpeg_check(rec, _images(8), "cpu", smoke=True)
    (case,) = rec["cases"]
    assert case["images"] == 8 and case["pil_img_s"] > 0 and case["torchvision_cpu_img_s"] > 0
    assert case["torchvision_cpu_max_abs_diff"] == 0  # the same libjpeg-turbo decode as PIL
    assert "torchvision_cuda_img_s" not in case and "no GPU" in rec["note"]
    md = gc.render_markdown({"meta": {}, "sections": {"jpeg_decode": {"status": "ok", **rec}}})
    assert "| 320 | 8 |" in md


def test_query_one_figure_measures_a_real_flagsim_query() -> None:
    from bench import query_one

    fig = query_one.run(((3_000, 32),), repeat=2)
    (row,) = fig.raw["rows"]
    assert row["build_rc"] == 0 and row["kind"] == "flat"  # auto: exact below the crossover
    assert len(row["walls"]) == 2 and all(w > 0 for w in row["walls"])
    assert all(50 < p < 4096 for p in row["peaks_mib"])  # a real process was measured
    assert fig.tables[0].rows[0][0] == "3,000 x 32"
