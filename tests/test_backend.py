"""Backend selection: precedence, clear errors, and 'auto' on the CPU using the reference."""

import os
import subprocess
import sys

import pytest
import torch

import gpudl
from gpudl import backend, ops


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    monkeypatch.delenv("GPUDL_BACKEND", raising=False)
    backend.set_backend(None)
    yield
    backend.set_backend(None)


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
    assert backend.resolve("linear", [x, w]) == "triton"
    y = ops.linear(x, w, activation="relu")
    assert "_matmul_kernel" in launches.kernels()
    torch.testing.assert_close(y, torch.relu(x.double() @ w.double().T).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_auto_keeps_cpu_tensors_on_the_reference_on_a_cuda_machine(launches):
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    assert backend.resolve("linear", [x, w]) == "torch"
    ops.linear(x, w, activation="relu")
    assert len(launches) == 0
