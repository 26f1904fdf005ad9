"""scripts/bench_models.py's CPU smoke mode: every experiment's training step runs in every variant
(the triton one on our kernels, through the interpreter), the first losses agree, and the report
files are written."""

import importlib.util
import json
from pathlib import Path

import pytest

from gpudl.kernels.registry import INTERPRET

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_models.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_models", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.skipif(not INTERPRET, reason="the smoke mode runs CPU tensors through the Triton interpreter")
def test_bench_models_smoke_runs_every_experiment(tmp_path, capsys, launches):
    bench = _load()
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in bench.EXPERIMENTS:
        for variant in bench.VARIANTS:
            assert f"smoke {name} {variant}: " in out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == len(bench.EXPERIMENTS) * len(bench.VARIANTS)
    assert all("error" not in r and r["loss_diff"] <= 1e-4 * max(1.0, r["first_loss"]) for r in rows)
    assert "| gpt | " in (tmp_path / "results.md").read_text()
    # The triton variants ran our kernels: attention, layer norm, the GEMM, convolution, the RNN.
    assert {"_attn_fwd", "_ln_fwd_kernel", "_matmul_kernel"} <= set(launches.kernels()), launches.kernels()
    assert {"gpudl.kernels.conv2d_triton", "gpudl.kernels.rnn_triton"} <= {r.module for r in launches.records}


def test_bench_models_imports_no_hydra_wandb_or_mlxtend():
    """The GPU machine lacks them: the script and what it imports must not need them."""
    import subprocess
    import sys

    code = ("import sys, runpy; runpy.run_path(sys.argv[1], run_name='bench'); "
            "bad = [m for m in ('hydra', 'omegaconf', 'wandb', 'mlxtend') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_gpu_configs_build_and_fit_their_batches():
    """The GPU-sized configs, checked here so a GPU run does not find a typo: every model builds,
    and a slice of its GPU batch (one sample; the GPT: 32 tokens) goes through a loss."""
    import torch

    import gpudl

    bench = _load()
    gen = torch.Generator().manual_seed(0)
    with gpudl.use_backend("torch"), torch.no_grad():
        for name, exp in bench.EXPERIMENTS.items():
            model = exp.build(False)
            batch = exp.batch(False, torch.device("cpu"), gen)
            assert exp.items(batch) == {"gpt": 16 * 1024, "dcgan": 128}.get(name, 512), name
            if name in ("gan", "dcgan"):
                real, z = batch
                assert model.generator(z[:2]).shape == real[:2].shape, name
                continue
            x, y = batch
            x, y = (x[:1, :32], y[:1, :32]) if name == "gpt" else (x[:1], y[:1])
            assert torch.isfinite(model.loss(model(x), y)), name
    assert sum(p.numel() for p in bench.EXPERIMENTS["gpt"].build(False).parameters()) > 80e6  # GPT-2 small's body


def test_bench_models_peak_memory_covers_the_timed_steps_only(monkeypatch):
    """The peak is reset after the first step and the warm-up steps (which autotune and compile)
    and read after the timed ones: a stand-in meter sees when it is started and read."""
    bench = _load()
    steps, log = [], []
    exp = bench.EXPERIMENTS["cnn"]

    def counted_step(*args):
        steps.append(len(steps))
        return exp.step(*args)

    class Meter:
        def start(self):
            log.append(("start", len(steps)))

        def peak_mib(self):
            log.append(("read", len(steps)))
            return 7.0

    monkeypatch.setitem(bench.EXPERIMENTS, "cnn", exp._replace(step=counted_step))
    import torch

    row = bench.run_variant("cnn", "torch", torch.device("cpu"), True, warmup=2, iters=3, compile_backend="aot_eager",
                            memory=Meter())
    assert "error" not in row, row
    assert log == [("start", 3), ("read", 6)]  # after the first step and 2 warm-up steps; after all 6
    assert row["peak_mem_mib"] == 7.0
