"""The benchmark script's CPU smoke mode runs every registered kernel, so it cannot rot."""

import importlib.util
from pathlib import Path

import pytest

from gpudl.kernels.registry import INTERPRET

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"


@pytest.mark.skipif(not INTERPRET, reason="the smoke mode runs CPU tensors through the Triton interpreter; on a GPU "
                                          "scripts/gpu_check.sh runs the real benchmark")
def test_bench_smoke_runs_every_kernel(capsys, launches):
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for op in sorted(bench.REGISTRY):  # one op at a time: each must launch a Triton kernel of its own
        before = len(launches.records)
        assert bench.main(["--smoke", "--ops", op]) == 0
        assert len(launches.records) > before, f"the smoke run of {op} launched no Triton kernel"
    out = capsys.readouterr().out
    for op in bench.REGISTRY:
        assert f"smoke {op}" in out
    assert "MISMATCH" not in out


def test_bench_report_files_from_rows(tmp_path):
    """The GPU report writer (JSON, Markdown table, speedup plot), fed rows shaped like a GPU run's."""
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [
        {"op": "linear", "case": "M4096", "dtype": "bf16", "impl": "gpudl", "device": "TestGPU", "fwd_ms": 0.5,
         "fwd_bwd_ms": 1.6, "fwd_tflops": 275.0, "fwd_frac_peak_flops": 0.28, "fwd_speedup_vs_best": 0.9,
         "fwd_bwd_speedup_vs_best": 0.8, "peak_mem_mb": 96.0},
        {"op": "linear", "case": "M4096", "dtype": "bf16", "impl": "torch", "device": "TestGPU", "fwd_ms": 0.45},
        {"op": "linear", "case": "M4096", "dtype": "bf16", "impl": "torch.compile", "device": "TestGPU",
         "error": "RuntimeError: x"},
    ]
    bench._write_outputs(rows, tmp_path, "TestGPU")
    table = (tmp_path / "results.md").read_text()
    assert "| linear | M4096 | bf16 | gpudl | 0.500 | 1.600 | 275.0 |" in table and "error: RuntimeError: x" in table
    assert (tmp_path / "results.json").exists() and (tmp_path / "speedup.png").stat().st_size > 1000


class _FakeCudaMemory:
    """Stands in for torch.cuda's allocator statistics (MiB): allocations the fake op makes move
    them; every call is logged, so the test sees the order of warm-up, reset and read."""

    def __init__(self):
        self.allocated, self.peak, self.log = 100.0, 100.0, []

    def transient(self, mib):  # allocated and freed within the call
        self.peak = max(self.peak, self.allocated + mib)

    def synchronize(self):
        self.log.append("synchronize")

    def memory_allocated(self):
        return self.allocated * 2**20

    def reset_peak_memory_stats(self):
        self.log.append("reset")
        self.peak = self.allocated

    def max_memory_allocated(self):
        self.log.append("read")
        return self.peak * 2**20


def test_bench_peak_memory_is_read_after_the_autotuner_settled():
    """An autotuned op's first call benchmarks its configs (Triton's 256 MiB L2-flush buffer); its
    later calls need 12 MiB. The benchmark reports 12: it reads the peak on a call after a warm-up
    call (reading it around the first call reported 268)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    memory = _FakeCudaMemory()
    calls = []

    def autotuned_op(x):
        memory.log.append("call")
        if not calls:
            memory.transient(256.0)  # the autotuner's benchmarking, first call only
        calls.append(x)
        memory.transient(12.0)  # the op's own output and scratch

    assert bench.peak_memory_mib(autotuned_op, (1,), memory) == 12.0
    assert memory.log == ["call", "synchronize", "reset", "call", "synchronize", "read"]
