"""Transposed 2-D convolution (+ bias + activation) on the conv2d kernels, forward and backward.

Shapes (the normalized arguments of gpudl.reference.conv_transpose2d):
    input  x [N, C_in, H, W]              any strides
    weight w [C_in, C_out / groups, kH, kW]
    bias   b [C_out] or None
    output y [N, C_out, H_out, W_out]     H_out = (H - 1) * sH - 2 * pH + dH * (kH - 1) + opH + 1
                                          channels_last when x or w is (as F.conv_transpose2d does)

A transposed convolution is the input gradient of the convolution whose weight is w read as
[C_out_conv = C_in, C_in_g_conv = C_out / groups, kH, kW], with the same stride, padding, dilation
and groups. So every launch here is one of the convolution kernels (conv2d_triton.py; this op has none
of its own):
    forward  y  = act(dgrad(x, w) + b)           the dgrad kernel with its bias/activation epilogue
    backward dz = dy * act'(saved)               one elementwise pass (skipped without activation)
             dx = conv2d_fwd(dz, w)              the convolution itself, output cut to x's size
             dw = wgrad(grad_out=x, input=dz)    conv2d's weight gradient, roles as in the forward
             db = sum over (n, h, w) of dz       the bias-gradient reduction
No atomics: the reductions are per-program partials summed in a fixed order.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from gpudl.kernels import conv2d as _conv
from gpudl.kernels._common import activation_constexpr
from gpudl.kernels.conv2d_triton import (  # noqa: F401  (the autotuned kernels this op launches, found here by the tests)
    MAX_GRID_Z,
    _conv2d_dgrad_kernel,
    _conv2d_fwd_kernel,
    _conv2d_wgrad_kernel,
)
from gpudl.kernels.registry import first_order_only, kernel_op, no_tensor


# --------------------------------------------------------------------------- host launchers
def _out_size(size, stride, padding, output_padding, dilation, kernel):
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def _output_shape(x_shape, w_shape, stride, padding, output_padding, groups, dilation):
    n, _, h, wd = x_shape
    _, c_out_g, kh, kw = w_shape
    return (n, c_out_g * groups, _out_size(h, stride[0], padding[0], output_padding[0], dilation[0], kh),
            _out_size(wd, stride[1], padding[1], output_padding[1], dilation[1], kw))


def _output_format(x, w):
    return torch.channels_last if _conv._is_channels_last(x) or _conv._is_channels_last(w) else torch.contiguous_format


def _pad4(padding):
    # The conv2d launchers take (top, bottom, left, right) and read top and left only.
    return (padding[0], padding[0], padding[1], padding[1])


def _forward(x, w, b, stride, padding, output_padding, groups, dilation, act, store_z):
    shape = _output_shape(x.shape, w.shape, stride, padding, output_padding, groups, dilation)
    y = torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=_output_format(x, w))
    z = torch.empty_like(y) if store_z else None
    if y.numel() == 0:
        return y, z
    # The dgrad kernel reads x as the convolution's output gradient: every output element is
    # written, taps that miss x contribute zero; bias and activation are its epilogue.
    _conv._conv2d_dgrad(x, w, y, stride, _pad4(padding), dilation, groups, bias=b, act=act, z=z)
    return y, z


def _backward(gy, x, w, saved, x_shape, x_strides, w_shape, stride, padding, dilation, groups, act,
              need_x, need_w, need_b):
    """(dx with x's strides, dw, db); None for those not asked for."""
    like = dict(dtype=gy.dtype, device=gy.device)
    dx = dw = db = None
    if gy.numel() == 0:  # empty batch or no output channels: every gradient is zero
        dx = torch.empty_strided(x_shape, x_strides, **like).zero_() if need_x else None
        dw = torch.zeros(w_shape, **like) if need_w else None
        db = torch.zeros(gy.shape[1], **like) if need_b else None
        return dx, dw, db
    pad4 = _pad4(padding)
    gz = _conv.channels_inner(_conv.activation_grad(gy, saved, act))  # once per element, before the GEMMs
    # dw and db first, as in conv2d's backward: their fp32 partial sums are gone before dx exists.
    if need_w:
        if math.prod(w_shape) == 0 or x.numel() == 0:
            dw = torch.zeros(w_shape, **like)
        else:
            # conv2d's weight gradient with the roles of its forward: x is the output gradient, gz the input.
            dw = _conv._conv2d_wgrad(x, gz, w_shape, stride, pad4, dilation, groups)
    if need_b:
        db = _conv._bias_grad(gz)
    if need_x:
        dx = torch.empty_strided(x_shape, x_strides, **like)
        if dx.numel() == 0:
            dx.zero_()
        else:
            # The convolution of gz, its output cut to x's size (rows past it would need
            # output_padding >= stride, which dilation allows; the kernel writes only dx's rows).
            _conv._conv2d_fwd_launch(gz, w, None, dx, None, stride, pad4, dilation, groups, "none")
    return dx, dw, db


# --------------------------------------------------------------------------- custom ops
@kernel_op("conv_transpose2d")
def _conv_transpose2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                         padding: list[int], output_padding: list[int], groups: int, dilation: list[int],
                         activation: Optional[str], store_pre: bool) -> tuple[Tensor, Tensor]:
    """(y [N, C_out, H_out, W_out], the pre-activation z (same layout) when store_pre, else empty)."""
    y, z = _forward(input, weight, bias, stride, padding, output_padding, groups, dilation,
                    activation_constexpr(activation), store_pre)
    return y, (z if z is not None else no_tensor(y))


