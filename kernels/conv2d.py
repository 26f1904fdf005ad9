"""conv2d's op layer: host launchers, the `gpudl::conv2d` custom ops (forward and backward), their
fake implementations and autograd, and the entry `gpudl.ops.conv2d` calls. The kernels and the
algorithm are in conv2d_triton.py; the registry data in conv2d_spec.py.

Shapes (the normalized arguments of gpudl.reference.conv2d):
    input  x [N, C_in, H, W]              any strides: NCHW, channels_last or a strided view
    weight w [C_out, C_in / groups, kH, kW]
    bias   b [C_out] or None
    output y [N, C_out, H_out, W_out]     H_out = (H + top + bottom - dH * (kH - 1) - 1) // sH + 1
                                          channels_last when x or w is (as F.conv2d does),
                                          or x has a single channel (conv2d._output_format)
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import acc_dtype, activation_constexpr
from gpudl.kernels.conv2d_triton import (  # the autotuned kernels are found here by the registry tests
    ACT_GRAD_BLOCK,
    BIAS_GRAD_CHANNELS,
    BIAS_GRAD_ROWS,
    MAX_GRID_Z,
    _activation_grad_kernel,
    _bias_grad_kernel,
    _conv2d_dgrad_depthwise_kernel,
    _conv2d_dgrad_kernel,
    _conv2d_fwd_kernel,
    _conv2d_wgrad_kernel,
    depthwise_dgrad_tile,
    tap_steps,
)
from gpudl.kernels.registry import first_order_only, kernel_op, no_tensor


# --------------------------------------------------------------------------- host launchers
def _out_size(size: int, pad_lo: int, pad_hi: int, dilation: int, kernel: int, stride: int) -> int:
    return (size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def _is_channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _output_format(x: torch.Tensor, w: torch.Tensor) -> torch.memory_format:
    """channels_last when x or w is, or when x is a dense single-channel image: its two layouts are
    the same memory (`contiguous(memory_format=channels_last)` leaves its NCHW strides), so the
    channels_last convention decides and a channels_last model's first convolution starts its
    channels_last activations. (F.conv2d returns NCHW there; a model's activations would then stay
    NCHW and each convolution's backward would repack its gradient channels innermost.)"""
    single_channel = x.shape[1] == 1 and x.is_contiguous(memory_format=torch.channels_last)
    if single_channel or _is_channels_last(x) or _is_channels_last(w):
        return torch.channels_last
    return torch.contiguous_format


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows F.conv2d's policy: TF32 tensor cores while torch.backends.cudnn.allow_tf32
    # (on by default) says so, exact fp32 products otherwise.
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _reduction_splits(m: int, tiles: int, groups: int, device: torch.device) -> int:
    """How many programs share a reduction over m rows (wgrad, the bias gradient): enough to fill
    the GPU twice over when the output tiles alone do not, each split still at least 512 rows long.
    One under the interpreter. More than one costs an fp32 partial buffer of splits x the result."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    want = triton.cdiv(2 * _sm_count(index), max(tiles, 1))
    return max(1, min(want, triton.cdiv(m, 512), MAX_GRID_Z // groups))


_wgrad_splits = _reduction_splits  # the name the tests force splits through


def _geometry(stride, dilation, kh, kw, *tensors):
    """The constexprs a launch fixes: strides, dilations, kernel size, and whether element offsets
    into `tensors` need int64 (int32 arithmetic is a third of the instructions in the K loops)."""
    return dict(STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0], DIL_W=dilation[1], KH=kh, KW=kw,
                INDEX_64=any(_extent(t) >= _INDEX_32_LIMIT for t in tensors))


# Offsets of padded taps reach past a tensor's extent by up to a kernel's reach: keep a margin.
_INDEX_32_LIMIT = 2**30


def _extent(t) -> int:
    """Elements between the first and one past the last element t addresses."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) if t.numel() else 0


def channels_inner(t):
    """t itself when its channels are innermost (channels_last, or a single channel), else a
    channels_last copy. The GEMM operands go through here: their K loops then load contiguous
    vectors (an NCHW operand's channel step is H * W elements: scalar loads, a hot loop the audit
    models at 0.3-0.5x of a plain GEMM's). Channels_last models never copy; an NCHW input costs one
    copy per operand, as the convention allows; outputs are written in place in any layout."""
    if t is None or t.shape[1] <= 1 or t.stride(1) == 1:
        return t
    return t.contiguous(memory_format=torch.channels_last)


def _conv2d_forward(x, w, b, stride, padding, dilation, groups, act, store_z):
    """x [N, C_in, H, W], w [C_out, C_in_g, kH, kW] -> y [N, C_out, H_out, W_out] (and z, the
    pre-activation, same shape and strides, when store_z); channels_last when x or w is."""
    n, _, h, wd = x.shape
    c_out, c_in_g, kh, kw = w.shape
    h_out = _out_size(h, padding[0], padding[1], dilation[0], kh, stride[0])
    w_out = _out_size(wd, padding[2], padding[3], dilation[1], kw, stride[1])
    y = torch.empty((n, c_out, h_out, w_out), device=x.device, dtype=x.dtype, memory_format=_output_format(x, w))
    z = torch.empty_like(y) if store_z else None
    if y.numel() > 0:
        _conv2d_fwd_launch(x, w, b, y, z, stride, padding, dilation, groups, act)
    return y, z


def _conv2d_fwd_launch(x, w, b, y, z, stride, padding, dilation, groups, act):
    """Writes y (and z when not None) [N, C_out, H_out, W_out]; the output size is y's, so that a
    transposed convolution's input gradient can ask for exactly its input's size. Every operand is
    read channels innermost (channels_inner)."""
    x, w = channels_inner(x), channels_inner(w)
    n, _, h, wd = x.shape
    c_out, c_in_g, kh, kw = w.shape
    h_out, w_out = y.shape[2], y.shape[3]
    c_out_g = c_out // groups
    m = n * h_out * w_out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c_out_g, meta["BLOCK_N"]), groups)  # noqa: E731
    wrap_triton(_conv2d_fwd_kernel)[grid](
        x, w, b if b is not None else w, y, z if z is not None else y,
        c_in_g, h, wd, c_out_g, h_out, w_out, m, c_in_g * kh * kw,
        *x.stride(), *w.stride(), *y.stride(), padding[0], padding[2],
        **_geometry(stride, dilation, kh, kw, x, w, y), HAS_BIAS=b is not None, ACTIVATION=act, STORE_Z=z is not None,
        INPUT_PRECISION=_input_precision(x.dtype),
    )


