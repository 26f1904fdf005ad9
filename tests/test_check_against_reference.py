"""The per-kernel test files' one comparison (helpers.check_against_reference) fails where it
must: a small error in one gradient element, a missing gradient, a wrong dtype; and its RMS-scaled
tolerance rejects the 4% error that a tolerance scaled by the largest element accepted (what
test_attention_kernel.py used before). Plain PyTorch functions stand in for kernels: no Triton."""

from __future__ import annotations

import pytest
import torch
from helpers import check_against_reference


class _Scaled(torch.autograd.Function):
    """y = x * w with the gradient of x wrong by `error` (relative) at flat index 0."""

    @staticmethod
    def forward(ctx, x, w, error):
        ctx.save_for_backward(x, w)
        ctx.error = error
        return x * w

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx = gy * w
        gx.view(-1)[0] *= 1 + ctx.error
        return gx, gy * x, None


def _reference(x, w):
    return x * w


def test_the_right_kernel_passes():
    x, w = torch.randn(8, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    pair = check_against_reference(lambda x, w: _Scaled.apply(x, w, 0.0), _reference, x, w)
    assert len(pair.grads) == 2 and x.grad is None  # the check works on its own leaves


def test_a_small_error_in_one_gradient_element_fails():
    x, w = torch.randn(8, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    with pytest.raises(AssertionError, match="gradient 0"):
        check_against_reference(lambda x, w: _Scaled.apply(x, w, 1e-3), _reference, x, w)


def test_a_missing_gradient_and_a_wrong_dtype_fail():
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    with pytest.raises(AssertionError, match="gradient 1: none against the reference's one"):
        check_against_reference(lambda x, w: x * w.detach(), _reference, x, w)
    with pytest.raises(AssertionError, match="dtype torch.float64"):
        check_against_reference(lambda x, w: (x * w).double(), _reference, x, w)


def test_one_large_element_does_not_loosen_the_others():
    """Gradient elements around 0.01 and one of 100 (a sum over many terms): a 4% error on a
    typical element fails here, while a tolerance scaled by the largest element (the attention
    test's old rule, 1e-5 x max(1, max|ref|)) accepted it."""
    scale = torch.full((64,), 0.01)
    scale[7] = 100.0
    x, w = torch.randn(64, requires_grad=True), torch.ones(64, requires_grad=True)
    ones = torch.ones(64)

    def kernel(x, w):
        return _Scaled.apply(x, w * scale, 0.04)

    def reference(x, w):
        return x * (w * scale)

    with pytest.raises(AssertionError, match="gradient 0"):
        check_against_reference(kernel, reference, x, w, grad=ones, atol=1e-5, rtol=1e-4)
    # The old rule on the same gradient of x (gy = 1, so it is w * scale, element 0 off by 4%):
    want = scale.clone()
    got = want.clone()
    got[0] *= 1.04
    torch.testing.assert_close(got, want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=1e-4)
