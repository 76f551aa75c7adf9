"""`flagsim embed` records each model's status and reason in `_meta/embed.json`; the report's header shows them."""

from __future__ import annotations

import json

from bs4 import BeautifulSoup

from flagsim.config import load_config
from flagsim.images import bundled_table, write_images_table
from flagsim.pipeline.embed import run_embed
from flagsim.report import build_report
from flagsim.rundir import RunDir


def test_skipped_models_reach_the_report_header(tmp_path, ray_local):
    run = tmp_path / "run"
    write_images_table(bundled_table().slice(0, 6), RunDir.at(run))
    cfg = load_config(None, ["ray.read_cpus=1", "embed.models=[vit,pixels]"])
    summary = run_embed(cfg, run_dir=str(run), show_progress=False)
    record = json.loads((run / "_meta" / "embed.json").read_text())
    assert record["images"] == 6
    assert [(r["model"], r["status"]) for r in record["results"]] == [("vit", "skipped"), ("pixels", "embedded")]
    assert record["results"][0]["reason"] == summary.result("vit").reason != ""

    paths = build_report(str(run), queries=["Albania"], k=2)
    soup = BeautifulSoup((run / "report.html").read_text(), "html.parser")
    assert paths.queries == ["Albania"]
    li = soup.select_one('ul[data-list="skipped"] li[data-model="vit"]')
    assert summary.result("vit").reason in li.get_text()
    assert [tr["data-model"] for tr in soup.select('table[data-meta="models"] tr[data-model]')] == ["pixels"]