def _conv2d_dgrad(gz, w, dx, stride, padding, dilation, groups, bias=None, act="none", z=None):
    """Writes every element of dx [N, C_in, H, W] from gz [N, C_out, H_out, W_out], the gradient of
    the pre-activation. bias, act and z are the epilogue of a transposed convolution (dx = act(dgrad
    + bias), z the pre-activation): conv_transpose2d's forward is this kernel."""
    gz, w = channels_inner(gz), channels_inner(w)
    n, _, h, wd = dx.shape
    c_out, c_in_g, kh, kw = w.shape
    c_out_g = c_out // groups
    h_phase, w_phase = triton.cdiv(h, stride[0]), triton.cdiv(wd, stride[1])
    m_phase = n * h_phase * w_phase
    phases = stride[0] * stride[1]
    shared = dict(**_geometry(stride, dilation, kh, kw, gz, w, dx),
                  **tap_steps(stride, dilation),
                  HAS_BIAS=bias is not None, ACTIVATION=act, STORE_Z=z is not None)
    epilogue = (bias if bias is not None else w, z if z is not None else dx)
    if c_in_g == 1:
        # One input channel per group: each group's GEMM would have N = 1 (a GEMV on tensor cores);
        # the depthwise kernel accumulates on CUDA cores, channels (= groups) along the tile.
        tile = depthwise_dgrad_tile(groups)
        grid = (triton.cdiv(m_phase, tile.kwargs["BLOCK_M"]), triton.cdiv(groups, tile.kwargs["BLOCK_N"]), phases)
        wrap_triton(_conv2d_dgrad_depthwise_kernel)[grid](
            gz, w, dx, *epilogue, groups, h, wd, gz.shape[2], gz.shape[3], h_phase, w_phase, m_phase,
            *gz.stride(), *w.stride(), *dx.stride(), padding[0], padding[2], **shared, C_OUT_G=c_out_g, **tile.kwargs,
            num_warps=tile.num_warps,
        )
        return dx
    grid = lambda meta: (triton.cdiv(m_phase, meta["BLOCK_M"]), triton.cdiv(c_in_g, meta["BLOCK_N"]),  # noqa: E731
                         groups * phases)
    wrap_triton(_conv2d_dgrad_kernel)[grid](
        gz, w, dx, *epilogue,
        c_in_g, h, wd, c_out_g, gz.shape[2], gz.shape[3], h_phase, w_phase, m_phase, c_out_g * kh * kw,
        *gz.stride(), *w.stride(), *dx.stride(), padding[0], padding[2], **shared,
        INPUT_PRECISION=_input_precision(w.dtype),
    )
    return dx


