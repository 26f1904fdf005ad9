"""scripts/bench_loop.py in its smoke mode: both sides train the same number of steps and the
JSON and Markdown reports hold the timings and ratios."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # not gpudl.utils: that needs omegaconf, which a GPU machine lacks


def test_bench_loop_quick_writes_side_by_side_report(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_loop.py"), "--quick", "--same-model",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "loop.json").read_text())
    (row,) = report["rows"]
    assert row["experiment"] == "logreg_cancer" and row["epochs"] == 2
    plain = row["plain"]
    assert plain["steps"] == 2 * 13  # 399 training samples in batches of 32
    assert plain["fit_time_s"] > 0 and plain["whole_s"] > plain["fit_time_s"]
    table = (tmp_path / "loop.md").read_text()
    assert "| logreg_cancer | 2 | 26 |" in table
    if importlib.util.find_spec("hydra") is not None:
        gpudl = row["gpudl"]
        assert gpudl["steps"] == plain["steps"]
        assert gpudl["whole_s"] > gpudl["fit_time_s"] > 0
        assert row["fit_ratio"] == gpudl["fit_time_s"] / plain["fit_time_s"]
        assert 0.5 < gpudl["test_acc"] <= 1.0
        same = row["plain_gpudl_model"]  # the plain loop over gpudl's own model
        assert same["steps"] == plain["steps"] and row["loop_ratio"] == gpudl["fit_time_s"] / same["fit_time_s"]


def test_bench_loop_module_imports_no_hydra_or_torch():
    # The GPU machine has no Hydra: importing the script (and its --plain children) must not need it.
    code = ("import sys, runpy; runpy.run_path(sys.argv[1], run_name='bench'); "
            "print(sorted(m for m in ('hydra', 'omegaconf', 'lightning', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "scripts" / "bench_loop.py")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
