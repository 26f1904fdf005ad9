"""The Triton kernels of the convolution family (conv2d, conv_transpose2d): implicit GEMMs,
forward and backward, their tile tables and the constexpr helpers.

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

import triton
import triton.language as tl

from gpudl.kernels._common import (
    activation_grad_from_saved,
    apply_activation,
    tuning_configs,
)

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


_ACT_GRAD_BLOCK = 1024


@triton.jit
def _activation_grad_kernel(
    g_ptr, s_ptr, out_ptr, NUMEL, C, H, W,
    sg_n, sg_c, sg_h, sg_w,
    ss_n, ss_c, ss_h, ss_w,
    so_n, so_c, so_h, so_w,
    ACTIVATION: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = g * act'(pre), from the saved output (or pre-activation for gelu), over [N, C, H, W]
    tensors of any strides (dy may be an expanded view)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    w = offs % W
    h = (offs // W) % H
    c = (offs // (W * H)) % C
    n = offs // (W * H * C)
    g = tl.load(g_ptr + n * sg_n + c * sg_c + h * sg_h + w * sg_w, mask=mask, other=0.0)
    s = tl.load(s_ptr + n * ss_n + c * ss_c + h * ss_h + w * ss_w, mask=mask, other=0.0)
    ACC: tl.constexpr = tl.float64 if g_ptr.dtype.element_ty == tl.float64 else tl.float32
    dz = activation_grad_from_saved(s.to(ACC), g.to(ACC), ACTIVATION)
    tl.store(out_ptr + n * so_n + c * so_c + h * so_h + w * so_w, dz.to(out_ptr.dtype.element_ty), mask=mask)
