"""max_pool2d's op layer: host launchers, the `gpudl::max_pool2d` custom ops, fakes, autograd and
the entry `gpudl.ops.max_pool2d` calls. Kernels in max_pool2d_triton.py, registry data in
max_pool2d_spec.py."""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels.max_pool2d_triton import (  # noqa: F401  (the autotuned kernels, found here by the tests)
    BWD_WARPS,
    PLANE_TILE_COLS,
    PLANE_TILE_ROWS,
    PLANE_TILE_WARPS,
    _max_pool2d_bwd_kernel,
    _max_pool2d_fwd_kernel,
    _max_pool2d_fwd_plane_kernel,
    bwd_block,
)
from gpudl.kernels.registry import first_order_only, kernel_op, no_tensor


# --------------------------------------------------------------------------- host launchers
def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window would start in the padding
    return out


def _is_channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _max_pool2d_forward(x, kernel_size, stride, padding, dilation, ceil_mode, store_index):
    n, c, h, w = x.shape
    h_out = pool_output_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    w_out = pool_output_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    channels_last = _is_channels_last(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.empty((n, c, h_out, w_out), device=x.device, dtype=x.dtype, memory_format=fmt)
    idx = torch.empty_like(y, dtype=torch.int32) if store_index else None
    total = y.numel()
    if total == 0:
        return y, idx
    if not channels_last:
        _max_pool2d_fwd_planes(x, y, idx, kernel_size, stride, padding, dilation)
        return y, idx
    grid = lambda meta: (triton.cdiv(total, meta["BLOCK"]),)  # noqa: E731
    wrap_triton(_max_pool2d_fwd_kernel)[grid](
        x, y, idx if store_index else y,
        c, h, w, h_out, w_out, total,
        *x.stride(), *y.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kernel_size[0], KW=kernel_size[1], CHANNELS_LAST=channels_last, STORE_INDEX=store_index,
    )
    return y, idx


def _max_pool2d_fwd_planes(x, y, idx, kernel_size, stride, padding, dilation):
    """The forward over (n, c) planes in output tiles, each input region loaded once (NCHW and
    other layouts whose channels are not innermost)."""
    n, c, h, w = x.shape
    h_out, w_out = y.shape[2], y.shape[3]
    block_oh = min(PLANE_TILE_ROWS, triton.next_power_of_2(h_out))
    block_ow = min(PLANE_TILE_COLS, triton.next_power_of_2(w_out))
    # The input region of a full tile: (outputs - 1) * stride + (kernel - 1) * dilation + 1.
    block_ih = triton.next_power_of_2((block_oh - 1) * stride[0] + (kernel_size[0] - 1) * dilation[0] + 1)
    block_iw = triton.next_power_of_2((block_ow - 1) * stride[1] + (kernel_size[1] - 1) * dilation[1] + 1)
    grid = (n * c, triton.cdiv(h_out, block_oh), triton.cdiv(w_out, block_ow))
    wrap_triton(_max_pool2d_fwd_plane_kernel)[grid](
        x, y, idx if idx is not None else y,
        c, h, w, h_out, w_out, *x.stride(), *y.stride(), padding[0], padding[1],
        STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0], DIL_W=dilation[1],
        KH=kernel_size[0], KW=kernel_size[1], STORE_INDEX=idx is not None,
        BLOCK_OH=block_oh, BLOCK_OW=block_ow, BLOCK_IH=block_ih, BLOCK_IW=block_iw, num_warps=PLANE_TILE_WARPS,
    )


