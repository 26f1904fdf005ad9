"""Op-specific tests of the conv_transpose2d kernel (the registry harness in tests/test_kernels.py
covers its cases, gradcheck, every autotune config and compilation): every activation, layouts,
output_padding past the stride, partial gradients, empty inputs, determinism, and dispatch through
gpudl.ops / gpudl.nn against F.conv_transpose2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, check_against_reference, leaf, on_backend

import gpudl
from gpudl import nn as gnn
from gpudl import ops, reference

CL = torch.channels_last


pytestmark = pytest.mark.usefixtures("on_test_device", "exact_fp32_convolutions")


def _reference_conv_transpose2d(x, w, b=None, activation=None, **kwargs):
    return reference.activation(F.conv_transpose2d(x, w, b, **kwargs), activation)


def _pair(x, w, b=None, activation=None, **kwargs):
    """ops.conv_transpose2d on the triton backend against F.conv_transpose2d and the activation,
    every operand requiring grad (helpers.check_against_reference); returns (out, ref, grads,
    ref_grads)."""
    operands = [None if t is None else leaf(t) for t in (x, w, b)]
    return check_against_reference(on_backend("triton", ops.conv_transpose2d), _reference_conv_transpose2d,
                                   *operands, activation=activation, **kwargs)


@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "tanh", "sigmoid", "gelu"])
def test_every_activation_through_ops(activation):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 5, 4), torch.randn(3, 4, 3, 3) / 3, torch.randn(4)
    y, r, got, want = _pair(x, w, b, activation, stride=2, padding=1, output_padding=1)
    assert "gpudl_conv_transpose2d" in type(y.grad_fn).__name__  # the Triton kernel ran


@pytest.mark.parametrize("kwargs", [
    dict(stride=(2, 3), padding=(0, 1), output_padding=(1, 2)),
    dict(stride=1, dilation=(3, 2), output_padding=(2, 1)),  # output_padding >= stride: dx is cut to x's size
    dict(stride=2, padding=1, groups=3, dilation=2),
    dict(stride=(1, 2), padding=(2, 0), groups=6),  # depthwise
])
def test_ragged_strides_groups_dilation(kwargs):
    torch.manual_seed(0)
    groups = kwargs.get("groups", 1)
    c_out_g = {1: 4, 3: 2, 6: 1}[groups]
    x, w, b = torch.randn(2, 6, 3, 5), torch.randn(6, c_out_g, 3, 2) / 3, torch.randn(c_out_g * groups)
    y, r, got, want = _pair(x, w, b, "relu", **kwargs)


@pytest.mark.parametrize("x_cl,w_cl", [(True, False), (False, True), (True, True)])
def test_channels_last_output_follows_input(x_cl, w_cl):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, 4, 3), torch.randn(5, 3, 3, 2) / 3, torch.randn(3)
    x = x.to(memory_format=CL) if x_cl else x
    w = w.to(memory_format=CL) if w_cl else w
    y, r, got, want = _pair(x, w, b, "tanh", stride=2, padding=(1, 0))
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
    assert y.stride() == r.stride()
    if x_cl:  # the input gradient keeps the input's layout
        assert got[0].is_contiguous(memory_format=CL)


def test_strided_views_and_expanded_output_gradient():
    """A sliced input and the stride-0 gradient that .sum() sends back."""
    torch.manual_seed(0)
    base = leaf(torch.randn(2, 8, 6, 9))
    ref_base = leaf(base)
    x = base[:, ::2, :, 1::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL)
    w = leaf(torch.randn(4, 3, 2, 2) / 2)
    rw = leaf(w)
    with gpudl.use_backend("triton"):
        y = ops.conv_transpose2d(x, w, stride=2, activation="sigmoid")
    r = torch.sigmoid(F.conv_transpose2d(ref_base[:, ::2, :, 1::2], rw, stride=2))
    assert_close("output", y, r, 1e-5, 1e-5)
    got = torch.autograd.grad(y.sum(), [base, w])
    want = torch.autograd.grad(r.sum(), [ref_base, rw])
    for name, g, wt in zip(("input", "weight"), got, want):
        assert_close(f"gradient of {name}", g, wt, 1e-5, 1e-5)


@pytest.mark.parametrize("which", ["input", "weight", "bias"])
def test_only_requested_gradients(which):
    torch.manual_seed(0)
    x, w, b = torch.randn(1, 4, 3, 3), torch.randn(4, 2, 3, 3) / 3, torch.randn(2)
    tensors = {"input": x, "weight": w, "bias": b}
    want_leaf = leaf(tensors[which])
    args = {k: (want_leaf if k == which else v) for k, v in tensors.items()}
    with gpudl.use_backend("triton"):
        y = ops.conv_transpose2d(args["input"], args["weight"], args["bias"], stride=2, activation="gelu")
    ref_leaf = leaf(tensors[which])
    ref_args = {k: (ref_leaf if k == which else v) for k, v in tensors.items()}
    r = F.gelu(F.conv_transpose2d(ref_args["input"], ref_args["weight"], ref_args["bias"], stride=2))
    gy = torch.randn_like(r)
    (g,) = torch.autograd.grad(y, [want_leaf], gy)
    (wt,) = torch.autograd.grad(r, [ref_leaf], gy)
    assert_close(f"gradient of {which}", g, wt, 1e-5, 1e-5)


def test_empty_batch_and_no_gradient_mode():
    torch.manual_seed(0)
    x, w, b = leaf(torch.randn(0, 3, 4, 4)), leaf(torch.randn(3, 2, 3, 3)), leaf(torch.randn(2))
    with gpudl.use_backend("triton"):
        y = ops.conv_transpose2d(x, w, b, stride=2)
    assert y.shape == (0, 2, 9, 9)
    gx, gw, gb = torch.autograd.grad(y.sum(), [x, w, b])
    assert gx.shape == x.shape and not gw.any() and not gb.any()
    with torch.no_grad(), gpudl.use_backend("triton"):
        x1 = torch.randn(1, 3, 4, 4)
        out = ops.conv_transpose2d(x1, w, b, stride=2, activation="gelu")
    assert_close("no-grad output", out, F.gelu(F.conv_transpose2d(x1, w, b, stride=2)), 1e-5, 1e-5)


def test_module_runs_the_kernel_and_matches_torch():
    torch.manual_seed(0)
    ours = gnn.ConvTranspose2d(4, 3, 4, stride=2, padding=1)
    theirs = torch.nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 3, 3)
    with gpudl.use_backend("triton"):
        y = ours(x)
    assert "gpudl_conv_transpose2d" in type(y.grad_fn).__name__
    r = theirs(x)
    assert_close("output", y, r, 1e-5, 1e-5)
    y.square().sum().backward()
    r.square().sum().backward()
    assert_close("weight gradient", ours.weight.grad, theirs.weight.grad, 1e-5, 1e-5)
    assert_close("bias gradient", ours.bias.grad, theirs.bias.grad, 1e-5, 1e-5)


def test_gradients_are_bit_identical_in_deterministic_mode():
    torch.manual_seed(0)
    x = leaf(torch.randn(2, 4, 5, 5))
    w = leaf(torch.randn(4, 3, 3, 3))
    b = leaf(torch.randn(3))
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        def grads():
            with gpudl.use_backend("triton"):
                y = ops.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1, activation="leaky_relu")
            return torch.autograd.grad(y.square().sum(), [x, w, b])

        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(before)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_nchw_operands():
    """NCHW operands (repacked channels innermost for the GEMMs): NCHW results, the reference's values."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 4, 3, 5), torch.randn(4, 3, 3, 3) / 3, torch.randn(6)
    y, r, got, want = _pair(x, w, b, "gelu", stride=2, padding=1, output_padding=1, groups=2)
    assert y.is_contiguous() and got[0].is_contiguous()
