"""Registry-driven kernel tests: every registered KernelSpec, every case, against its reference.

Adding a kernel file that registers a KernelSpec adds its tests here without touching this file:
forward outputs and every input gradient against the PyTorch reference (through the Triton
interpreter on the CPU, compiled on a GPU, where float16/bfloat16 are added), a float64
gradcheck, and ahead-of-time compilation of every variant for sm_80 and sm_90.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gpudl.kernels import REGISTRY

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if HAS_CUDA else [])

CASES = [(spec, case) for spec in REGISTRY.values() for case in spec.cases]


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _flatten(item)] if isinstance(out, (tuple, list)) else []


def _clone_args(args, dtype=None):
    """Independent leaf copies (optionally cast), keeping which tensors require grad; recurses
    into lists and tuples so in-place kernels cannot touch the reference's inputs."""

    def clone(a):
        if isinstance(a, torch.Tensor):
            c = a.detach().clone()
            if dtype is not None and c.is_floating_point():
                c = c.to(dtype)
            return c.requires_grad_(a.requires_grad)
        if isinstance(a, (list, tuple)):
            return type(a)(clone(item) for item in a)
        return a

    return tuple(clone(a) for a in args)


def _grad_inputs(args) -> list[int]:
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("spec,case", CASES, ids=[f"{s.op}-{c.name}" for s, c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_reference(spec, case, dtype, device):
    atol, rtol = spec.tolerances[dtype]
    torch.manual_seed(0)
    args = case.make(dtype, device)
    kernel_args = _clone_args(args)
    # Half-precision kernels are judged against the reference computed in float32.
    ref_args = _clone_args(args, torch.float32 if dtype in (torch.float16, torch.bfloat16) else None)

    outs = _flatten(spec.triton(*kernel_args))
    refs = _flatten(spec.reference(*ref_args))
    assert len(outs) == len(refs), f"{len(outs)} outputs, reference has {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert not o.is_floating_point() or o.dtype == dtype, f"output {i} has dtype {o.dtype}, expected {dtype}"
        _assert_close(f"output {i}", o, r, atol, rtol)

    grad_idx = _grad_inputs(args)
    if not spec.differentiable or not grad_idx:
        return
    pairs = [(o, r) for o, r in zip(outs, refs) if r.requires_grad]
    grads_out = [torch.randn_like(r) for _, r in pairs]
    got = torch.autograd.grad([o for o, _ in pairs], [kernel_args[i] for i in grad_idx],
                              [g.to(o.dtype) for g, (o, _) in zip(grads_out, pairs)], allow_unused=True)
    want = torch.autograd.grad([r for _, r in pairs], [ref_args[i] for i in grad_idx], grads_out, allow_unused=True)
    for i, g, w in zip(grad_idx, got, want):
        assert (g is None) == (w is None), f"gradient of argument {i}: kernel gives {g is None and 'none'}, reference {w is None and 'none'}"
        if w is not None:
            # Gradients sum over many terms: scale atol with the gradient's magnitude.
            _assert_close(f"gradient of argument {i}", g, w, atol * max(1.0, w.abs().max().item()), rtol)


def test_kernel_skips_grads_not_required(device):
    """Inputs that do not require grad get no gradient computed (checked on every spec's first case)."""
    for spec in REGISTRY.values():
        if not spec.differentiable or not spec.cases:
            continue
        torch.manual_seed(0)
        args = spec.cases[0].make(torch.float32, device)
        grad_idx = _grad_inputs(args)
        if len(grad_idx) < 2:
            continue
        frozen = _clone_args(args)
        keep = grad_idx[0]
        frozen = tuple(a.detach() if isinstance(a, torch.Tensor) and i != keep else a for i, a in enumerate(frozen))
        outs = [o for o in _flatten(spec.triton(*frozen)) if o.requires_grad]
        (g,) = torch.autograd.grad(outs, [frozen[keep]], [torch.ones_like(o) for o in outs])
        assert g is not None and g.shape == frozen[keep].shape, spec.op


GRADCHECK_SPECS = [s for s in REGISTRY.values() if s.differentiable and s.gradcheck_case is not None]


@pytest.mark.parametrize("spec", GRADCHECK_SPECS, ids=[s.op for s in GRADCHECK_SPECS])
def test_kernel_gradcheck_float64(spec, device):
    torch.manual_seed(0)
    args = spec.gradcheck_case.make(torch.float64, device)
    grad_idx = _grad_inputs(args)

    def fn(*tensors):
        full = list(args)
        for i, t in zip(grad_idx, tensors):
            full[i] = t
        return tuple(_flatten(spec.triton(*full)))

    assert torch.autograd.gradcheck(fn, tuple(args[i] for i in grad_idx), fast_mode=True, atol=1e-5, rtol=1e-4)


def test_every_spec_is_complete():
    for spec in REGISTRY.values():
        assert spec.cases, f"{spec.op}: no test cases"
        assert torch.float32 in spec.tolerances, f"{spec.op}: no float32 tolerance"
        assert {torch.float16, torch.bfloat16} <= set(spec.tolerances), f"{spec.op}: no half-precision tolerances"
        assert spec.bench_cases, f"{spec.op}: no benchmark cases"
        assert spec.bytes_moved is not None, f"{spec.op}: no byte model for the benchmark"
        import gpudl.ops

        assert hasattr(gpudl.ops, spec.op), f"{spec.op}: no gpudl.ops function of that name"


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90():
    """Every CompileVariant of every spec, built for real GPUs (one subprocess, all cores)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "gpudl.kernels.compile_check"],
                          capture_output=True, text=True, env=env, timeout=1200)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records, f"no compile records; stderr:\n{proc.stderr[-3000:]}"
    assert {r["op"] for r in records} == set(REGISTRY), "some registered op was not compiled"
    failures = [r for r in records if not r["ok"]]
    assert not failures, "\n".join(f"{r['op']} {r.get('variant')} {r.get('arch')}: {r['error']}" for r in failures)
    assert proc.returncode == 0, proc.stderr[-3000:]
