"""A small run of `python -m helpers.bench`: every stage runs in its own process and the table has all rows."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import REPO

ROWS = ("(a) bare channels_last inference", "(b) full analysis, every output", "(c) naive notebook pipeline",
        "(d) cached re-run of (b)")


def test_run_order_alternates_a_and_b_and_keep_fastest_keeps_every_run():
    from helpers.bench import keep_fastest, run_order
    assert run_order(["a", "b", "c", "d"], 3) == ["a", "b", "a", "b", "a", "b", "c", "d"]
    assert run_order(["a", "c"], 2) == ["a", "a", "c"] and run_order(["b", "d"], 0) == ["b", "d"]
    kept = None
    for seconds in (5.0, 3.0, 4.0):
        kept = keep_fastest(kept, {"seconds": seconds, "peak_rss_mb": 10 * seconds})
    assert kept["seconds"] == 3.0 and kept["peak_rss_mb"] == 30.0   # the fastest run, all of it
    assert kept["runs"] == [5.0, 3.0, 4.0] and kept["last_run"]["seconds"] == 4.0


def test_bench_smoke(tmp_path):
    work = tmp_path / "bench"
    cmd = [sys.executable, "-m", "helpers.bench", "--n", "60", "--archs", "resnet20", "--dataset", "cifar10",
           "--embedding", "tsne", "--out", str(work), "--repeat", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    number = r"(\d+(?:\.\d+)?)"
    for row in ROWS:   # time and peak RSS for each stage
        assert re.search(rf"^\| {re.escape(row)} \| {number} \| {number} \|$", out, re.M), (row, out)
    ratios = {k: float(v) for k, v in re.findall(rf"^\| ratio (b/a|c/b|d/b) \| {number}", out, re.M)}
    assert set(ratios) == {"b/a", "c/b", "d/b"}, out

    saved = json.loads((work / "bench_results.json").read_text())["results"]["resnet20"]
    assert set(saved) == {"a", "b", "c", "d"}
    sec = {k: v["seconds"] for k, v in saved.items()}
    assert abs(ratios["b/a"] - round(sec["b"] / sec["a"], 2)) < 0.011
    assert abs(ratios["c/b"] - round(sec["c"] / sec["b"], 2)) < 0.011
    assert abs(ratios["d/b"] - round(sec["d"] / sec["b"], 2)) < 0.011
    assert all(v["peak_rss_mb"] > 50 for v in saved.values())
    # --repeat 2: (a) and (b) ran twice and the table keeps the faster run; (c) and (d) ran once
    assert [len(saved[s]["runs"]) for s in "abcd"] == [2, 2, 1, 1]
    assert all(saved[s]["seconds"] == min(saved[s]["runs"]) for s in "abcd")
    assert "(a) and (b) fastest of 2" in out and "every run (s): (a) " in out
    # (b) wrote the analysis and its cache, (d) reused it; (c) did one GradCAM call per image and class.
    assert saved["b"]["cache_hit"] is False and saved["d"]["cache_hit"] is True
    assert saved["d"]["cams_computed"] == 0 and saved["b"]["files"] == saved["d"]["files"] > 20
    assert saved["c"]["gradcam_calls"] > 0 and saved["c"]["gradcam_calls"] % 2 == 0
    assert (work / "out_resnet20_analysis" / "analysis_summary.txt").is_file()
    assert len(list((work / "out_resnet20_naive" / "worst_predictions").glob("class_*.png"))) == 10
