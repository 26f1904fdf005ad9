"""conv2d's op layer: host launchers, the `gpudl::conv2d` custom ops (forward and backward), their
fake implementations and autograd, and the entry `gpudl.ops.conv2d` calls. The kernels and the
algorithm are in conv2d_triton.py; the registry data in conv2d_spec.py.

Shapes (the normalized arguments of gpudl.reference.conv2d):
    input  x [N, C_in, H, W]              any strides: NCHW, channels_last or a strided view
    weight w [C_out, C_in / groups, kH, kW]
    bias   b [C_out] or None
    output y [N, C_out, H_out, W_out]     H_out = (H + top + bottom - dH * (kH - 1) - 1) // sH + 1
                                          channels_last when x or w is (as F.conv2d does)
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import acc_dtype, activation_constexpr
from gpudl.kernels.conv2d_triton import (  # noqa: F401  (the autotuned kernels, found here by the tests)
    _MAX_GRID_Z,
    _conv2d_dgrad_kernel,
    _conv2d_fwd_kernel,
    _conv2d_wgrad_kernel,
)
from gpudl.kernels.registry import first_order_only, kernel_op, no_tensor


# --------------------------------------------------------------------------- host launchers
def _out_size(size: int, pad_lo: int, pad_hi: int, dilation: int, kernel: int, stride: int) -> int:
    return (size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def _is_channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows F.conv2d's policy: TF32 tensor cores while torch.backends.cudnn.allow_tf32
    # (on by default) says so, exact fp32 products otherwise.
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _wgrad_splits(m: int, tiles: int, groups: int, device: torch.device) -> int:
    """How many programs share the wgrad reduction over m: enough tiles to fill the GPU twice
    over, each split still at least 512 rows long. One under the interpreter."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    want = triton.cdiv(2 * _sm_count(index), max(tiles, 1))
    return max(1, min(want, triton.cdiv(m, 512), _MAX_GRID_Z // groups))


# The kernels are launched on channels-innermost (channels_last) tensors: the K loop then walks
# contiguous memory, so on a GPU tiles load as vectors through asynchronous copies into shared
# memory. An NCHW operand is repacked once per call (a copy, as cuDNN's NCHW paths transpose too),
# the same way through the interpreter, so the tests run the launches a GPU runs. The kernels
# themselves read any strides (tests/test_conv2d_kernel.py checks them with this switched off).
_REPACK = True


def _channels_inner(t):
    if t is None or not _REPACK or t.shape[1] <= 1 or t.stride(1) == 1:
        return t
    return t.contiguous(memory_format=torch.channels_last)


def _channels_inner_out(t):
    """The buffer a kernel writes for output t: t itself, or (when t is not channels innermost) a
    channels_last scratch that _copy_back then copies into t. Written with scattered
    scalar stores, an NCHW tile's addresses spill registers; channels innermost, they are vectors."""
    if t is None or not _REPACK or t.shape[1] <= 1 or t.stride(1) == 1:
        return t
    return torch.empty_like(t, memory_format=torch.channels_last)


def _copy_back(out, buffer):
    if buffer is not out:
        out.copy_(buffer)


def _conv2d_forward(x, w, b, stride, padding, dilation, groups, act, store_z):
    """x [N, C_in, H, W], w [C_out, C_in_g, kH, kW] -> y [N, C_out, H_out, W_out] (and z, the
    pre-activation, same shape and strides, when store_z)."""
    n, _, h, wd = x.shape
    c_out, c_in_g, kh, kw = w.shape
    h_out = _out_size(h, padding[0], padding[1], dilation[0], kh, stride[0])
    w_out = _out_size(wd, padding[2], padding[3], dilation[1], kw, stride[1])
    fmt = torch.channels_last if _is_channels_last(x) or _is_channels_last(w) else torch.contiguous_format
    y = torch.empty((n, c_out, h_out, w_out), device=x.device, dtype=x.dtype, memory_format=fmt)
    z = torch.empty_like(y) if store_z else None
    if y.numel() == 0:
        return y, z
    _conv2d_fwd_launch(x, w, b, y, z, stride, padding, dilation, groups, act)
    return y, z


def _conv2d_fwd_launch(x, w, b, y, z, stride, padding, dilation, groups, act):
    """Writes y (and z when not None) [N, C_out, H_out, W_out]; the output size is y's, so that a
    transposed convolution's input gradient can ask for exactly its input's size."""
    x, w = _channels_inner(x), _channels_inner(w)
    n, _, h, wd = x.shape
    c_out, c_in_g, kh, kw = w.shape
    h_out, w_out = y.shape[2], y.shape[3]
    c_out_g = c_out // groups
    m = n * h_out * w_out
    y_buf, z_buf = _channels_inner_out(y), _channels_inner_out(z)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c_out_g, meta["BLOCK_N"]), groups)  # noqa: E731
    wrap_triton(_conv2d_fwd_kernel)[grid](
        x, w, b if b is not None else w, y_buf, z_buf if z is not None else y_buf,
        c_in_g, h, wd, c_out_g, h_out, w_out, m, c_in_g * kh * kw,
        *x.stride(), *w.stride(), *y_buf.stride(),
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        KH=kh, KW=kw, HAS_BIAS=b is not None, ACTIVATION=act, STORE_Z=z is not None,
        INPUT_PRECISION=_input_precision(x.dtype),
    )
    _copy_back(y, y_buf)
    _copy_back(z, z_buf)


