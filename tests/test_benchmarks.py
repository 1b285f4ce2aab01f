"""The benchmark runner end to end on a tiny suite (linreg, two methods, two seeds)."""

from __future__ import annotations

import json

import pytest

from benchmarks import run
from benchmarks.report import write_report
from benchmarks.stats import median_ci, ratio_ci


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run.main(["--suite", "smoke", "--out", str(out), "--no-peers", "--no-progress",
              "--methods", "fixed-16", "adabatch"])
    return out


def test_runner_writes_json_markdown_and_pngs_naming_every_method(smoke):
    results = json.loads((smoke / "results.json").read_text())
    report = (smoke / "report.md").read_text()
    assert {r["method"] for r in results["runs"]} == {"fixed-16", "adabatch"}
    assert {r["seed"] for r in results["runs"]} == {0, 1}
    assert not results["failures"]
    for method in ("fixed-16", "adabatch"):
        assert f"| {method}" in report
    for png in ("linreg_batch_noise.png", "linreg_metric.png"):
        assert (smoke / png).stat().st_size > 1000
        assert f"]({png})" in report
    assert "n=2" in report  # two seeds: medians without a bootstrap interval, said so
    assert "not installed" in report or "skipped" in report  # peers left out are named
    assert "ESTIMATED" in report  # the CPU-time energy estimate is labelled as such


def test_report_figures_come_from_the_json(smoke, tmp_path):
    results = json.loads((smoke / "results.json").read_text())
    for r in results["runs"]:
        if r["method"] == "fixed-16":
            r["final_metric"] = 123.456
    (tmp_path / "results.json").write_text(json.dumps(results))
    report = write_report(tmp_path / "results.json", tmp_path).read_text()
    assert "123.5 (n=2)" in report
    assert "123.5" not in (smoke / "report.md").read_text()


def test_linreg_adabatch_runs_record_the_exact_noise_scale(smoke):
    results = json.loads((smoke / "results.json").read_text())
    ada = [r for r in results["runs"] if r["method"] == "adabatch"]
    assert all(e["true_noise_scale"] > 0 for r in ada for e in r["evals"])
    assert "Noise-scale estimator against the exact" in (smoke / "report.md").read_text()


def test_bootstrap_intervals_need_three_values_and_bracket_the_median():
    assert median_ci([1.0, 2.0]).ci is None
    est = median_ci([1.0, 2.0, 3.0, 5.0])
    assert est.ci[0] <= est.median <= est.ci[1]
    assert ratio_ci([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]).median == pytest.approx(0.5)