def _conv2d_wgrad(gz, x, w_shape, stride, padding, dilation, groups, out_dtype=None):
    """dw [C_out, C_in_g, kH, kW] in out_dtype (default x's dtype), from gz [N, C_out, H_out, W_out]
    (the gradient of the pre-activation) and x."""
    gz, x = channels_inner(gz), channels_inner(x)
    n, _, h, wd = x.shape
    c_out, c_in_g, kh, kw = w_shape
    c_out_g = c_out // groups
    h_out, w_out = gz.shape[2], gz.shape[3]
    m = n * h_out * w_out
    k_total = c_in_g * kh * kw
    tiles = kh * kw * triton.cdiv(c_in_g, 64) * triton.cdiv(c_out_g, 64) * groups
    splits = _wgrad_splits(m, tiles, groups, x.device)
    m_per_split = triton.cdiv(m, splits)
    splits = triton.cdiv(m, m_per_split)  # no empty split
    dw = torch.empty(w_shape, device=x.device, dtype=out_dtype or x.dtype)
    # One split writes dw itself; several write fp32 partials, summed below in a fixed order.
    out = dw if splits == 1 else torch.empty((splits, *w_shape), device=x.device, dtype=acc_dtype(x.dtype))
    grid = lambda meta: (kh * kw * triton.cdiv(c_in_g, meta["BLOCK_N"]), triton.cdiv(c_out_g, meta["BLOCK_M"]),  # noqa: E731
                         groups * splits)
    wrap_triton(_conv2d_wgrad_kernel)[grid](
        gz, x, out,
        c_in_g, h, wd, c_out_g, h_out, w_out, m, k_total, c_out, groups, m_per_split,
        *gz.stride(), *x.stride(), padding[0], padding[2],
        **_geometry(stride, dilation, kh, kw, gz, x, out), INPUT_PRECISION=_input_precision(x.dtype),
    )
    if splits > 1:
        torch.sum(out, dim=0, out=dw)
    return dw


def _bias_grad(gz, out_dtype=None):
    """db [C] = the sum of gz [N, C, H, W] over (n, h, w), in out_dtype (default gz's dtype)."""
    n, c, h, wd = gz.shape
    m = n * h * wd
    db = torch.empty(c, device=gz.device, dtype=out_dtype or gz.dtype)
    splits = _reduction_splits(m, triton.cdiv(c, BIAS_GRAD_CHANNELS), 1, gz.device)
    m_per_split = triton.cdiv(m, splits)
    splits = triton.cdiv(m, m_per_split)
    out = db if splits == 1 else torch.empty((splits, c), device=gz.device, dtype=acc_dtype(gz.dtype))
    wrap_triton(_bias_grad_kernel)[(triton.cdiv(c, BIAS_GRAD_CHANNELS), splits)](
        gz, out, c, h, wd, m, m_per_split, *gz.stride(),
        BLOCK_M=BIAS_GRAD_ROWS, BLOCK_C=BIAS_GRAD_CHANNELS, num_warps=4,
    )
    if splits > 1:
        torch.sum(out, dim=0, out=db)
    return db


def activation_grad(gy, saved, act):
    """dz = gy * act'(saved), with saved's (dense) strides; gy itself when there is no activation."""
    if act == "none":
        return gy
    dz = torch.empty_like(saved)
    numel = dz.numel()
    same = gy.stride() == saved.stride()
    wrap_triton(_activation_grad_kernel)[(triton.cdiv(numel, ACT_GRAD_BLOCK),)](
        gy, saved, dz, numel, dz.shape[1], dz.shape[2], dz.shape[3], *gy.stride(), *saved.stride(),
        ACTIVATION=act, SAME_DENSE_LAYOUT=same, BLOCK=ACT_GRAD_BLOCK, num_warps=4,
    )
    return dz


# The activation gradient dz = dy * act'(y) is a buffer the size of the output, live beside dy and
# dx. Past this size the backward makes it one batch chunk at a time (each chunk's dgrad, wgrad and
# bias gradient read it, then it is freed): the op then holds dy + one chunk of dz + the gradients,
# at most what PyTorch's eager ReLU backward + convolution backward hold (scripts/estimate_memory.py,
# docs/memory.md), for a few more launches of kernels that still have >= 16 MiB of work each.
DZ_CHUNK_BYTES = 16 * 2**20


def _backward_chunks(batch: int, dz_bytes: int) -> int:
    """Batch chunks of the backward: one until dz passes DZ_CHUNK_BYTES, then enough to keep each under it."""
    return max(1, min(batch, triton.cdiv(dz_bytes, DZ_CHUNK_BYTES)))