def _conv2d_dgrad(gy, saved, w, dx, stride, padding, dilation, groups, act, bias=None, out_act="none", z=None):
    """Writes every element of dx [N, C_in, H, W] from gy [N, C_out, H_out, W_out] (and the saved y or z).
    bias, out_act and z are the epilogue of a transposed convolution (dx = act(dgrad + bias), z the
    pre-activation): conv_transpose2d's forward is this kernel."""
    gy, saved, w = _channels_inner(gy), _channels_inner(saved), _channels_inner(w)
    n, _, h, wd = dx.shape
    c_out, c_in_g, kh, kw = w.shape
    c_out_g = c_out // groups
    m_in = n * h * wd
    s = saved if saved is not None else gy
    dx_buf, z_buf = _channels_inner_out(dx), _channels_inner_out(z)
    grid = lambda meta: (triton.cdiv(m_in, meta["BLOCK_M"]), triton.cdiv(c_in_g, meta["BLOCK_N"]), groups)  # noqa: E731
    wrap_triton(_conv2d_dgrad_kernel)[grid](
        gy, s, w, dx_buf, bias if bias is not None else w, z_buf if z is not None else dx_buf,
        c_in_g, h, wd, c_out_g, gy.shape[2], gy.shape[3], m_in, c_out_g * kh * kw,
        *gy.stride(), *s.stride(), *w.stride(), *dx_buf.stride(),
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        KH=kh, KW=kw, ACTIVATION=act, INPUT_PRECISION=_input_precision(w.dtype),
        HAS_BIAS=bias is not None, OUT_ACTIVATION=out_act, STORE_Z=z is not None,
    )
    _copy_back(dx, dx_buf)
    _copy_back(z, z_buf)
    return dx


