"""`compare` and `eval`: the original experiment's checks, agreement, ensemble and hit@k."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from flagsim.cli import main
from flagsim.errors import DataError
from flagsim.images import bundled_table
from flagsim.rundir import RunDir
from flagsim.search.compare import Comparison, Hit, compare
from flagsim.search.evaluate import default_pairs_path, evaluate, read_pairs
from flagsim.shards import Manifest, embeddings_table, write_manifest, write_shard

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "data" / "reference"
MODELS = ["vit", "clip", "blip2", "efficientnet", "dinov2", "vgg16"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("reference")
    files = sorted(str(p) for p in REFERENCE.glob("national_flag_embeddings_*.csv.gz"))
    assert main(["-q", "import-csv", *files, "--run", str(root)]) == 0
    return str(root)


def _write_model(root, model: str, ids: list[str], vectors: np.ndarray) -> None:
    run = RunDir.at(str(root))
    table = embeddings_table(ids, [i.replace("_", " ") for i in ids], model, vectors)
    write_shard(run, model, 0, table)
    write_manifest(run, Manifest(model=model, dim=vectors.shape[1], rows=len(ids),
                                 images_hash="test", shards={"part-00000.parquet": len(ids)},
                                 source="test"))


def test_compare_reproduces_the_original_two_checks(reference_run) -> None:
    c = compare(reference_run, ["chad", "Australia"], k=5)
    assert isinstance(c, Comparison)
    assert sorted(c.models) == sorted(MODELS)
    assert c.queries == ["Chad", "Australia"] and c.k == 5
    assert c.query_ids == {"Chad": "Chad", "Australia": "Australia"}
    chad = c.results["Chad"]
    assert {m: chad[m][0].name for m in MODELS} == dict.fromkeys(MODELS, "Romania")
    australia = {m: c.results["Australia"][m][0].name for m in MODELS}
    assert australia.pop("efficientnet") == "Tuvalu"
    assert set(australia.values()) == {"New Zealand"}
    for per in c.results.values():
        assert "all" in per
        for hits in per.values():
            assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
            assert all(isinstance(h, Hit) for h in hits)
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert "Chad" not in [h.image_id for h in chad["all"]]


def test_agreement_matrix_is_symmetric_with_unit_diagonal(reference_run) -> None:
    c = compare(reference_run, ["Chad"], k=5)
    a = c.agreement
    assert list(a.index) == list(a.columns) == c.models
    m = a.to_numpy()
    np.testing.assert_allclose(m, m.T)
    np.testing.assert_allclose(np.diag(m), 1.0)
    assert ((m >= 0) & (m <= 1)).all()
    assert (m[~np.eye(len(m), dtype=bool)] < 1).all()  # six different models never agree fully


def test_ensemble_ranks_by_mean_cosine_of_the_models(reference_run) -> None:
    from flagsim.shards import read_embeddings

    c = compare(reference_run, ["Australia"], k=5)
    run = RunDir.at(reference_run)
    sets = [read_embeddings(run, m) for m in c.models]
    ids = sets[0].ids
    mean = np.zeros((len(ids), len(ids)))
    for s in sets:
        assert s.ids == ids
        x = s.vectors.astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        mean += x @ x.T / len(sets)
    q = ids.index("Australia")
    mean[q, q] = -np.inf
    want = np.argsort(-mean[q])[:5]
    got = c.results["Australia"]["all"]
    assert [h.image_id for h in got] == [ids[j] for j in want]
    np.testing.assert_allclose([h.score for h in got], mean[q, want], atol=1e-5)


def test_agreement_counts_overlapping_top_k(tmp_path) -> None:
    ids = [f"i{n}" for n in range(6)]
    base = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    _write_model(tmp_path, "a", ids, base)
    _write_model(tmp_path, "b", ids, base * 3.0)  # same directions: the same neighbours
    other = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
    _write_model(tmp_path, "c", ids, other)
    c = compare(str(tmp_path), ["i0"], k=2)
    assert c.agreement.loc["a", "b"] == 1.0

    def top2(v: np.ndarray) -> list[set]:
        x = v / np.linalg.norm(v, axis=1, keepdims=True)
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return [set(np.argsort(-row)[:2]) for row in s]

    # c's overlap with a, recomputed from the brute-force top-2 sets
    want = np.mean([len(x & y) / 2 for x, y in zip(top2(base), top2(other), strict=True)])
    assert c.agreement.loc["a", "c"] == pytest.approx(want)


def test_unknown_query_fails_compare_and_available_queries_filters_it(reference_run) -> None:
    from flagsim.errors import UnknownNameError
    from flagsim.search.compare import available_queries

    with pytest.raises(UnknownNameError, match="unknown name 'Atlantis'"):
        compare(reference_run, ["Chad", "Atlantis"])
    assert available_queries(reference_run, ["Chad", "Atlantis", "denmark"]) == ["Chad", "denmark"]


def test_cli_compare_defaults_to_the_original_checks(reference_run, capsys) -> None:
    assert main(["-q", "compare", "--run", reference_run]) == 0
    out = capsys.readouterr().out
    assert "Chad: top match Romania for 6 of 6" in out
    assert "Australia: top match New Zealand for 5 of 6, Tuvalu for 1 of 6" in out
    assert main(["-q", "compare", "Japan", "--run", reference_run, "-k", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["queries"] == ["Japan"] and len(data["results"]["Japan"]["all"]) == 3


def test_cli_compare_without_queries_on_a_run_lacking_the_defaults(tmp_path, capsys) -> None:
    """`flagsim compare` with no QUERY failed (`unknown name 'Australia'`) on any run without
    both default flags, though the report skips missing defaults."""
    ids = ["Chad", "i1", "i2", "i3"]
    vectors = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    _write_model(tmp_path / "flags", "a", ids, vectors)
    assert main(["compare", "--run", str(tmp_path / "flags"), "-k", "2", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["queries"] == ["Chad"]
    assert "default queries not in this run: Australia; comparing Chad" in captured.err
    _write_model(tmp_path / "other", "a", ["p", "q", "r"], vectors[:3])
    assert main(["compare", "--run", str(tmp_path / "other"), "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["queries"] == ["p", "q"]
    assert main(["compare", "Australia", "--run", str(tmp_path / "other")]) == 2  # named: an error


# --- eval ------------------------------------------------------------------------------------


def test_eval_hit_at_1_and_5_on_a_hand_made_case(tmp_path, caplog) -> None:
    # 8 unit vectors at these angles (degrees): neighbours are ranked by angular distance
    ids = [f"p{n}" for n in range(8)]
    angles = np.deg2rad([0, 10, 30, 60, 100, 150, 210, 280])
    circle = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    _write_model(tmp_path, "m", ids, circle)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "# hand-made\n"
        "query,similar\n"
        "p0,p1\n"          # p0's nearest is p1 (10 deg): hit@1 and hit@5
        "p3,p5\n"          # from p3: p2 30, p4 40, p1 50, p0 60, p5 90 -> 5th: hit@5 only
        "p4,p7\n"          # p7 is 180 deg from p4, the farthest: miss both
        "p6,P5;nobody\n"   # names are case-insensitive, unknown ones left out; p5 (60) first
        "nobody,p1\n"      # unknown query: left out
    )
    with caplog.at_level("WARNING", logger="flagsim.search.evaluate"):
        df = evaluate(str(tmp_path), str(pairs))
    # one line for every unknown name (a non-flag run printed 241 lines of them)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"2 name(s) of the labelled pairs are not in the run and were left out "
                      f"(first: {pairs}: line 6: unknown name 'nobody')"], warned
    assert list(df.columns) == ["model", "pairs", "hit@1", "hit@5"]
    assert list(df["model"]) == ["m", "all"]
    row = df.set_index("model").loc["m"]
    assert row["pairs"] == 4
    assert row["hit@1"] == 0.5
    assert row["hit@5"] == 0.75
    # one model: the ensemble is the same ranking
    assert df.set_index("model").loc["all"].tolist() == row.tolist()


def test_eval_with_no_usable_pairs_is_an_error(tmp_path) -> None:
    _write_model(tmp_path, "m", [f"p{n}" for n in range(7)],
                 np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32))
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("query,similar\nfoo,bar\n")
    with pytest.raises(DataError, match="none of the labelled queries in .*pairs.csv name images"):
        evaluate(str(tmp_path), str(pairs))
    pairs.write_text("question,answer\nfoo,bar\n")
    with pytest.raises(DataError, match="expected the header query,similar"):
        evaluate(str(tmp_path), str(pairs))


def test_eval_runs_on_the_reference_import(reference_run, capsys) -> None:
    df = evaluate(reference_run)
    assert list(df["model"]) == [*sorted(MODELS, key=MODELS.index), "all"]
    n = len(read_pairs(None))
    assert (df["pairs"] == n).all()
    for col in ("hit@1", "hit@5"):
        assert df[col].between(0, 1).all()
    assert (df["hit@5"] >= df["hit@1"]).all()
    assert main(["-q", "eval", "--run", reference_run, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in data] == list(df["model"])


def test_labelled_pairs_file_is_bundled_and_names_real_flags() -> None:
    shipped = Path(str(resources.files("flagsim") / "configs" / "similar_flags.csv"))
    assert Path(default_pairs_path()) == shipped
    assert shipped.read_bytes() == (REPO / "configs" / "similar_flags.csv").read_bytes()
    header = [line for line in shipped.read_text().splitlines() if line.startswith("#")]
    assert any("by hand" in line for line in header)
    names = set(bundled_table().column("name").to_pylist())
    rows = read_pairs(None)
    assert len(rows) >= 40
    for r in rows:
        assert r.query in names and set(r.similar) <= names and r.query not in r.similar


def test_k_larger_than_a_small_collection_is_clamped_with_a_warning(tmp_path, caplog, capsys) -> None:
    ids = ["Chad", "Romania", "Andorra", "Japan", "Bangladesh"]
    rng = np.random.default_rng(3)
    _write_model(tmp_path, "a", ids, rng.normal(size=(5, 8)).astype(np.float32))
    _write_model(tmp_path, "b", ids, rng.normal(size=(5, 6)).astype(np.float32))
    with caplog.at_level("WARNING", logger="flagsim.search.compare"):
        c = compare(str(tmp_path), ["Chad"], k=10)
    assert c.k == 4
    assert [len(hits) for hits in c.results["Chad"].values()] == [4, 4, 4]  # a, b and the ensemble
    assert [r.getMessage() for r in caplog.records] == [
        "k=10 clamped to 4 (the collection has 5 images)"]
    assert main(["compare", "Chad", "Japan", "-k", "10", "--run", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "top-4 most similar to Chad" in captured.out
    assert "k=10 clamped to 4 (the collection has 5 images)" in captured.err
    with pytest.raises(DataError, match="k must be at least 1"):
        compare(str(tmp_path), ["Chad"], k=0)


# --- the labelled pairs file -----------------------------------------------------------------


def _circle_run(root) -> str:
    """Model `m` of p0..p7 at these angles (degrees): p0's nearest is p1, p2's is p1 (20 deg)."""
    ids = [f"p{n}" for n in range(8)]
    angles = np.deg2rad([0, 10, 30, 60, 100, 150, 210, 280])
    _write_model(root, "m", ids, np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32))
    return str(root)


def test_eval_counts_a_repeated_pair_once(tmp_path, caplog, capsys) -> None:
    from flagsim.report.explore import eval_detail
    from flagsim.search.session import RunSearch

    run = _circle_run(tmp_path)
    pairs = tmp_path / "pairs.csv"
    # p0 -> p1 is a hit, p2 -> p0 a miss at 1: three copies of the hit read 0.750 over 4 "pairs"
    pairs.write_text("query,similar\np0,p1\np0,p1\nP0,p1\np2,p0\n")
    with caplog.at_level("WARNING", logger="flagsim.search.evaluate"):
        df = evaluate(run, str(pairs))
    row = df.set_index("model").loc["m"]
    assert row["pairs"] == 2
    assert row["hit@1"] == 0.5
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"2 repeated labelled pair(s) dropped, each pair counted once "
                      f"(first: {pairs}: line 3 repeats line 2)"], warned
    # the report's per-query detail lists the same queries
    assert len([r for r in eval_detail(RunSearch(run), str(pairs)) if r.model == "m"]) == 2
    assert main(["eval", "--run", run, "--pairs", str(pairs), "--json"]) == 0
    out, err = capsys.readouterr()
    assert [r["pairs"] for r in json.loads(out)] == [2, 2]
    assert "2 repeated labelled pair(s) dropped" in err


def test_pairs_file_saved_by_excel_with_a_bom_and_crlf_is_read(tmp_path) -> None:
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes(b"\xef\xbb\xbfquery,similar\r\n# a comment\r\nA,B; C\r\n")
    assert [(r.query, r.similar, r.line) for r in read_pairs(str(pairs))] == [("A", ("B", "C"), 3)]


@pytest.mark.parametrize(("encoding", "name"), [
    ("utf-16", "São Tomé"), ("utf-16-le", "São Tomé"), ("utf-16-le", "Chad"), ("latin-1", "São Tomé")])
def test_a_pairs_file_that_is_not_utf8_is_one_line_naming_it(tmp_path, capsys, monkeypatch,
                                                              encoding, name) -> None:
    import flagsim.report as report_pkg

    run = _circle_run(tmp_path)
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes(f"query,similar\n{name},p1\n".encode(encoding))
    with pytest.raises(DataError, match=rf"^{pairs}\b.*UTF-8") as info:
        read_pairs(str(pairs))
    assert "\n" not in str(info.value)
    monkeypatch.setattr(report_pkg, "build_report", lambda *a, **k: pytest.fail("work started"))
    for command in ("eval", "report"):
        assert main([command, "--run", run, "--pairs", str(pairs)]) == 2
        err = capsys.readouterr().err
        assert err == f"flagsim: error: {info.value}\n", err


def test_utf16_with_a_bom_is_named_as_utf16(tmp_path) -> None:
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes("query,similar\np0,p1\n".encode("utf-16"))
    with pytest.raises(DataError) as info:
        read_pairs(str(pairs))
    assert str(info.value) == f"{pairs} is UTF-16 text; save it as UTF-8"


def test_report_with_a_missing_or_unreadable_pairs_file_fails_before_the_work(
        tmp_path, capsys, monkeypatch) -> None:
    import flagsim.report as report_pkg

    run = _circle_run(tmp_path / "run")
    monkeypatch.setattr(report_pkg, "build_report", lambda *a, **k: pytest.fail("work started"))
    nope = tmp_path / "nope.csv"
    header_only = tmp_path / "header.csv"
    header_only.write_text("# labels\nquery,similar\n\n")
    for pairs, said in ((nope, f"labelled pairs file not found: {nope}"),
                        (tmp_path, f"labelled pairs file {tmp_path}: is a directory"),
                        (header_only, f"{header_only} holds no labelled pairs")):
        for command in ("report", "eval"):
            assert main([command, "--run", run, "--pairs", str(pairs)]) == 2
            assert capsys.readouterr().err == f"flagsim: error: {said}\n"


def test_a_pair_naming_the_same_image_twice_is_left_out_with_one_warning(tmp_path, caplog) -> None:
    run = _circle_run(tmp_path)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("query,similar\np0,p0\np3,P3\np0,p1\n")
    with caplog.at_level("WARNING", logger="flagsim.search.evaluate"):
        df = evaluate(run, str(pairs))
    assert df.set_index("model").loc["m", "pairs"] == 1
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"2 labelled pair(s) name the same image as query and as similar and were "
                      f"left out (first: {pairs}: line 2)"], warned
    pairs.write_text("query,similar\np0,p0\n")
    with pytest.raises(DataError) as info:
        evaluate(run, str(pairs))
    assert str(info.value) == (f"every labelled pair in {pairs} names the same image as query and "
                               f"as similar (first: line 2); a pair needs two different images")


def test_a_zero_vector_is_warned_about_once_per_shard_naming_it(tmp_path, capsys) -> None:
    """One `compare` normalised the same shard's rows four times and printed the same
    anonymous 'zero vector(s)' warning each time; now once, naming the shard."""
    import runs

    x = np.random.default_rng(5).normal(size=(12, 6)).astype(np.float32)
    x[4] = 0.0
    for model in ("a", "b"):
        runs.make_run(tmp_path, model, x)
    assert main(["compare", "--run", str(tmp_path), "Image img00001", "-k", "3"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "zero vector" in line]
    for model in ("a", "b"):
        shard = RunDir.at(str(tmp_path)).model_dir(model) / "part-00000.parquet"
        named = [w for w in warnings if f"1 zero vector(s) in {shard}:" in w]
        assert len(named) == 1, warnings
    assert len(warnings) == len(set(w.split(" WARNING ")[-1] for w in warnings)), warnings