def _conv2d_backward(gy, x, w, saved, x_shape, x_strides, w_shape, stride, padding, dilation, groups, act,
                     need_x, need_w, need_b):
    """(dx with x's strides, dw, db); None for those not asked for. The activation gradient is
    applied once, here, and the GEMMs read its result. dw and db come first: their fp32 partial
    sums (several splits) are freed before dx is allocated, so the op's peak is gy + dz + the three
    gradients, never the partials on top of dx (scripts/estimate_memory.py, docs/memory.md)."""
    dx = dw = db = None
    like = dict(dtype=gy.dtype, device=gy.device)
    if gy.numel() == 0:  # empty batch or no output channels: every gradient is zero
        dx = torch.empty_strided(x_shape, x_strides, **like).zero_() if need_x else None
        dw = torch.zeros(w_shape, **like) if need_w else None
        db = torch.zeros(w_shape[0], **like) if need_b else None
        return dx, dw, db
    if act != "none" and gy.shape[0] > 1:
        chunks = _backward_chunks(gy.shape[0], saved.numel() * saved.element_size())
        if chunks > 1:
            return _conv2d_backward_chunked(gy, x, w, saved, x_shape, x_strides, w_shape, stride, padding, dilation,
                                            groups, act, need_x, need_w, need_b, chunks)
    gz = channels_inner(activation_grad(gy, saved, act))  # read by both GEMMs: repacked (if at all) once
    if need_w:
        dw = _conv2d_wgrad(gz, x, w_shape, stride, padding, dilation, groups)
    if need_b:
        db = _bias_grad(gz)
    if need_x:
        dx = torch.empty_strided(x_shape, x_strides, **like)
        if dx.numel() == 0:
            dx.zero_()
        else:
            _conv2d_dgrad(gz, w, dx, stride, padding, dilation, groups)
    return dx, dw, db


def _conv2d_backward_chunked(gy, x, w, saved, x_shape, x_strides, w_shape, stride, padding, dilation, groups, act,
                             need_x, need_w, need_b, chunks):
    """`_conv2d_backward` over `chunks` batch chunks: dz exists for one chunk at a time; each
    chunk's dgrad writes its rows of dx, its weight and bias gradients add (fp32, in chunk order:
    deterministic) into dw and db, rounded to gy's dtype once at the end."""
    like = dict(dtype=gy.dtype, device=gy.device)
    acc = dict(dtype=acc_dtype(gy.dtype), device=gy.device)
    dx = torch.empty_strided(x_shape, x_strides, **like) if need_x else None
    dw = torch.zeros(w_shape, **acc) if need_w else None
    db = torch.zeros(w_shape[0], **acc) if need_b else None
    if dx is not None and dx.numel() == 0:
        dx.zero_()
    rows = triton.cdiv(gy.shape[0], chunks)
    for start in range(0, gy.shape[0], rows):
        part = slice(start, start + rows)
        gz = channels_inner(activation_grad(gy[part], saved[part], act))
        if need_w:
            dw += _conv2d_wgrad(gz, x[part], w_shape, stride, padding, dilation, groups, out_dtype=dw.dtype)
        if need_b:
            db += _bias_grad(gz, out_dtype=db.dtype)
        if dx is not None and dx.numel() > 0:
            _conv2d_dgrad(gz, w, dx[part], stride, padding, dilation, groups)
        del gz
    return dx, (dw.to(gy.dtype) if need_w else None), (db.to(gy.dtype) if need_b else None)


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
    y = torch.empty(_output_shape(input.shape, weight.shape, stride, padding, dilation), dtype=input.dtype,
                    device=input.device, memory_format=_output_format(input, weight))
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
    if groups * stride[0] * stride[1] > MAX_GRID_Z:
        return (f"groups x stride_h x stride_w = {groups * stride[0] * stride[1]} > {MAX_GRID_Z} (the CUDA grid "
                "limit of the axis holding the group and the input-gradient phase)")
    return None


def conv2d(input, weight, bias, stride, padding, dilation, groups, activation_name):
    """F.conv2d followed by an activation, in Triton.

    input [N, C_in, H, W]; weight [C_out, C_in / groups, kH, kW]; bias [C_out] or None;
    stride, dilation (sH, sW); padding (top, bottom, left, right); groups an int;
    activation_name None, 'relu', 'leaky_relu', 'tanh', 'sigmoid' or 'gelu'.
    Returns y [N, C_out, H_out, W_out], channels_last when input or weight is channels_last, or input
    is a dense single-channel image (both layouts at once: the channels_last convention decides).
    """
    if weight.shape[1] == 0:  # also refused by gpudl.ops.conv2d; the kernels would divide by C_in_g
        raise ValueError(f"weight {tuple(weight.shape)} has no input channels; a convolution needs at least one")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    store_pre = needs_grad and activation_name == "gelu"
    return torch.ops.gpudl.conv2d(input, weight, bias, list(stride), list(padding), list(dilation), int(groups),
                                  activation_name, store_pre)[0]