def _conv2d_wgrad(gy, saved, x, w_shape, stride, padding, dilation, groups, act, need_w, need_b):
    """dw [C_out, C_in_g, kH, kW] (if need_w) and db [C_out] (if need_b), in x's dtype."""
    gy, saved = _channels_inner(gy), _channels_inner(saved)
    if need_w:
        x = _channels_inner(x)
    n, _, h, wd = x.shape
    c_out, c_in_g, kh, kw = w_shape
    c_out_g = c_out // groups
    h_out, w_out = gy.shape[2], gy.shape[3]
    m = n * h_out * w_out
    k_total = c_in_g * kh * kw
    tiles = (kh * kw * triton.cdiv(c_in_g, 64) if need_w else 1) * triton.cdiv(c_out_g, 64) * groups
    splits = _wgrad_splits(m, tiles, groups, x.device)
    m_per_split = triton.cdiv(m, splits)
    splits = triton.cdiv(m, m_per_split)  # no empty split
    part = dict(device=x.device, dtype=acc_dtype(x.dtype))
    dw_part = torch.empty((splits, c_out, c_in_g, kh, kw), **part) if need_w else None
    db_part = torch.empty((splits, c_out), **part) if need_b else None
    s = saved if saved is not None else gy
    k_programs = (lambda meta: kh * kw * triton.cdiv(c_in_g, meta["BLOCK_K"])) if need_w else (lambda meta: 1)
    grid = lambda meta: (k_programs(meta), triton.cdiv(c_out_g, meta["BLOCK_N"]), groups * splits)  # noqa: E731
    wrap_triton(_conv2d_wgrad_kernel)[grid](
        gy, s, x, dw_part if need_w else s, db_part if need_b else s,
        c_in_g, h, wd, c_out_g, h_out, w_out, m, k_total, c_out, groups, m_per_split,
        *gy.stride(), *s.stride(), *x.stride(),
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        KH=kh, KW=kw, ACTIVATION=act, COMPUTE_W=need_w, COMPUTE_B=need_b,
        INPUT_PRECISION=_input_precision(x.dtype),
    )
    dw = dw_part.sum(0).to(x.dtype) if need_w else None
    db = db_part.sum(0).to(x.dtype) if need_b else None
    return dw, db


def _conv2d_backward(gy, x, w, saved, x_shape, x_strides, w_shape, stride, padding, dilation, groups, act,
                     need_x, need_w, need_b):
    """(dx with x's strides, dw, db); None for those not asked for."""
    dx = dw = db = None
    if gy.numel() == 0:  # empty batch or no output channels: every gradient is zero
        dtype, device = gy.dtype, gy.device
        dx = torch.empty_strided(x_shape, x_strides, dtype=dtype, device=device).zero_() if need_x else None
        dw = torch.zeros(w_shape, dtype=dtype, device=device) if need_w else None
        db = torch.zeros(w_shape[0], dtype=dtype, device=device) if need_b else None
        return dx, dw, db
    gy, saved = _channels_inner(gy), _channels_inner(saved)  # once, for both launches
    if need_x:
        dx = torch.empty_strided(x_shape, x_strides, dtype=gy.dtype, device=gy.device)
        if dx.numel() == 0:
            dx.zero_()
        else:
            _conv2d_dgrad(gy, saved, w, dx, stride, padding, dilation, groups, act)
    if need_w or need_b:
        dw, db = _conv2d_wgrad(gy, saved, x if need_w else _stand_in(x_shape, gy), w_shape, stride, padding,
                               dilation, groups, act, need_w, need_b)
    return dx, dw, db


def _stand_in(x_shape, like):
    """A tensor with x's shape that is never read (only the bias gradient is computed)."""
    return like.new_empty((1, 1, 1, 1)).expand(x_shape)


# --------------------------------------------------------------------------- custom ops
def _output_shape(x_shape, w_shape, stride, padding, dilation):
    n, _, h, wd = x_shape
    c_out, _, kh, kw = w_shape
    return (n, c_out, _out_size(h, padding[0], padding[1], dilation[0], kh, stride[0]),
            _out_size(wd, padding[2], padding[3], dilation[1], kw, stride[1]))


@kernel_op("conv2d")
def _conv2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
               dilation: list[int], groups: int, activation: Optional[str], store_pre: bool) -> tuple[Tensor, Tensor]:
    """(y [N, C_out, H_out, W_out], the pre-activation z (same layout) when store_pre, else empty)."""
    y, z = _conv2d_forward(input, weight, bias, stride, padding, dilation, groups, activation_constexpr(activation),
                           store_pre)
    return y, (z if z is not None else no_tensor(y))


@_conv2d_op.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, activation, store_pre):
    fmt = torch.channels_last if _is_channels_last(input) or _is_channels_last(weight) else torch.contiguous_format
    y = torch.empty(_output_shape(input.shape, weight.shape, stride, padding, dilation), dtype=input.dtype,
                    device=input.device, memory_format=fmt)
    return y, (torch.empty_like(y) if store_pre else y.new_empty(0))


def _setup_conv2d(ctx, inputs, output):
    x, w, _, stride, padding, dilation, groups, activation, store_pre = inputs
    save_for_backward(ctx, x, w, output, stride, padding, dilation, groups, activation, store_pre)