def _max_pool2d_backward(gy, idx, x_shape, channels_last, kernel_size, stride, padding, dilation):
    """dx [N, C, H, W] (channels_last when x was) from gy and the argmax index [N, C, H_out, W_out]."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dx = torch.empty(x_shape, device=gy.device, dtype=gy.dtype, memory_format=fmt)
    total = dx.numel()
    if total == 0:
        return dx
    _, c, h, w = x_shape
    if gy.numel() == 0:
        return dx.zero_()
    h_out, w_out = gy.shape[2], gy.shape[3]
    block = bwd_block(channels_last, dx.element_size())
    wrap_triton(_max_pool2d_bwd_kernel)[(triton.cdiv(total, block),)](
        gy, idx, dx,
        c, h, w, h_out, w_out, total,
        *gy.stride(), *idx.stride(), *dx.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kernel_size[0], KW=kernel_size[1], CHANNELS_LAST=channels_last, BLOCK=block, num_warps=BWD_WARPS,
    )
    return dx


# --------------------------------------------------------------------------- custom ops
def _pooled_shape(x_shape, kernel_size, stride, padding, dilation, ceil_mode):
    n, c, h, w = x_shape
    return (n, c, *(pool_output_size(size, k, st, p, d, ceil_mode)
                    for size, k, st, p, d in zip((h, w), kernel_size, stride, padding, dilation)))


@kernel_op("max_pool2d")
def _max_pool2d_op(input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                   ceil_mode: bool, store_index: bool) -> tuple[Tensor, Tensor]:
    """(y [N, C, H_out, W_out], int32 argmax of y's shape and layout, or an empty tensor)."""
    y, idx = _max_pool2d_forward(input, kernel_size, stride, padding, dilation, ceil_mode, store_index)
    return y, (idx if idx is not None else no_tensor(y))


@_max_pool2d_op.register_fake
def _(input, kernel_size, stride, padding, dilation, ceil_mode, store_index):
    fmt = torch.channels_last if _is_channels_last(input) else torch.contiguous_format
    y = torch.empty(_pooled_shape(input.shape, kernel_size, stride, padding, dilation, ceil_mode),
                    dtype=input.dtype, device=input.device, memory_format=fmt)
    return y, (torch.empty_like(y, dtype=torch.int32) if store_index else y.new_empty(0))


def _setup_max_pool2d(ctx, inputs, output):
    input, kernel_size, stride, padding, dilation, _, _ = inputs
    ctx.save_for_backward(output[1])
    ctx.x_shape, ctx.channels_last = list(input.shape), _is_channels_last(input)
    ctx.window = (kernel_size, stride, padding, dilation)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _max_pool2d_backward_autograd(ctx, grad_output, _grad_index):
    (idx,) = ctx.saved_tensors
    if grad_output is None or not ctx.needs_input_grad[0]:
        return (None,) * 7
    dx = torch.ops.gpudl.max_pool2d_backward(grad_output, idx, ctx.x_shape, ctx.channels_last, *ctx.window)
    return (dx,) + (None,) * 6


_max_pool2d_op.register_autograd(_max_pool2d_backward_autograd, setup_context=_setup_max_pool2d)


@kernel_op("max_pool2d_backward")
def _max_pool2d_backward_op(grad_output: Tensor, index: Tensor, input_shape: list[int], channels_last: bool,
                            kernel_size: list[int], stride: list[int], padding: list[int],
                            dilation: list[int]) -> Tensor:
    return _max_pool2d_backward(grad_output, index, input_shape, channels_last, kernel_size, stride, padding, dilation)


first_order_only(_max_pool2d_backward_op)


@_max_pool2d_backward_op.register_fake
def _(grad_output, index, input_shape, channels_last, kernel_size, stride, padding, dilation):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(input_shape, dtype=grad_output.dtype, device=grad_output.device, memory_format=fmt)


def unsupported(input, kernel_size, stride, padding, dilation, ceil_mode):
    if input.shape[2] * input.shape[3] >= 2**31:
        return "H * W >= 2**31 does not fit the int32 argmax index"
    return None


def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode):
    """F.max_pool2d in Triton. input [N, C, H, W]; kernel_size, stride, padding, dilation pairs;
    ceil_mode a bool. Returns [N, C, H_out, W_out] (channels_last when input is)."""
    sizes = _pooled_shape(input.shape, kernel_size, stride, padding, dilation, ceil_mode)[2:]
    if min(sizes) < 1:
        raise ValueError(f"max_pool2d: input spatial size {tuple(input.shape[2:])} with kernel_size "
                         f"{tuple(kernel_size)}, padding {tuple(padding)}, dilation {tuple(dilation)} gives output "
                         f"size {tuple(sizes)}; it must be >= 1")
    store_index = torch.is_grad_enabled() and input.requires_grad
    return torch.ops.gpudl.max_pool2d(input, list(kernel_size), list(stride), list(padding), list(dilation),
                                      bool(ceil_mode), store_index)[0]
