"""Deterministic mode: no kernel is silently nondeterministic.

No kernel uses atomic adds (every reduction is a per-program partial followed by a fixed-order
sum, and max_pool2d's backward gathers), so under `torch.use_deterministic_algorithms(True)`
every op runs its usual path and gives bit-identical results run after run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gpudl
from gpudl import kernels, ops


def test_no_kernel_uses_atomics():
    sources = {p.name: p.read_text() for p in Path(kernels.__file__).parent.glob("*.py")}
    offenders = [name for name, text in sources.items() if "tl.atomic_" in text]
    assert not offenders, (
        f"atomic adds make results order-dependent; deterministic mode needs another path in {offenders}"
    )


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_backward_of_overlapping_pools_and_convs_is_bit_identical(deterministic, device):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)

    def grads():
        with gpudl.use_backend("triton"):
            y = ops.max_pool2d(ops.conv2d(x, w, padding=1, activation="relu"), 3, stride=1, padding=1)
        return torch.autograd.grad(y.square().sum(), [x, w])

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