@_conv_transpose2d_op.register_fake
def _(input, weight, bias, stride, padding, output_padding, groups, dilation, activation, store_pre):
    shape = _output_shape(input.shape, weight.shape, stride, padding, output_padding, groups, dilation)
    y = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=_output_format(input, weight))
    return y, (torch.empty_like(y) if store_pre else y.new_empty(0))


def _setup(ctx, inputs, output):
    x, w, _, stride, padding, _, groups, dilation, activation, store_pre = inputs
    _conv.save_for_backward(ctx, x, w, output, stride, padding, dilation, groups, activation, store_pre)


def _backward_autograd(ctx, grad_output, _grad_pre):
    x, w, saved = ctx.saved_tensors
    if grad_output is None:
        return (None,) * 10
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.gpudl.conv_transpose2d_backward(grad_output, x, w, saved, *ctx.conf, need_x, need_w, need_b)
    return (dx if need_x else None), (dw if need_w else None), (db if need_b else None), *(None,) * 7


_conv_transpose2d_op.register_autograd(_backward_autograd, setup_context=_setup)


@kernel_op("conv_transpose2d_backward")
def _conv_transpose2d_backward_op(grad_output: Tensor, input: Optional[Tensor], weight: Optional[Tensor],
                                  saved: Optional[Tensor], input_shape: list[int], input_strides: list[int],
                                  weight_shape: list[int], stride: list[int], padding: list[int],
                                  dilation: list[int], groups: int, activation: Optional[str], need_input: bool,
                                  need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dinput, dweight, dbias); each an empty tensor when not asked for."""
    act = activation_constexpr(activation)
    dx, dw, db = _backward(grad_output, input, weight, saved, input_shape, input_strides, weight_shape, stride,
                           padding, dilation, groups, act, need_input, need_weight, need_bias)
    return tuple(t if t is not None else no_tensor(grad_output) for t in (dx, dw, db))


first_order_only(_conv_transpose2d_backward_op)


@_conv_transpose2d_backward_op.register_fake
def _(grad_output, input, weight, saved, input_shape, input_strides, weight_shape, stride, padding, dilation, groups,
      activation, need_input, need_weight, need_bias):
    like = dict(dtype=grad_output.dtype, device=grad_output.device)
    return (torch.empty_strided(input_shape, input_strides, **like) if need_input else grad_output.new_empty(0),
            torch.empty(weight_shape, **like) if need_weight else grad_output.new_empty(0),
            torch.empty(grad_output.shape[1], **like) if need_bias else grad_output.new_empty(0))


def unsupported(input, weight, bias, stride, padding, output_padding, groups, dilation, activation_name):
    if groups * stride[0] * stride[1] > MAX_GRID_Z:
        return (f"groups x stride_h x stride_w = {groups * stride[0] * stride[1]} > {MAX_GRID_Z} (the CUDA grid "
                "limit of the axis holding the group and the forward's phase)")
    return None


def conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation, activation_name):
    """F.conv_transpose2d followed by an activation, in Triton.

    input [N, C_in, H, W]; weight [C_in, C_out / groups, kH, kW]; bias [C_out] or None;
    stride, padding, output_padding, dilation pairs; groups an int;
    activation_name None, 'relu', 'leaky_relu', 'tanh', 'sigmoid' or 'gelu'.
    Returns y [N, C_out, H_out, W_out], channels_last when input or weight is channels_last.
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    store_pre = needs_grad and activation_name == "gelu"
    return torch.ops.gpudl.conv_transpose2d(input, weight, bias, list(stride), list(padding), list(output_padding),
                                            int(groups), list(dilation), activation_name, store_pre)[0]