def save_for_backward(ctx, x, w, output, stride, padding, dilation, groups, activation, store_pre):
    """What a convolution's backward op needs (conv2d's, and conv_transpose2d's with its own
    geometry): x for dw, w for dx, the output or pre-activation for the activation's gradient."""
    y, z = output
    act = activation_constexpr(activation)
    need_x, need_w, _ = ctx.needs_input_grad[:3]
    # gelu's derivative needs the pre-activation z; the other activations' come from the output y.
    saved = z if store_pre else (y if act != "none" else None)
    ctx.save_for_backward(x if need_w else None, w if need_x else None, saved)
    # dx follows x's layout (x's strides when x is dense, contiguous otherwise).
    ctx.conf = (list(x.shape), list(torch.empty_like(x, device="meta").stride()), list(w.shape),
                stride, padding, dilation, groups, activation)
    ctx.mark_non_differentiable(z)
    ctx.set_materialize_grads(False)


def _conv2d_backward_autograd(ctx, grad_output, _grad_pre):
    x, w, saved = ctx.saved_tensors
    if grad_output is None:
        return (None,) * 9
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.gpudl.conv2d_backward(grad_output, x, w, saved, *ctx.conf, need_x, need_w, need_b)
    return (dx if need_x else None), (dw if need_w else None), (db if need_b else None), *(None,) * 6


_conv2d_op.register_autograd(_conv2d_backward_autograd, setup_context=_setup_conv2d)


@kernel_op("conv2d_backward")
def _conv2d_backward_op(grad_output: Tensor, input: Optional[Tensor], weight: Optional[Tensor],
                        saved: Optional[Tensor], input_shape: list[int], input_strides: list[int],
                        weight_shape: list[int], stride: list[int], padding: list[int], dilation: list[int],
                        groups: int, activation: Optional[str], need_input: bool, need_weight: bool,
                        need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dinput, dweight, dbias); each an empty tensor when not asked for."""
    dx, dw, db = _conv2d_backward(grad_output, input, weight, saved, input_shape, input_strides, weight_shape,
                                  stride, padding, dilation, groups, activation_constexpr(activation),
                                  need_input, need_weight, need_bias)
    return tuple(t if t is not None else no_tensor(grad_output) for t in (dx, dw, db))


first_order_only(_conv2d_backward_op)


@_conv2d_backward_op.register_fake
def _(grad_output, input, weight, saved, input_shape, input_strides, weight_shape, stride, padding, dilation, groups,
      activation, need_input, need_weight, need_bias):
    like = dict(dtype=grad_output.dtype, device=grad_output.device)
    return (torch.empty_strided(input_shape, input_strides, **like) if need_input else grad_output.new_empty(0),
            torch.empty(weight_shape, **like) if need_weight else grad_output.new_empty(0),
            torch.empty(weight_shape[0], **like) if need_bias else grad_output.new_empty(0))


def unsupported(input, weight, bias, stride, padding, dilation, groups, activation_name):
    if groups > _MAX_GRID_Z:
        return f"groups > {_MAX_GRID_Z} (the CUDA grid limit of the group axis)"
    return None


def conv2d(input, weight, bias, stride, padding, dilation, groups, activation_name):
    """F.conv2d followed by an activation, in Triton.

    input [N, C_in, H, W]; weight [C_out, C_in / groups, kH, kW]; bias [C_out] or None;
    stride, dilation (sH, sW); padding (top, bottom, left, right); groups an int;
    activation_name None, 'relu', 'leaky_relu', 'tanh', 'sigmoid' or 'gelu'.
    Returns y [N, C_out, H_out, W_out], channels_last when input or weight is channels_last.
    """
    if weight.shape[1] == 0:  # also refused by gpudl.ops.conv2d; the kernels would divide by C_in_g
        raise ValueError(f"weight {tuple(weight.shape)} has no input channels; a convolution needs at least one")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    store_pre = needs_grad and activation_name == "gelu"
    return torch.ops.gpudl.conv2d(input, weight, bias, list(stride), list(padding), list(dilation), int(groups),
                                  activation_name, store_pre)[0]
