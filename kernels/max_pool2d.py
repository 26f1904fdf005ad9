"""Max pooling with a saved argmax: forward keeps the index of each window's maximum, backward
gives each input element the gradients of the windows whose maximum it is (a gather in a fixed
order: deterministic, no atomics).

Shapes (the normalized arguments of gpudl.reference.max_pool2d):
    input  x [N, C, H, W]               any strides (NCHW, channels_last or a view)
    output y [N, C, H_out, W_out]       channels_last when x is (as F.max_pool2d does)
    index    [N, C, H_out, W_out] int32, flat ih * W + iw within the H x W plane (as
             F.max_pool2d's return_indices), -1 for a window that lies wholly in the padding
    H_out = (H + 2 pH - dH (kH - 1) - 1 + (sH - 1 if ceil_mode)) // sH + 1, minus one when
            ceil_mode makes the last window start in the bottom padding (torch's rule).
Ties keep the first maximum in (kh, kw) order and NaN wins, as torch does, so gradients land on
the same element as the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import triton_dtype, tuning_configs
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, first_order_only, kernel_op, no_tensor, register

# Elementwise over outputs: one output per lane, kH * kW unrolled loads each. The first config is
# the interpreter's: one big block, so the test shapes take a program or two.
_FWD_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 512}, num_warps=4),
]
# The backward: elementwise over the input, one fixed config.
_BWD_BLOCK, _BWD_WARPS = 1024, 8  # 4 warps spilled (int64 window coordinates, 8 elements a thread)


@triton.jit
def _output_coords(offs, C, H_OUT, W_OUT, CHANNELS_LAST: tl.constexpr):
    """(n, c, oh, ow) of flat output offsets in the output's memory order (NHWC or NCHW)."""
    if CHANNELS_LAST:
        c = offs % C
        ow = (offs // C) % W_OUT
        oh = (offs // (C * W_OUT)) % H_OUT
        n = offs // (C * W_OUT * H_OUT)
    else:
        ow = offs % W_OUT
        oh = (offs // W_OUT) % H_OUT
        c = (offs // (W_OUT * H_OUT)) % C
        n = offs // (W_OUT * H_OUT * C)
    return n, c, oh, ow


@triton.autotune(configs=tuning_configs(_FWD_CONFIGS), key=["TOTAL", "C", "H", "W"])
@triton.jit
def _max_pool2d_fwd_kernel(
    x_ptr, y_ptr, idx_ptr,
    C, H, W, H_OUT, W_OUT, TOTAL,
    sx_n, sx_c, sx_h, sx_w,
    sy_n, sy_c, sy_h, sy_w,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, CHANNELS_LAST: tl.constexpr, STORE_INDEX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """BLOCK outputs of y (and their argmax, when STORE_INDEX); TOTAL = N * C * H_out * W_out.
    The index tensor has y's shape and strides."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TOTAL
    n, c, oh, ow = _output_coords(offs, C, H_OUT, W_OUT, CHANNELS_LAST)
    x_base = x_ptr + n * sx_n + c * sx_c
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    best = tl.full((BLOCK,), float("-inf"), ACC)
    best_idx = tl.full((BLOCK,), -1, tl.int32)
    for kh in tl.static_range(KH):
        ih = ih0 + kh * DIL_H
        row_ok = mask & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = iw0 + kw * DIL_W
            ok = row_ok & (iw >= 0) & (iw < W)
            v = tl.load(x_base + ih * sx_h + iw * sx_w, mask=ok, other=float("-inf")).to(ACC)
            # strict > keeps the first maximum; a NaN always wins (torch's rule).
            take = ok & ((v > best) | (v != v))
            best = tl.where(take, v, best)
            best_idx = tl.where(take, (ih * W + iw).to(tl.int32), best_idx)
    y_offs = n * sy_n + c * sy_c + oh * sy_h + ow * sy_w
    tl.store(y_ptr + y_offs, best.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_INDEX:
        tl.store(idx_ptr + y_offs, best_idx, mask=mask)


@triton.jit
def _max_pool2d_bwd_kernel(
    gy_ptr, idx_ptr, dx_ptr,
    C, H, W, H_OUT, W_OUT, TOTAL,
    sg_n, sg_c, sg_h, sg_w,
    si_n, si_c, si_h, si_w,
    sd_n, sd_c, sd_h, sd_w,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    """BLOCK elements of dx; TOTAL = N * C * H * W. Each input element gathers the gradients of
    the windows whose argmax it is: for every tap (kh, kw) the one window that could hold it at
    that tap, in a fixed order. No atomics, no zeroed buffer: deterministic, and written once in
    dx's dtype."""
    ACC: tl.constexpr = tl.float64 if dx_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TOTAL
    n, c, ih, iw = _output_coords(offs, C, H, W, CHANNELS_LAST)  # coordinates in x's plane
    me = (ih * W + iw).to(tl.int32)
    g_base = gy_ptr + n * sg_n + c * sg_c
    i_base = idx_ptr + n * si_n + c * si_c
    acc = tl.zeros((BLOCK,), ACC)
    # Taps in reverse, so the windows come in ascending (oh, ow) order: the order in which a
    # scatter over the outputs (PyTorch's CPU kernel) adds them, hence bit-identical sums.
    for tap_h in tl.static_range(KH):
        kh = KH - 1 - tap_h
        oh_s = ih + PAD_H - kh * DIL_H  # = oh * STRIDE_H for the window holding ih at tap kh
        oh = oh_s // STRIDE_H
        row_ok = mask & (oh_s >= 0) & (oh_s % STRIDE_H == 0) & (oh < H_OUT)
        for tap_w in tl.static_range(KW):
            kw = KW - 1 - tap_w
            ow_s = iw + PAD_W - kw * DIL_W
            ow = ow_s // STRIDE_W
            ok = row_ok & (ow_s >= 0) & (ow_s % STRIDE_W == 0) & (ow < W_OUT)
            argmax = tl.load(i_base + oh * si_h + ow * si_w, mask=ok, other=-1)
            hit = ok & (argmax == me)
            acc += tl.load(g_base + oh * sg_h + ow * sg_w, mask=hit, other=0.0).to(ACC)
    tl.store(dx_ptr + n * sd_n + c * sd_c + ih * sd_h + iw * sd_w, acc.to(dx_ptr.dtype.element_ty), mask=mask)


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
    grid = lambda meta: (triton.cdiv(total, meta["BLOCK"]),)  # noqa: E731
    wrap_triton(_max_pool2d_fwd_kernel)[grid](
        x, y, idx if store_index else y,
        c, h, w, h_out, w_out, total,
        *x.stride(), *y.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kernel_size[0], KW=kernel_size[1], CHANNELS_LAST=channels_last, STORE_INDEX=store_index,
    )
    return y, idx


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
    wrap_triton(_max_pool2d_bwd_kernel)[(triton.cdiv(total, _BWD_BLOCK),)](
        gy, idx, dx,
        c, h, w, h_out, w_out, total,
        *gy.stride(), *idx.stride(), *dx.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kernel_size[0], KW=kernel_size[1], CHANNELS_LAST=channels_last, BLOCK=_BWD_BLOCK, num_warps=_BWD_WARPS,
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


# --------------------------------------------------------------------------- registration
def _pool_case(name, n, c, hw, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False,
               channels_last=False, ties=False):
    def make(dtype, device):
        if ties:  # few distinct values: many windows tie, checking the first-maximum rule
            x = torch.randint(0, 3, (n, c, *hw), device=device).to(dtype)
        else:
            x = torch.randn(n, c, *hw, device=device).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        return (x.requires_grad_(), kernel_size, stride, padding, dilation, ceil_mode)

    return Case(name, make)


def _pool_bytes(args):
    x, kernel_size, stride, padding, dilation, ceil_mode = args
    h_out = pool_output_size(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    w_out = pool_output_size(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    return (x.numel() + x.shape[0] * x.shape[1] * h_out * w_out) * x.element_size()


def _pool_flops(args):
    x, kernel_size, stride, padding, dilation, ceil_mode = args
    h_out = pool_output_size(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    w_out = pool_output_size(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    return float(x.shape[0] * x.shape[1] * h_out * w_out * kernel_size[0] * kernel_size[1])  # comparisons


def _compile_variants():
    variants = []
    for dtype in (torch.float32, torch.bfloat16):
        label = str(dtype).split(".")[-1]
        ptr = triton_dtype(dtype)
        for channels_last in (False, True):
            layout = "nhwc" if channels_last else "nchw"
            for config in _FWD_CONFIGS:
                fn = _max_pool2d_fwd_kernel.fn
                constexprs = {"KH": 3, "KW": 3, "CHANNELS_LAST": channels_last, "STORE_INDEX": True, **config.kwargs}
                signature = {a: "constexpr" if a in constexprs else ptr if a in ("x_ptr", "y_ptr") else
                             "*i32" if a == "idx_ptr" else "i32" for a in fn.arg_names}
                variants.append(CompileVariant(f"fwd-{label}-{layout}-b{config.kwargs['BLOCK']}-w{config.num_warps}",
                                               fn, signature, constexprs, config.num_warps, config.num_stages))
            fn = _max_pool2d_bwd_kernel
            constexprs = {"KH": 3, "KW": 3, "CHANNELS_LAST": channels_last, "BLOCK": _BWD_BLOCK}
            signature = {a: "constexpr" if a in constexprs else ptr if a in ("gy_ptr", "dx_ptr") else
                         "*i32" if a == "idx_ptr" else "i32" for a in fn.arg_names}
            variants.append(CompileVariant(f"bwd-{label}-{layout}-b{_BWD_BLOCK}-w{_BWD_WARPS}", fn, signature,
                                           constexprs, _BWD_WARPS))
    return variants


SPEC = register(KernelSpec(
    op="max_pool2d",
    triton=max_pool2d,
    unsupported=unsupported,
    cases=[
        _pool_case("regular_k2_s2", 2, 3, (8, 8), (2, 2), (2, 2)),
        _pool_case("overlapping_k3_s2_p1_ties", 2, 3, (9, 7), (3, 3), (2, 2), (1, 1), ties=True),
        _pool_case("ceil_mode_dilation_channels_last", 2, 5, (10, 11), (3, 2), (2, 3), (1, 1), (2, 1), ceil_mode=True,
                   channels_last=True),
        _pool_case("rect_k3x1_s1", 1, 4, (6, 5), (3, 1), (1, 1), (1, 0)),
    ],
    gradcheck_case=_pool_case("gradcheck", 1, 2, (5, 6), (3, 3), (2, 2), (1, 1), ceil_mode=True),
    # Max pooling selects, it does not round: only the gradient sums of overlapping windows add error.
    tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)},
    compile_variants=_compile_variants,
    # 2 x 4 x 16 x 16 = 2048 outputs: several programs of every forward config's BLOCK.
    tuning_cases=[_pool_case("tuning_2x4x32x32_k3_s2_p1", 2, 4, (32, 32), (3, 3), (2, 2), (1, 1))],
    bench_cases=[
        Case("resnet_stem_c64_112x112_k3_s2_p1",
             lambda dtype, device: (torch.randn(32, 64, 112, 112, device=device, dtype=dtype)
                                    .to(memory_format=torch.channels_last).requires_grad_(), (3, 3), (2, 2), (1, 1),
                                    (1, 1), False)),
        Case("nchw_c64_112x112_k3_s2_p1",
             lambda dtype, device: (torch.randn(32, 64, 112, 112, device=device, dtype=dtype).requires_grad_(),
                                    (3, 3), (2, 2), (1, 1), (1, 1), False)),
    ],
    flops=_pool_flops,
    bytes_moved=_pool_bytes,
    description="max_pool2d storing the int32 argmax; backward gathers each input's windows (deterministic)",
))
