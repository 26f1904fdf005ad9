"""Max pooling with a saved argmax: forward keeps the index of each window's maximum, backward
scatters the output gradient back to it.

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

from gpudl import reference
from gpudl.kernels._common import triton_dtype, tuning_configs
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, fall_back, register

# Elementwise over outputs: one output per lane, kH * kW unrolled loads each. The first config is
# the interpreter's: one big block, so the test shapes take a program or two.
_FWD_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 512}, num_warps=4),
]
# The backward is not autotuned: its atomic adds into a zeroed buffer must run exactly once.
_BWD_BLOCK, _BWD_WARPS = 1024, 4


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
    C, W, H_OUT, W_OUT, TOTAL,
    sg_n, sg_c, sg_h, sg_w,
    si_n, si_c, si_h, si_w,
    sd_n, sd_c, sd_h, sd_w,
    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    """dx[n, c, idx // W, idx % W] += dy[n, c, oh, ow] for BLOCK outputs. Overlapping windows
    (stride < kernel) can share an argmax, hence atomics, into a zeroed fp32 (fp64) dx."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TOTAL
    n, c, oh, ow = _output_coords(offs, C, H_OUT, W_OUT, CHANNELS_LAST)
    idx = tl.load(idx_ptr + n * si_n + c * si_c + oh * si_h + ow * si_w, mask=mask, other=-1)
    g = tl.load(gy_ptr + n * sg_n + c * sg_c + oh * sg_h + ow * sg_w, mask=mask, other=0.0)
    valid = mask & (idx >= 0)  # -1: a window wholly in the padding, whose gradient goes nowhere
    ih = (idx // W).to(tl.int64)
    iw = (idx % W).to(tl.int64)
    tl.atomic_add(dx_ptr + n * sd_n + c * sd_c + ih * sd_h + iw * sd_w, g.to(dx_ptr.dtype.element_ty), mask=valid)


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
    _max_pool2d_fwd_kernel[grid](
        x, y, idx if store_index else y,
        c, h, w, h_out, w_out, total,
        *x.stride(), *y.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kernel_size[0], KW=kernel_size[1], CHANNELS_LAST=channels_last, STORE_INDEX=store_index,
    )
    return y, idx


def _max_pool2d_backward(gy, idx, x_shape, x_stride, dtype):
    """dx [N, C, H, W] with x's strides, from gy and the argmax index [N, C, H_out, W_out]."""
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    dx = torch.zeros(x_shape, device=gy.device, dtype=acc_dtype).as_strided(x_shape, x_stride)
    total = gy.numel()
    if total and dx.numel():
        _, c, h_out, w_out = gy.shape
        channels_last = _is_channels_last(idx)
        grid = (triton.cdiv(total, _BWD_BLOCK),)
        _max_pool2d_bwd_kernel[grid](
            gy, idx, dx,
            c, x_shape[3], h_out, w_out, total,
            *gy.stride(), *idx.stride(), *dx.stride(),
            CHANNELS_LAST=channels_last, BLOCK=_BWD_BLOCK, num_warps=_BWD_WARPS,
        )
    return dx.to(dtype)


class _MaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        need_grad = ctx.needs_input_grad[0]
        y, idx = _max_pool2d_forward(x, kernel_size, stride, padding, dilation, ceil_mode, need_grad)
        if need_grad:
            ctx.save_for_backward(idx)
            ctx.x_shape = x.shape
            # dx follows x's layout (x's strides when x is dense, contiguous otherwise).
            ctx.x_stride = torch.empty_like(x, device="meta").stride()
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        (idx,) = ctx.saved_tensors
        return _max_pool2d_backward(gy, idx, ctx.x_shape, ctx.x_stride, gy.dtype), None, None, None, None, None


def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode):
    """F.max_pool2d in Triton. input [N, C, H, W]; kernel_size, stride, padding, dilation pairs;
    ceil_mode a bool. Returns [N, C, H_out, W_out] (channels_last when input is)."""
    n, c, h, w = input.shape
    sizes = [pool_output_size(s, k, st, p, d, ceil_mode)
             for s, k, st, p, d in zip((h, w), kernel_size, stride, padding, dilation)]
    if min(sizes) < 1:
        raise ValueError(f"max_pool2d: input spatial size {(h, w)} with kernel_size {tuple(kernel_size)}, padding "
                         f"{tuple(padding)}, dilation {tuple(dilation)} gives output size {tuple(sizes)}; it must be >= 1")
    if h * w >= 2**31:
        fall_back("max_pool2d", "H * W >= 2**31 does not fit the int32 argmax index")
        return reference.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)
    return _MaxPool2dFunction.apply(input, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation),
                                    bool(ceil_mode))


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
            constexprs = {"CHANNELS_LAST": channels_last, "BLOCK": _BWD_BLOCK}
            signature = {a: "constexpr" if a in constexprs else ptr if a == "gy_ptr" else "*i32" if a == "idx_ptr"
                         else "*fp32" if a == "dx_ptr" else "i32" for a in fn.arg_names}
            variants.append(CompileVariant(f"bwd-{label}-{layout}-b{_BWD_BLOCK}-w{_BWD_WARPS}", fn, signature,
                                           constexprs, _BWD_WARPS))
    return variants


SPEC = register(KernelSpec(
    op="max_pool2d",
    triton=max_pool2d,
    reference=reference.max_pool2d,
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
    description="max_pool2d storing the int32 argmax; backward scatters to it with atomics",
))
