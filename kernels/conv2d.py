"""Fused 2-D convolution (+ bias + activation) as implicit GEMMs, forward and backward.

Shapes (the normalized arguments of gpudl.reference.conv2d):
    input  x [N, C_in, H, W]              any strides: NCHW, channels_last or a strided view
    weight w [C_out, C_in / groups, kH, kW]
    bias   b [C_out] or None
    output y [N, C_out, H_out, W_out]     H_out = (H + top + bottom - dH * (kH - 1) - 1) // sH + 1
                                          channels_last when x or w is (as F.conv2d does)

Per group g (C_in_g = C_in / groups input channels, C_out_g = C_out / groups output channels),
with no im2col buffer anywhere (every operand tile is gathered from the tensors on the fly):
    forward  y[m, o]  = act(sum_k  X[m, k] * W[k, o] + b[o])   m = (n, oh, ow), k = (kh, kw, c)
    dgrad    dx[p, c] = sum_k' dZ[p, k'] * W[k', c]            p = (n, ih, iw), k' = (kh, kw, o)
    wgrad    dw[o, k] = sum_m  dZ[m, o] * X[m, k]              m split over programs
    bias     db[o]    = sum_m  dZ[m, o]                        inside the wgrad kernel
where X[m, k] = x[n, c, oh * sH - top + kh * dH, ow * sW - left + kw * dW] (0 in the padding) and
dZ = dy * act'(z) is the gradient of the pre-activation z, computed while loading dy.
k runs over (kh, kw, c) with c fastest, so that channels_last inputs are read contiguously: the main
loops walk it tap by tap, BLOCK_K channels at a time, splitting the loop index into (tap, channel
block) with scalar arithmetic; each tile's row coordinates (the only vector divisions) are computed
once before the loop, so the loop body is address adds, masks, loads and one tl.dot, which Triton
software-pipelines with asynchronous copies. fp32 uses TF32 tensor cores while
torch.backends.cudnn.allow_tf32 says so (as F.conv2d), exact fp32 otherwise.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import (
    acc_dtype,
    activation_constexpr,
    activation_grad_from_saved,
    apply_activation,
    triton_dtype,
    tuning_configs,
)
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, first_order_only, kernel_op, no_tensor, register

# The first config of each list is the one the interpreter runs: big tiles, so that the test
# shapes take one or two programs. The others are the GPU candidates (after Triton's matmul
# tutorial), each fitting sm_80's shared memory in fp32 too (the compile check measures it) and
# audited for spills, tensor cores and asynchronous copies (README, Kernels).
_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
# dgrad's masks (the stride grid) take more registers: its 128-row tiles use 8 warps (with 4, and
# with 128x64x64 tiles, the fp32 variants spill).
_DGRAD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
]
# wgrad: BLOCK_N output channels x BLOCK_K input channels of one tap, reducing BLOCK_M rows at a
# time; the reduction is also split over programs to fill the GPU (_wgrad_splits).
# (64-row tiles with 4 warps, and 64x128 tiles, spill in the gelu variants: the activation's
# derivative is computed on the dz tile inside the loop.)
_WGRAD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=4),
]

# CUDA caps grid dims y and z at 65535; the group (times wgrad split) index lives on z.
_MAX_GRID_Z = 65535


@triton.jit
def _split_rows(start, BLOCK: tl.constexpr, H, W):
    """(n, h, w) of the BLOCK rows start, start + 1, ... of an [N, H, W] grid, as int64 vectors.
    start (int64) is split once, in scalar arithmetic; the rows' own divisions are int32 (a
    64-bit vector division is a slow-path call per element, whose registers spill)."""
    w0 = (start % W).to(tl.int32)
    t = start // W
    h0 = (t % H).to(tl.int32)
    n0 = t // H
    r = w0 + tl.arange(0, BLOCK)
    carry_w = r // W
    r2 = h0 + carry_w
    carry_h = r2 // H
    return n0 + carry_h.to(tl.int64), (r2 - carry_h * H).to(tl.int64), (r - carry_w * W).to(tl.int64)


@triton.autotune(configs=tuning_configs(_FWD_CONFIGS), key=["M", "C_IN_G", "C_OUT_G", "K_TOTAL"])
@triton.jit
def _conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr,
    C_IN_G, H, W, C_OUT_G, H_OUT, W_OUT, M, K_TOTAL,
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_c, sw_h, sw_w,
    sy_n, sy_c, sy_h, sy_w,
    STRIDE_H, STRIDE_W, PAD_TOP, PAD_LEFT, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M output positions, BLOCK_N output channels] tile of y (and of z = the
    pre-activation, when STORE_Z), for group program_id(2). M = N * H_out * W_out,
    K_TOTAL = kH * kW * C_in_g (the autotuner's key)."""
    # fp64 inputs (gradcheck) accumulate in fp64, everything else in fp32.
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    group = tl.program_id(2).to(tl.int64)

    # Per tile, once: the output positions' coordinates (the only vector divisions) and row pointers.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M can pass 2**31
    m_mask = offs_m < M
    n, oh, ow = _split_rows(pid_m * BLOCK_M, BLOCK_M, H_OUT, W_OUT)
    ih0 = oh * STRIDE_H - PAD_TOP
    iw0 = ow * STRIDE_W - PAD_LEFT
    x_rows = x_ptr + group * C_IN_G * sx_c + n * sx_n  # [BLOCK_M] pointers

    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_mask = offs_o < C_OUT_G
    chan_o = group * C_OUT_G + offs_o  # int64 channel index into w, b and y
    w_cols = w_ptr + chan_o * sw_o  # [BLOCK_N] pointers
    offs_c = tl.arange(0, BLOCK_K)

    # K walks tap by tap, BLOCK_K channels at a time (channel innermost: contiguous in
    # channels_last); the loop index splits into (tap, channel block) with scalar arithmetic only.
    c_blocks = tl.cdiv(C_IN_G, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for it in range(0, KH * KW * c_blocks):
        tap = it // c_blocks
        c = (it - tap * c_blocks) * BLOCK_K + offs_c
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * DIL_H
        iw = iw0 + kw * DIL_W
        # Zero padding and every tail are masked loads; nothing outside x is ever read.
        row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_ok = c < C_IN_G
        a = tl.load((x_rows + ih * sx_h + iw * sx_w)[:, None] + (c * sx_c)[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load((w_cols + kh * sw_h + kw * sw_w)[None, :] + (c * sw_c)[:, None],
                    mask=c_ok[:, None] & o_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)

    if HAS_BIAS:
        bias = tl.load(b_ptr + chan_o, mask=o_mask, other=0.0)
        acc += bias.to(ACC)[None, :]
    y_offs = (n * sy_n + oh * sy_h + ow * sy_w)[:, None] + (chan_o * sy_c)[None, :]
    y_mask = m_mask[:, None] & o_mask[None, :]
    if STORE_Z:
        tl.store(z_ptr + y_offs, acc.to(z_ptr.dtype.element_ty), mask=y_mask)
    out = apply_activation(acc, ACTIVATION)
    tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.autotune(configs=tuning_configs(_DGRAD_CONFIGS), key=["M_IN", "C_IN_G", "C_OUT_G", "K_TOTAL"])
@triton.jit
def _conv2d_dgrad_kernel(
    gy_ptr, s_ptr, w_ptr, dx_ptr, b_ptr, z_ptr,
    C_IN_G, H, W, C_OUT_G, H_OUT, W_OUT, M_IN, K_TOTAL,
    sg_n, sg_c, sg_h, sg_w,
    ss_n, ss_c, ss_h, ss_w,
    sw_o, sw_c, sw_h, sw_w,
    sd_n, sd_c, sd_h, sd_w,
    STRIDE_H, STRIDE_W, PAD_TOP, PAD_LEFT, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, OUT_ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M input positions, BLOCK_N input channels] tile of dx for group program_id(2):
    the convolution of dz with the flipped kernel. M_IN = N * H * W, K_TOTAL = kH * kW * C_out_g.
    Input row ih receives from output row oh through tap kh when ih + top - kh * dH = oh * sH:
    taps that miss the stride grid or the output are masked (with stride s, (s - 1) / s of the
    dz tile is masked; a sub-pixel split would skip them)."""
    ACC: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    group = tl.program_id(2).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M_IN
    n, ih, iw = _split_rows(pid_m * BLOCK_M, BLOCK_M, H, W)
    th0 = ih + PAD_TOP
    tw0 = iw + PAD_LEFT
    g_rows = gy_ptr + group * C_OUT_G * sg_c + n * sg_n
    s_rows = s_ptr + group * C_OUT_G * ss_c + n * ss_n

    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_c < C_IN_G
    w_cols = w_ptr + group * C_OUT_G * sw_o + offs_c.to(tl.int64) * sw_c
    offs_k = tl.arange(0, BLOCK_K)

    # K walks tap by tap, BLOCK_K output channels at a time (as in the forward).
    o_blocks = tl.cdiv(C_OUT_G, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for it in range(0, KH * KW * o_blocks):
        tap = it // o_blocks
        o = (it - tap * o_blocks) * BLOCK_K + offs_k
        kh = tap // KW
        kw = tap - kh * KW
        th = th0 - kh * DIL_H
        tw = tw0 - kw * DIL_W
        oh = th // STRIDE_H
        ow = tw // STRIDE_W
        row_ok = (m_mask & (th >= 0) & (tw >= 0) & (oh * STRIDE_H == th) & (ow * STRIDE_W == tw)
                  & (oh < H_OUT) & (ow < W_OUT))
        o_ok = o < C_OUT_G
        valid = row_ok[:, None] & o_ok[None, :]
        g = tl.load((g_rows + oh * sg_h + ow * sg_w)[:, None] + (o * sg_c)[None, :], mask=valid, other=0.0)
        if ACTIVATION != "none":
            s = tl.load((s_rows + oh * ss_h + ow * ss_w)[:, None] + (o * ss_c)[None, :], mask=valid, other=0.0)
            g = activation_grad_from_saved(s.to(ACC), g.to(ACC), ACTIVATION)
        b = tl.load((w_cols + kh * sw_h + kw * sw_w)[None, :] + (o * sw_o)[:, None],
                    mask=o_ok[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(g.to(w_ptr.dtype.element_ty), b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)

    # The epilogue of a transposed convolution's forward (this kernel is its main loop): bias,
    # the pre-activation z when STORE_Z, the activation. conv2d's own dgrad uses none of them.
    chan_c = group * C_IN_G + offs_c
    if HAS_BIAS:
        acc += tl.load(b_ptr + chan_c, mask=c_mask, other=0.0).to(ACC)[None, :]
    dx_offs = (n * sd_n + ih * sd_h + iw * sd_w)[:, None] + (chan_c * sd_c)[None, :]
    dx_mask = m_mask[:, None] & c_mask[None, :]
    if STORE_Z:
        tl.store(z_ptr + dx_offs, acc.to(z_ptr.dtype.element_ty), mask=dx_mask)
    acc = apply_activation(acc, OUT_ACTIVATION)
    tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=dx_mask)


@triton.autotune(configs=tuning_configs(_WGRAD_CONFIGS), key=["M", "C_IN_G", "C_OUT_G", "K_TOTAL", "M_PER_SPLIT"])
@triton.jit
def _conv2d_wgrad_kernel(
    gy_ptr, s_ptr, x_ptr, dw_ptr, db_ptr,
    C_IN_G, H, W, C_OUT_G, H_OUT, W_OUT, M, K_TOTAL, C_OUT, GROUPS, M_PER_SPLIT,
    sg_n, sg_c, sg_h, sg_w,
    ss_n, ss_c, ss_h, ss_w,
    sx_n, sx_c, sx_h, sx_w,
    STRIDE_H, STRIDE_W, PAD_TOP, PAD_LEFT, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, ACTIVATION: tl.constexpr,
    COMPUTE_W: tl.constexpr, COMPUTE_B: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_N output channels, BLOCK_K input channels] tile of the weight gradient at one
    tap (program_id(0) = tap * channel blocks + channel block), summed over the rows m in
    [split * M_PER_SPLIT, (split + 1) * M_PER_SPLIT) of split program_id(2) // GROUPS, into the
    fp32 (fp64) partial buffers dw [splits, C_out, C_in_g, kH, kW] and db [splits, C_out] that the
    host sums over splits (deterministic, unlike atomics). The bias gradient is written by the
    programs of column 0 (the only column when not COMPUTE_W)."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid_k = tl.program_id(0)
    pid_o = tl.program_id(1)
    pid_z = tl.program_id(2).to(tl.int64)
    group = pid_z % GROUPS
    split = pid_z // GROUPS

    offs_o = pid_o * BLOCK_N + tl.arange(0, BLOCK_N)
    o_mask = offs_o < C_OUT_G
    chan_o = group * C_OUT_G + offs_o
    c_blocks = tl.cdiv(C_IN_G, BLOCK_K)
    tap = pid_k // c_blocks
    kh = tap // KW
    kw = tap - kh * KW
    c = (pid_k - tap * c_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    c_ok = c < C_IN_G
    x_chan = x_ptr + group * C_IN_G * sx_c + c.to(tl.int64) * sx_c  # [BLOCK_K] pointers
    g_chan = gy_ptr + chan_o * sg_c  # [BLOCK_N] pointers
    s_chan = s_ptr + chan_o * ss_c
    h_off = kh * DIL_H - PAD_TOP
    w_off = kw * DIL_W - PAD_LEFT

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    bias_acc = tl.zeros((BLOCK_N,), dtype=ACC)
    m_start = split * M_PER_SPLIT
    m_end = tl.minimum(m_start + M_PER_SPLIT, M)
    for it in range(0, tl.cdiv(M_PER_SPLIT, BLOCK_M)):
        offs_m = m_start + it * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        n, oh, ow = _split_rows(m_start + it * BLOCK_M, BLOCK_M, H_OUT, W_OUT)
        # dz tile, transposed: [BLOCK_N channels, BLOCK_M positions]
        g_mask = o_mask[:, None] & m_mask[None, :]
        g = tl.load(g_chan[:, None] + (n * sg_n + oh * sg_h + ow * sg_w)[None, :], mask=g_mask, other=0.0)
        if ACTIVATION != "none":
            s = tl.load(s_chan[:, None] + (n * ss_n + oh * ss_h + ow * ss_w)[None, :], mask=g_mask, other=0.0)
            g = activation_grad_from_saved(s.to(ACC), g.to(ACC), ACTIVATION)
        if COMPUTE_B:
            bias_acc += tl.sum(g.to(ACC), axis=1)
        if COMPUTE_W:
            ih = oh * STRIDE_H + h_off
            iw = ow * STRIDE_W + w_off
            row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_chan[None, :] + (n * sx_n + ih * sx_h + iw * sx_w)[:, None],
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            acc = tl.dot(g.to(x_ptr.dtype.element_ty), a, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)

    if COMPUTE_W:
        # partial dw is contiguous [splits, C_out, C_in_g, kH, kW]
        w_col = c * (KH * KW) + tap
        dw_offs = split * C_OUT * K_TOTAL + (chan_o * K_TOTAL)[:, None] + w_col[None, :]
        tl.store(dw_ptr + dw_offs, acc.to(dw_ptr.dtype.element_ty), mask=o_mask[:, None] & c_ok[None, :])
    if COMPUTE_B:
        if pid_k == 0:
            tl.store(db_ptr + split * C_OUT + chan_o, bias_acc.to(db_ptr.dtype.element_ty), mask=o_mask)


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


# --------------------------------------------------------------------------- registration
def _conv_case(name, n, c_in, c_out, hw, k, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1,
               act=None, bias=True, channels_last=False):
    def make(dtype, device):
        fan_in = c_in // groups * k[0] * k[1]
        x = torch.randn(n, c_in, *hw, device=device).to(dtype)
        # Kaiming-like scale keeps outputs O(1), so TF32 / half-precision errors stay relative.
        w = (torch.randn(c_out, c_in // groups, *k, device=device) / math.sqrt(fan_in)).to(dtype)
        b = torch.randn(c_out, device=device).to(dtype).requires_grad_() if bias else None
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
            w = w.to(memory_format=torch.channels_last)
        return (x.requires_grad_(), w.requires_grad_(), b, stride, padding, dilation, groups, act)

    return Case(name, make)


def _out_hw(args):
    x, w, _, stride, padding, dilation = args[:6]
    return (_out_size(x.shape[2], padding[0], padding[1], dilation[0], w.shape[2], stride[0]),
            _out_size(x.shape[3], padding[2], padding[3], dilation[1], w.shape[3], stride[1]))


def _flops(args):
    x, w = args[0], args[1]
    h_out, w_out = _out_hw(args)
    return 2.0 * x.shape[0] * w.shape[0] * h_out * w_out * w.shape[1] * w.shape[2] * w.shape[3]


def _bytes_moved(args):
    x, w, b = args[0], args[1], args[2]
    h_out, w_out = _out_hw(args)
    out = x.shape[0] * w.shape[0] * h_out * w_out
    return (x.numel() + w.numel() + (b.numel() if b is not None else 0) + out) * x.element_size()


def _variant(kernel, label, config, dtype, constexprs, acc_ptrs=()):
    """A CompileVariant of `kernel` (an Autotuner) with one of its configs: pointers of `dtype`
    except `acc_ptrs` (fp32 partial buffers), every integer argument i32."""
    fn = kernel.fn
    constexprs = {**constexprs, **config.kwargs}
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in acc_ptrs else triton_dtype(dtype)
        else:
            signature[arg] = "i32"
    blocks = "x".join(str(config.kwargs[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    name = f"{label}-{str(dtype).split('.')[-1]}-{blocks}-w{config.num_warps}s{config.num_stages}"
    return CompileVariant(name, fn, signature, constexprs, config.num_warps, config.num_stages)


def _compile_variants():
    variants = []
    for dtype in (torch.float32, torch.bfloat16):
        precision = "tf32" if dtype == torch.float32 else "ieee"
        # fp32 variants compile the relu epilogue, bf16 ones the heaviest (gelu, storing z).
        act = "relu" if dtype == torch.float32 else "gelu"
        common = {"KH": 3, "KW": 3, "ACTIVATION": act, "INPUT_PRECISION": precision}
        for config in _FWD_CONFIGS:
            variants.append(_variant(_conv2d_fwd_kernel, "fwd", config, dtype,
                                     {**common, "HAS_BIAS": True, "STORE_Z": act == "gelu"}))
        for config in _DGRAD_CONFIGS:
            variants.append(_variant(_conv2d_dgrad_kernel, "dgrad", config, dtype,
                                     {**common, "HAS_BIAS": False, "OUT_ACTIVATION": "none", "STORE_Z": False}))
        for config in _WGRAD_CONFIGS:
            variants.append(_variant(_conv2d_wgrad_kernel, "wgrad", config, dtype,
                                     {**common, "COMPUTE_W": True, "COMPUTE_B": True}, acc_ptrs=("dw_ptr", "db_ptr")))
    return variants


def _resnet_case(name, n, c, hw):
    def make(dtype, device):
        x = torch.randn(n, c, hw, hw, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        w = (torch.randn(c, c, 3, 3, device=device) / math.sqrt(9 * c)).to(dtype).to(memory_format=torch.channels_last)
        b = torch.randn(c, device=device, dtype=dtype)
        return (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), (1, 1), (1, 1, 1, 1), (1, 1), 1, "relu")

    return Case(name, make)


SPEC = register(KernelSpec(
    op="conv2d",
    triton=conv2d,
    unsupported=unsupported,
    cases=[
        _conv_case("regular_3x3_relu", 2, 4, 8, (8, 8), (3, 3), padding=(1, 1, 1, 1), act="relu"),
        _conv_case("ragged_stride2_dilation2_leaky", 2, 3, 5, (7, 9), (3, 3), stride=(2, 2), padding=(1, 2, 2, 1),
                   dilation=(2, 2), act="leaky_relu"),
        _conv_case("same_2x2_asymmetric_tanh_nobias", 1, 3, 5, (5, 7), (2, 2), padding=(0, 1, 0, 1), act="tanh",
                   bias=False),
        _conv_case("groups2_channels_last_sigmoid", 2, 4, 6, (6, 5), (3, 1), stride=(2, 1), padding=(1, 1, 0, 0),
                   groups=2, act="sigmoid", channels_last=True),
        _conv_case("rect_1x3_stride_w2_gelu", 1, 5, 3, (6, 10), (1, 3), stride=(1, 2), padding=(0, 0, 1, 1),
                   act="gelu"),
        _conv_case("depthwise_no_activation", 2, 3, 6, (5, 5), (3, 3), padding=(1, 1, 1, 1), groups=3),
    ],
    gradcheck_case=_conv_case("gradcheck_gelu", 1, 2, 3, (5, 4), (3, 3), stride=(2, 1), padding=(1, 0, 1, 1),
                              dilation=(1, 2), act="gelu"),
    # fp32 through the interpreter is IEEE (the cases need 4e-7); on GPUs fp32 runs on TF32 tensor
    # cores, as F.conv2d does by default (cudnn.allow_tf32): 10-bit products.
    tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)},
    gpu_tolerances={torch.float32: (5e-3, 5e-3)},
    # Several programs along M, several K steps in every kernel, under each config.
    tuning_cases=[_conv_case("tuning_2x8x16_12x12_gelu", 2, 8, 16, (12, 12), (3, 3), padding=(1, 1, 1, 1),
                             act="gelu")],
    compile_variants=_compile_variants,
    bench_cases=[
        _resnet_case("resnet_c64_56x56", 32, 64, 56),
        _resnet_case("resnet_c128_28x28", 32, 128, 28),
        _resnet_case("resnet_c256_14x14", 32, 256, 14),
        _resnet_case("resnet_c512_7x7", 32, 512, 7),
    ],
    flops=_flops,
    bytes_moved=_bytes_moved,
    description="implicit-GEMM conv2d with fused bias + activation; dgrad/wgrad implicit GEMMs, "
                "bias grad fused in wgrad",
))
