"""Backend selection: precedence, clear errors, 'auto' on the CPU using the reference, and 'auto'
on a GPU choosing the measured winner (here: a fake GPU and a fake clock)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import gpudl
from gpudl import backend, backend_choice, ops


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch, tmp_path):
    monkeypatch.delenv("GPUDL_BACKEND", raising=False)
    monkeypatch.setenv("GPUDL_CACHE_DIR", str(tmp_path / "cache"))
    backend.set_backend(None)
    backend.forget_decisions()
    backend.reset_record()
    yield
    backend.set_backend(None)
    backend.forget_decisions()
    backend.reset_record()


def test_precedence_context_over_process_over_environment(monkeypatch):
    assert backend.current_backend() == "auto"
    monkeypatch.setenv("GPUDL_BACKEND", "torch")
    assert backend.current_backend() == "torch"
    backend.set_backend("triton")
    assert backend.current_backend() == "triton"
    with gpudl.use_backend("torch"):
        assert backend.current_backend() == "torch"
        with gpudl.use_backend("auto"):
            assert backend.current_backend() == "auto"
        assert backend.current_backend() == "torch"
    assert backend.current_backend() == "triton"


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*auto, triton, torch"):
        gpudl.set_backend("cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        with gpudl.use_backend("tritn"):
            pass
    monkeypatch.setenv("GPUDL_BACKEND", "fast")
    with pytest.raises(ValueError, match="GPUDL_BACKEND: unknown backend 'fast'"):
        backend.current_backend()


def test_auto_on_cpu_runs_the_reference():
    x = torch.randn(4, 8)
    assert backend.resolve("linear", [x]) == "torch"
    w = torch.randn(3, 8)
    torch.testing.assert_close(ops.linear(x, w, activation="relu"), torch.relu(x @ w.T))


def test_forced_triton_on_unregistered_op_names_it():
    with gpudl.use_backend("triton"), pytest.raises(NotImplementedError, match="no_such_op"):
        backend.resolve("no_such_op", [torch.zeros(1)])


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error():
    # A fresh process without TRITON_INTERPRET: the kernels were imported compiled-for-GPU.
    code = (
        "import torch, gpudl\n"
        "from gpudl import ops\n"
        "from gpudl.kernels import REGISTRY\n"
        "op = sorted(REGISTRY)[0] if REGISTRY else None\n"
        "try:\n"
        "    with gpudl.use_backend('triton'):\n"
        "        gpudl.backend.resolve(op or 'linear', [torch.zeros(2)])\n"
        "except (RuntimeError, NotImplementedError) as e:\n"
        "    print('ERROR:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERROR:" in out.stdout, out.stderr[-2000:]
    if "needs CUDA tensors" not in out.stdout:  # only when no kernel is registered yet
        assert "no Triton kernel is registered" in out.stdout
    else:
        assert "TRITON_INTERPRET=1" in out.stdout and "cpu" in out.stdout


# --------------------------------------------------------------------------- on a CUDA machine
@pytest.mark.gpu
def test_auto_runs_the_kernels_on_cuda_tensors(launches):
    torch.manual_seed(0)
    x, w = torch.randn(4, 8, device="cuda"), torch.randn(3, 8, device="cuda")
    assert backend.resolve("linear", [x, w], (x, w, None, "relu"), ops._candidates("linear")) in ("triton", "torch")
    with gpudl.use_backend("triton"):
        y = ops.linear(x, w, activation="relu")
    assert "_matmul_kernel" in launches.kernels()
    torch.testing.assert_close(y, torch.relu(x.double() @ w.double().T).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_auto_keeps_cpu_tensors_on_the_reference_on_a_cuda_machine(launches):
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    assert backend.resolve("linear", [x, w]) == "torch"
    ops.linear(x, w, activation="relu")
    assert len(launches) == 0


# --------------------------------------------------------------------------- auto: the measured winner
class FakeClock:
    """A timer that runs each side once (so both really run) and reports `ms[side]`."""

    def __init__(self, triton_ms, torch_ms):
        self.ms = {"triton": triton_ms, "torch": torch_ms}
        self.timed = []

    def __call__(self, side, fn):
        fn()
        self.timed.append(side)
        return self.ms[side]


@pytest.fixture
def fake_gpu(monkeypatch):
    """'auto' decides as on a GPU named FakeGPU-A, timed by the clock the test installs; the
    kernels run on the CPU through the interpreter."""
    monkeypatch.setattr(backend, "_on_gpu", lambda tensors: True)
    name = {"device": "FakeGPU-A"}
    monkeypatch.setattr(backend, "_device_name", lambda device: name["device"])

    def install(triton_ms, torch_ms):
        clock = FakeClock(triton_ms, torch_ms)
        monkeypatch.setattr(backend, "_timer", clock)
        return clock

    install.name = name
    return install


def _linear_call(grad=True):
    torch.manual_seed(0)
    x = torch.randn(5, 8, requires_grad=grad)
    w = torch.randn(3, 8, requires_grad=grad)
    return x, w


def _cache_files(tmp_path):
    return sorted((tmp_path / "cache" / "backend").glob("*.json"))


@pytest.mark.parametrize("triton_ms, torch_ms, winner", [(1.0, 2.0, "triton"), (3.0, 2.0, "torch")])
def test_auto_runs_the_faster_side_and_caches_it(fake_gpu, tmp_path, launches, triton_ms, torch_ms, winner):
    clock = fake_gpu(triton_ms, torch_ms)
    x, w = _linear_call()
    y = ops.linear(x, w, activation="relu")
    assert clock.timed == ["triton", "torch"]
    torch.testing.assert_close(y, torch.relu(x @ w.T))
    y.sum().backward()  # the caller's tensors get one gradient, not the timing runs'
    torch.testing.assert_close(x.grad, ((x @ w.T) > 0).float() @ w)
    (path,) = _cache_files(tmp_path)
    data = json.loads(path.read_text())
    assert data["device"] == "FakeGPU-A" and data["versions"]["torch"] == torch.__version__
    (key, entry), = data["choices"].items()
    assert key.startswith("linear|float32[5x8]contiguous,grad|float32[3x8]contiguous,grad|None|'relu'")
    assert entry == {"backend": winner, "triton_ms": triton_ms, "torch_ms": torch_ms}
    # the same key again: no timing, the winner runs
    launches.records.clear()
    ops.linear(x, w, activation="relu")
    assert clock.timed == ["triton", "torch"]
    assert (len(launches) > 0) == (winner == "triton")
    rec = backend.report()
    assert rec["ops"] == {"linear": winner}
    assert rec["keys"][key] == {"op": "linear", "backend": winner, "reason": "measured",
                                "triton_ms": triton_ms, "torch_ms": torch_ms}


def test_a_new_key_is_measured_again(fake_gpu):
    clock = fake_gpu(1.0, 2.0)
    x, w = _linear_call()
    ops.linear(x, w)
    ops.linear(x[:4], w)  # another shape
    ops.linear(x, w, activation="gelu")  # another argument
    with torch.no_grad():
        ops.linear(x, w)  # no gradient needed: another key (timed forward only)
    assert clock.timed == ["triton", "torch"] * 4


def test_cache_is_reused_by_another_process(fake_gpu, tmp_path):
    fake_gpu(5.0, 1.0)  # torch wins
    x, w = _linear_call()
    ops.linear(x, w)
    code = (
        "import torch, gpudl\n"
        "from gpudl import backend, ops\n"
        "backend._on_gpu = lambda tensors: True\n"
        "backend._device_name = lambda device: 'FakeGPU-A'\n"
        "def timer(side, fn):\n"
        "    raise AssertionError('timed again')\n"
        "backend._timer = timer\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(5, 8, requires_grad=True); w = torch.randn(3, 8, requires_grad=True)\n"
        "ops.linear(x, w)\n"
        "print(backend.report()['ops'], list(backend.report()['keys'].values())[0]['reason'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "GPUDL_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "{'linear': 'torch'} cached"


def test_another_device_or_version_misses_the_cache(fake_gpu, tmp_path, monkeypatch):
    clock = fake_gpu(1.0, 2.0)
    x, w = _linear_call()
    ops.linear(x, w)
    backend.forget_decisions()
    fake_gpu.name["device"] = "FakeGPU-B"
    ops.linear(x, w)
    assert clock.timed == ["triton", "torch"] * 2
    assert len(_cache_files(tmp_path)) == 2
    backend.forget_decisions()
    fake_gpu.name["device"] = "FakeGPU-A"
    ops.linear(x, w)  # A's file again: cached
    assert len(clock.timed) == 4
    backend.forget_decisions()
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    ops.linear(x, w)  # another torch version: another file, measured again
    assert len(clock.timed) == 6
    assert len(_cache_files(tmp_path)) == 3


def test_a_file_of_another_device_under_the_name_is_not_trusted(fake_gpu, tmp_path):
    clock = fake_gpu(1.0, 2.0)
    x, w = _linear_call()
    path = backend_choice.cache_file("FakeGPU-A")
    path.parent.mkdir(parents=True)
    key = backend_choice.call_key("linear", (x, w, None, None))
    path.write_text(json.dumps({"device": "OtherGPU", "versions": backend_choice.versions(),
                                "choices": {key: {"backend": "torch"}}}))
    ops.linear(x, w)
    assert clock.timed == ["triton", "torch"]


def test_forced_backends_bypass_the_measurement(fake_gpu, tmp_path, launches):
    clock = fake_gpu(1.0, 2.0)
    x, w = _linear_call()
    with gpudl.use_backend("torch"):
        ops.linear(x, w)
    assert len(launches) == 0
    with gpudl.use_backend("triton"):
        ops.linear(x, w)
    assert len(launches) > 0
    assert clock.timed == [] and _cache_files(tmp_path) == []
    assert backend.report()["other_calls"] == {"linear: torch": "kernels.backend=torch",
                                               "linear: triton": "kernels.backend=triton"}


def test_compiling_and_deterministic_runs_read_the_cache_without_timing(fake_gpu):
    fake_gpu(1.0, 2.0)
    x, w = _linear_call()
    ops.linear(x, w)  # measured: triton
    backend.forget_decisions()

    def refuse(side, fn):
        raise AssertionError("timed while it must not")

    backend._timer = refuse
    torch.use_deterministic_algorithms(True)
    try:
        assert backend.resolve("linear", [x, w], (x, w, None, None), ops._candidates("linear")) == "triton"
        # a key never measured runs PyTorch
        assert backend.resolve("linear", [x, w], (x[:2], w, None, None), ops._candidates("linear")) == "torch"
    finally:
        torch.use_deterministic_algorithms(False)
    keys = backend.report()["keys"]
    assert sorted(e["reason"] for e in keys.values()) == [
        "measured", "not measured (compiling, capturing or deterministic)"]


def test_torch_compile_reads_the_cached_choice(fake_gpu, launches):
    fake_gpu(1.0, 2.0)
    x, w = _linear_call(grad=False)
    ops.linear(x, w)  # measured eagerly: triton
    backend.forget_decisions()

    def refuse(side, fn):
        raise AssertionError("timed while compiling")

    backend._timer = refuse
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: ops.linear(a, b), backend="aot_eager", fullgraph=True)
    launches.records.clear()
    torch.testing.assert_close(compiled(x, w), x @ w.T)
    assert len(launches) > 0
    torch._dynamo.reset()


def test_a_side_that_fails_while_timing_loses_with_a_warning(fake_gpu):
    clock = fake_gpu(1.0, 2.0)

    def broken(*args):
        raise RuntimeError("out of resources: shared memory\nmore detail")

    x, w = _linear_call()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ops._candidates("linear"), "triton", broken)
        with pytest.warns(UserWarning, match=r"could not time the triton side .*RuntimeError: out of resources"):
            y = ops.linear(x, w)
    torch.testing.assert_close(y, x @ w.T)
    assert clock.timed == []
    assert list(backend.report()["keys"].values())[0]["reason"] == "triton failed while timing"


def test_timing_leaves_inplace_arguments_and_the_rng_alone(fake_gpu):
    fake_gpu(2.0, 1.0)
    p = torch.ones(4)
    g = torch.full((4,), 0.5)
    torch.manual_seed(3)
    expected_next = torch.rand(1)
    torch.manual_seed(3)
    ops.sgd_step([p], [g], lr=0.1)  # timed twice on clones, then run once for real
    torch.testing.assert_close(p, torch.full((4,), 0.95))
    torch.testing.assert_close(torch.rand(1), expected_next)


def test_bad_cache_dir_value_is_one_line(fake_gpu, tmp_path, monkeypatch):
    fake_gpu(1.0, 2.0)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("GPUDL_CACHE_DIR", str(blocker))
    x, w = _linear_call()
    with pytest.warns(UserWarning, match="could not write the backend cache .*set GPUDL_CACHE_DIR"):
        ops.linear(x, w)


def test_auto_on_cpu_is_recorded_without_timing(monkeypatch):
    monkeypatch.setattr(backend, "_timer", lambda side, fn: pytest.fail("timed on the CPU"))
    x, w = _linear_call()
    ops.linear(x, w)
    assert backend.report()["ops"] == {"linear": "torch"}
    assert backend.report()["other_calls"] == {"linear: torch": "kernels.backend=auto"}


def test_clear_cache_removes_the_files(fake_gpu, tmp_path):
    fake_gpu(1.0, 2.0)
    x, w = _linear_call()
    ops.linear(x, w)
    assert _cache_files(tmp_path)
    backend_choice.clear_cache()
    assert _cache_files(tmp_path) == []


def test_the_choice_lands_in_metrics_json_and_the_wandb_summary(fake_gpu, tmp_path, monkeypatch):
    pytest.importorskip("omegaconf", reason="composes a training config")
    pytest.importorskip("wandb", reason="logs to W&B")
    from gpudl.train import train
    from gpudl.utils import compose

    fake_gpu(1.0, 2.0)  # triton wins every key
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    cfg = compose(["experiment=linreg_toy", "logger=wandb", "kernels.backend=auto", "trainer.max_epochs=1",
                   "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                   "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"], output_dir=out)
    from gpudl import tracking

    summaries, finish = [], tracking.finish_wandb

    def finish_and_keep_summary(failed):
        import wandb

        summaries.append(dict(wandb.run.summary))
        finish(failed)

    monkeypatch.setattr(tracking, "finish_wandb", finish_and_keep_summary)
    train(cfg)
    record = json.loads((out / "metrics.json").read_text())["kernel_backend"]
    assert record["setting"] == "auto"
    assert record["ops"]["linear"] == "triton" and record["ops"]["mse_loss"] == "triton"
    assert all(e["reason"] == "measured" and e["backend"] == "triton" for e in record["keys"].values())
    assert any(k.startswith("linear|") for k in record["keys"])
    (logged,) = summaries
    assert logged["kernels/backend"] == "auto" and logged["kernels/linear"] == "triton"


@pytest.mark.gpu
def test_auto_times_both_sides_on_a_real_gpu(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(256, 512, device="cuda", requires_grad=True)
    w = torch.randn(384, 512, device="cuda", requires_grad=True)
    y = ops.linear(x, w, activation="gelu")
    torch.testing.assert_close(y, torch.nn.functional.gelu(x @ w.T), atol=1e-2, rtol=1e-2)
    (entry,) = backend.report()["keys"].values()
    assert entry["reason"] == "measured" and entry["triton_ms"] > 0 and entry["torch_ms"] > 0
    assert entry["backend"] == ("triton" if entry["triton_ms"] < entry["torch_ms"] else "torch")
    assert _cache_files(tmp_path)


def test_a_corrupt_cache_file_is_one_warning_and_rewritten(fake_gpu, tmp_path):
    clock = fake_gpu(1.0, 2.0)
    path = backend_choice.cache_file("FakeGPU-A")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    x, w = _linear_call()
    with pytest.warns(UserWarning, match=r"ignoring the unreadable backend cache .*FakeGPU_A.*\.json \(Expecting"):
        ops.linear(x, w)
    assert clock.timed == ["triton", "torch"]
    assert json.loads(path.read_text())["choices"]
