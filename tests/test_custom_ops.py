"""Every kernel is a PyTorch op: `torch.library.opcheck` over each `torch.ops.gpudl` custom op.

Driven by the registry: each spec's first case runs through its Triton entry (forward and
backward) under a dispatch mode that records every gpudl custom op called and its arguments;
each recorded call is then opchecked (schema and mutations, fake tensor against the real kernel,
autograd registration, AOT dispatch with dynamic shapes). Variants: float32 contiguous with
gradients, float64 with every tensor re-laid out (transposed strides, channels_last for 4-D),
and float32 without gradients. A new kernel file gets all of it by registering its spec.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpudl.kernels import REGISTRY


def flatten(obj) -> list:
    """The tensors in a (nested) tuple/list, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for item in obj for t in flatten(item)] if isinstance(obj, (tuple, list)) else []


def map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(item, fn) for item in obj)
    return obj


class _RecordGpudlOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "gpudl":
            # A backward op runs with grad mode off (first-order backward): opcheck it that way,
            # on detached arguments, or its autograd test would try to differentiate it.
            if not torch.is_grad_enabled():
                args, kwargs = map_tensors(args, torch.Tensor.detach), {k: map_tensors(v, torch.Tensor.detach)
                                                                         for k, v in kwargs.items()}
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _relayout(t: torch.Tensor) -> torch.Tensor:
    """Same values, other strides: channels_last for 4-D tensors, the last two dims' strides
    swapped for other tensors of 2 or more dims."""
    if t.dim() == 4:
        out = t.detach().contiguous(memory_format=torch.channels_last)
    elif t.dim() >= 2:
        out = t.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        out = t.detach().clone()
    return out.requires_grad_(t.requires_grad)


VARIANTS = {
    "fp32-grad": (torch.float32, lambda t: t),
    "fp64-relayout-grad": (torch.float64, _relayout),
    "fp32-nograd": (torch.float32, lambda t: t.detach()),
}


def _recorded_calls(spec, dtype, transform, device):
    torch.manual_seed(0)
    args = map_tensors(spec.cases[0].make(dtype, device), transform)
    with _RecordGpudlOps() as recorder:
        outs = [o for o in flatten(spec.triton(*args)) if o.requires_grad]
        leaves = [t for t in flatten(args) if t.requires_grad]
        if outs and leaves:
            torch.autograd.grad(outs, leaves, [torch.randn_like(o) for o in outs], allow_unused=True)
    return recorder.calls


CASES = [(spec, variant) for spec in REGISTRY.values() for variant in VARIANTS]


@pytest.mark.parametrize("spec,variant", CASES, ids=[f"{s.op}-{v}" for s, v in CASES])
def test_opcheck_every_custom_op_the_kernel_calls(spec, variant, device):
    dtype, transform = VARIANTS[variant]
    calls = _recorded_calls(spec, dtype, transform, device)
    assert calls, f"{spec.op}: its Triton entry called no torch.ops.gpudl op"
    for func, args, kwargs in calls:
        torch.library.opcheck(func, args, kwargs)
