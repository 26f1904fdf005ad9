"""The benchmark script's CPU smoke mode runs every registered kernel, so it cannot rot."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"


def test_bench_smoke_runs_every_kernel(capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if torch.cuda.is_available():
        rows = bench.run_smoke(sorted(bench.REGISTRY))
    else:
        assert bench.main(["--smoke"]) == 0
        rows = None
    out = capsys.readouterr().out
    for op in bench.REGISTRY:
        assert f"smoke {op}" in out
    assert "MISMATCH" not in out
    assert rows is None or all(r["ok"] for r in rows)
