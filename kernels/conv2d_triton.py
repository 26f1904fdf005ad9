"""The Triton kernels of the convolution family (conv2d and conv_transpose2d): three implicit GEMMs
(forward, input gradient "dgrad", weight gradient "wgrad") and two elementwise/reduction passes
(the activation gradient and the bias gradient), with their tile tables.

Per group g (C_in_g = C_in / groups, C_out_g = C_out / groups), with no im2col buffer anywhere
(every operand tile is gathered from the tensors, any strides, on the fly):
    forward  y[m, o]  = act(sum_k  X[m, k] * W[k, o] + b[o])   m = (n, oh, ow), k = (kh, kw, c)
    dz       dz[m, o] = dy[m, o] * act'(saved[m, o])            one elementwise pass, before the GEMMs
    dgrad    dx[p, c] = sum_k' dZ[p, k'] * W[k', c]            p = (n, ih, iw), k' = (kh, kw, o)
    wgrad    dw[o, k] = sum_m  dz[m, o] * X[m, k]              m split over programs when the tiles are few
    bias     db[o]    = sum_m  dz[m, o]                        a column reduction
where X[m, k] = x[n, c, oh * sH - top + kh * dH, ow * sW - left + kw * dW] (0 in the padding).

Why it is shaped this way (the hot loop is what the audit's model reads: tensor-core cycles against
the instructions a warp issues per K step):
- The K loop walks (kh, kw, channel block) with the channel innermost, so channels_last operands
  load as contiguous vectors. The loop position is three loop-carried scalars advanced by compare
  and select: no division by a run-time value anywhere in a loop.
- Strides and dilations are constexprs (a model has a handful of them; each compiles once), so the
  only arithmetic that depends on them is by constants. Each row's coordinates are split once per
  tile, outside the loop; per K step a row costs an add per axis, a range check per axis and one
  address add.
- The activation gradient is applied once per element by `_activation_grad_kernel` before dgrad
  and wgrad (inside the GEMM loop it would be recomputed kH * kW times per element, from a second
  load stream); the bias gradient is `_bias_grad_kernel`, out of the wgrad loop too.
- dgrad with stride s is s_h * s_w sub-convolutions, one per phase (ih mod s_h, iw mod s_w): every
  input row of a phase meets the output grid at the same taps, so a program loops over only the
  taps that land (a scalar property of the phase) and reads output row oh = j + q(tap), with q a
  scalar; no tap is masked for missing the stride grid.
fp32 uses TF32 tensor cores while torch.backends.cudnn.allow_tf32 says so (as F.conv2d), exact fp32
otherwise; fp64 (gradcheck) accumulates in fp64, everything else in fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gpudl.kernels._common import activation_grad_from_saved, apply_activation, gemm_tile, tuning_configs


def half_precision_only(config: triton.Config) -> triton.Config:
    """Marks a tile as a candidate for 16-bit operands only (`for_operands` leaves it out for fp32)."""
    config.half_precision_only = True
    return config


def for_operands(configs, dtype) -> list:
    """The candidates of a tile table for operands of `dtype`."""
    wide = dtype in (torch.float32, torch.float64)
    return [c for c in configs if not (wide and getattr(c, "half_precision_only", False))]


def _prune_by_operand_dtype(configs, named_args, **kwargs):
    """The autotuner's early prune: `for_operands` of the launch's operand dtype (its first pointer)."""
    first = next(v for k, v in named_args.items() if k.endswith("_ptr"))
    return for_operands(configs, first.dtype) or configs[:1]


# The first tile of each table is the one the interpreter runs. The others are the GPU candidates
# (the shapes of Triton's matmul tutorial), each within sm_80's shared memory in fp32 too and free of
# spills for the operands it is a candidate for (`for_operands`; the compile check and the audit,
# bench_results/audit/).
FWD_TILES = [
    gemm_tile(128, 64, 32, warps=4, stages=3),
    gemm_tile(128, 128, 32, warps=8, stages=3),
    gemm_tile(128, 64, 64, warps=8, stages=3),
    gemm_tile(64, 128, 32, warps=4, stages=4),
    gemm_tile(256, 64, 32, warps=8, stages=3),
]
DGRAD_TILES = [
    # 16-bit operands only (and the interpreter's): with fp32 (TF32) operands it spills on sm_80
    # (the audit); fp32 runs 128x64x64 on 8 warps for the same output tile.
    half_precision_only(gemm_tile(128, 64, 32, warps=4, stages=3)),
    gemm_tile(128, 128, 32, warps=8, stages=3),
    gemm_tile(128, 64, 64, warps=8, stages=3),
    gemm_tile(64, 128, 32, warps=4, stages=4),
    gemm_tile(256, 64, 32, warps=8, stages=3),
]
# wgrad: BLOCK_M output channels x BLOCK_N input channels of one tap, BLOCK_K rows per K step.
# Its rows cost more per K step than a GEMM's (coordinates, masks and two offsets per row), so its
# tiles are the wide ones, whose modeled tensor-core bound matches a plain GEMM's; 64-wide tiles
# model at 0.5-0.7x of it (hot-loop counts in docs/kernels/convolution.md).
WGRAD_TILES = [
    gemm_tile(128, 128, 32, warps=8, stages=3),
    # 16-bit operands only: with fp32 (TF32) operands its 128 fp32 accumulators a thread beside the
    # fp32 operand fragments spill on sm_80 (the audit); fp32 runs the 8-warp tile above instead.
    half_precision_only(gemm_tile(128, 128, 32, warps=4, stages=3)),
    gemm_tile(128, 128, 64, warps=8, stages=2),
    gemm_tile(256, 128, 32, warps=8, stages=3),
    gemm_tile(128, 256, 32, warps=8, stages=3),
]
# What the interpreter runs for wgrad: its K is every output pixel of the batch and its output tile
# is channels, so the GPU's 128x128x32 tiles cost a CPU run mostly masked lanes and many K steps
# (7x this tile's time on a 28x28 batch of 2 with 4 -> 8 channels).
WGRAD_INTERPRETER_TILE = gemm_tile(32, 32, 128, warps=4, stages=1)


def direct_tile(block_m: int, block_n: int, warps: int) -> triton.Config:
    """One candidate of a kernel that accumulates on CUDA cores (no K dimension): BLOCK_M rows by
    BLOCK_N channels."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=1)


# Depthwise dgrad (C_in / groups = 1): BLOCK_M input positions x BLOCK_N channels (one per group),
# channels innermost so that a channels_last row loads as one vector (64 bf16 channels = 128 bytes).
# Not autotuned: memory-bound, so the launch picks the widest channel tile the groups fill
# (`depthwise_dgrad_tile`), 2048 accumulators a program.
DEPTHWISE_DGRAD_TILES = [
    direct_tile(16, 128, warps=4),
    direct_tile(32, 64, warps=4),
    direct_tile(64, 32, warps=4),
    direct_tile(128, 16, warps=4),
]


def depthwise_dgrad_tile(groups: int) -> triton.Config:
    """The widest channel tile of DEPTHWISE_DGRAD_TILES that `groups` channels fill (else the narrowest)."""
    for config in DEPTHWISE_DGRAD_TILES:
        if config.kwargs["BLOCK_N"] <= groups:
            return config
    return DEPTHWISE_DGRAD_TILES[-1]


# The elementwise activation-gradient pass and the bias-gradient reduction (memory-bound, one config).
ACT_GRAD_BLOCK = 1024
BIAS_GRAD_ROWS, BIAS_GRAD_CHANNELS = 64, 64

# CUDA caps grid dims y and z at 65535; the group (times phase, or times wgrad split) index lives on z.
MAX_GRID_Z = 65535


@triton.jit
def _split_rows(start, BLOCK: tl.constexpr, H, W):
    """(n, h, w), int32 vectors, of the BLOCK rows start, start + 1, ... of an [N, H, W] grid. The
    int64 start is split in scalar arithmetic; the rows' own divisions are int32 and run once per
    tile, never inside a K loop."""
    w0 = (start % W).to(tl.int32)
    t = start // W
    h0 = (t % H).to(tl.int32)
    n0 = (t // H).to(tl.int32)
    r = w0 + tl.arange(0, BLOCK)
    carry_w = r // W
    r2 = h0 + carry_w
    carry_h = r2 // H
    return n0 + carry_h, r2 - carry_h * H, r - carry_w * W


@triton.jit
def _in_range(i, size):
    """0 <= i < size for an int32 vector i, as one unsigned compare."""
    return i.to(tl.uint32, bitcast=True) < size.to(tl.uint32)


@triton.autotune(configs=tuning_configs(FWD_TILES), key=["M", "C_IN_G", "C_OUT_G", "K_TOTAL"])
@triton.jit
def _conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr,
    C_IN_G, H, W, C_OUT_G, H_OUT, W_OUT, M, K_TOTAL,
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_c, sw_h, sw_w,
    sy_n, sy_c, sy_h, sy_w,
    PAD_TOP, PAD_LEFT,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, INDEX_64: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M output positions, BLOCK_N output channels] tile of y (and of z = the
    pre-activation, when STORE_Z), for group program_id(2). M = N * H_out * W_out,
    K_TOTAL = kH * kW * C_in_g (the autotuner's key)."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    IDX: tl.constexpr = tl.int64 if INDEX_64 else tl.int32  # element offsets (int64 past 2**31)
    pid_m = tl.program_id(0).to(IDX)
    pid_n = tl.program_id(1)
    group = tl.program_id(2).to(IDX)

    # Once per tile: the rows' coordinates, their tap-(0, 0) input position and address.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n, oh, ow = _split_rows(pid_m * BLOCK_M, BLOCK_M, H_OUT, W_OUT)
    ih0 = oh * STRIDE_H - PAD_TOP
    iw0 = ow * STRIDE_W - PAD_LEFT
    x_rows = (x_ptr + group * C_IN_G * sx_c + n.to(IDX) * sx_n + ih0.to(IDX) * sx_h
              + iw0.to(IDX) * sx_w)  # may point into the padding: only read under row masks

    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = offs_o < C_OUT_G
    chan_o = group * C_OUT_G + offs_o
    w_cols = w_ptr + chan_o * sw_o
    offs_c = tl.arange(0, BLOCK_K)

    # The K loop: (kh, kw, c0) advance as an odometer, the channel block fastest.
    c0 = tl.program_id(1) * 0
    kh = c0
    kw = c0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for _ in range(KH * KW * tl.cdiv(C_IN_G, BLOCK_K)):
        row_ok = m_ok & _in_range(ih0 + kh * DIL_H, H) & _in_range(iw0 + kw * DIL_W, W)
        c = c0 + offs_c
        c_ok = c < C_IN_G
        x_tap = (kh * DIL_H).to(IDX) * sx_h + (kw * DIL_W).to(IDX) * sx_w
        a = tl.load(x_rows[:, None] + (x_tap + c.to(IDX) * sx_c)[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        w_tap = kh * sw_h + kw * sw_w
        b = tl.load(w_cols[None, :] + (w_tap + c * sw_c)[:, None], mask=c_ok[:, None] & o_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
        c0 += BLOCK_K
        next_tap = c0 >= C_IN_G
        c0 = tl.where(next_tap, 0, c0)
        kw += tl.where(next_tap, 1, 0)
        next_row = kw == KW
        kw = tl.where(next_row, 0, kw)
        kh += tl.where(next_row, 1, 0)

    if HAS_BIAS:
        acc += tl.load(b_ptr + chan_o, mask=o_ok, other=0.0).to(ACC)[None, :]
    y_rows = n.to(IDX) * sy_n + oh.to(IDX) * sy_h + ow.to(IDX) * sy_w
    y_offs = y_rows[:, None] + (chan_o * sy_c)[None, :]
    y_mask = m_ok[:, None] & o_ok[None, :]
    if STORE_Z:
        tl.store(z_ptr + y_offs, acc.to(z_ptr.dtype.element_ty), mask=y_mask)
    out = apply_activation(acc, ACTIVATION)
    tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=y_mask)


def tap_steps(stride, dilation) -> dict:
    """The dgrad kernels' tap constexprs per axis: TAP_STEP = s / gcd(s, d) (the taps a phase takes
    are TAP_STEP apart) and TAP_INV, the inverse of d / gcd(s, d) modulo TAP_STEP (0 when TAP_STEP is 1)."""
    out = {}
    for axis, s, d in (("H", stride[0], dilation[0]), ("W", stride[1], dilation[1])):
        step = s // math.gcd(s, d)
        out[f"TAP_STEP_{axis}"] = step
        out[f"TAP_INV_{axis}"] = pow(d // math.gcd(s, d), -1, step) if step > 1 else 0
    return out


@triton.jit
def _first_tap(PHASE_OFFSET, K: tl.constexpr, STRIDE: tl.constexpr, STEP: tl.constexpr, INV: tl.constexpr):
    """The smallest tap k in [0, K) with k * DIL = PHASE_OFFSET (mod STRIDE), or K if none, for a
    PHASE_OFFSET >= 0. With g = gcd(STRIDE, DIL) = STRIDE / STEP: a tap exists when g divides the
    offset, and k = (PHASE_OFFSET / g) * INV mod STEP (INV = (DIL / g)^-1 mod STEP, `tap_steps`).
    Closed form: the former chain of selects over the K taps left a 2-byte local array in the
    stride-2 dgrad's PTX, an unused 8-byte stack frame on sm_90 (the audit counts it as a spill)."""
    G: tl.constexpr = STRIDE // STEP
    k0 = (PHASE_OFFSET // G * INV) % STEP
    return tl.where((PHASE_OFFSET % G == 0) & (k0 < K), k0, K)


@triton.autotune(configs=tuning_configs(DGRAD_TILES), key=["M_PHASE", "C_IN_G", "C_OUT_G", "K_TOTAL"],
                 prune_configs_by={"early_config_prune": _prune_by_operand_dtype})
@triton.jit
def _conv2d_dgrad_kernel(
    gz_ptr, w_ptr, dx_ptr, b_ptr, z_ptr,
    C_IN_G, H, W, C_OUT_G, H_OUT, W_OUT, H_PHASE, W_PHASE, M_PHASE, K_TOTAL,
    sg_n, sg_c, sg_h, sg_w,
    sw_o, sw_c, sw_h, sw_w,
    sd_n, sd_c, sd_h, sd_w,
    PAD_TOP, PAD_LEFT,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    TAP_STEP_H: tl.constexpr, TAP_STEP_W: tl.constexpr, TAP_INV_H: tl.constexpr, TAP_INV_W: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, INDEX_64: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M input positions, BLOCK_N input channels] tile of dx = the convolution of gz
    (the pre-activation gradient dz) with the flipped kernel, for group program_id(2) // (sH * sW)
    and phase program_id(2) % (sH * sW) = (ph, pw): the input rows ih = ph + sH * j, iw = pw + sW * i,
    j < H_PHASE = ceil(H / sH), i < W_PHASE; M_PHASE = N * H_PHASE * W_PHASE.
    Row ih takes tap kh exactly when (ih + top - kh * dH) is a multiple of sH, which for a phase
    holds for kh = kh0, kh0 + TAP_STEP_H, ... (TAP_STEP_H = sH / gcd(sH, dH)), reading output row
    oh = j + (ph + top - kh * dH) / sH. With bias, ACTIVATION and STORE_Z this kernel is also a
    transposed convolution's forward (conv2d's own dgrad uses none of them)."""
    ACC: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    PHASES: tl.constexpr = STRIDE_H * STRIDE_W
    OH_STEP: tl.constexpr = TAP_STEP_H * DIL_H // STRIDE_H  # oh decrease per tap step (exact)
    OW_STEP: tl.constexpr = TAP_STEP_W * DIL_W // STRIDE_W
    IDX: tl.constexpr = tl.int64 if INDEX_64 else tl.int32  # element offsets (int64 past 2**31)
    pid_m = tl.program_id(0).to(IDX)
    pid_n = tl.program_id(1)
    group = (tl.program_id(2) // PHASES).to(IDX)
    phase = tl.program_id(2) % PHASES
    ph = phase // STRIDE_W
    pw = phase % STRIDE_W

    # The taps this phase takes: kh = kh0 + th * TAP_STEP_H for th < n_th (and likewise kw).
    kh0 = _first_tap(ph + PAD_TOP, KH, STRIDE_H, TAP_STEP_H, TAP_INV_H)
    kw0 = _first_tap(pw + PAD_LEFT, KW, STRIDE_W, TAP_STEP_W, TAP_INV_W)
    n_th = (KH - kh0 + TAP_STEP_H - 1) // TAP_STEP_H
    n_tw = (KW - kw0 + TAP_STEP_W - 1) // TAP_STEP_W
    q_h0 = (ph + PAD_TOP - kh0 * DIL_H) // STRIDE_H  # oh - j at tap kh0 (an exact division)
    q_w0 = (pw + PAD_LEFT - kw0 * DIL_W) // STRIDE_W

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n, j, i = _split_rows(pid_m * BLOCK_M, BLOCK_M, H_PHASE, W_PHASE)
    ih = ph + STRIDE_H * j
    iw = pw + STRIDE_W * i
    m_ok = (offs_m < M_PHASE) & (ih < H) & (iw < W)
    g_rows = (gz_ptr + group * C_OUT_G * sg_c + n.to(IDX) * sg_n + j.to(IDX) * sg_h
              + i.to(IDX) * sg_w)  # output row (j, i): the tap's scalar offset is added per K step
    # The epilogue's row offsets, made here so that n, ih, iw are dead in the K loop.
    dx_rows = n.to(IDX) * sd_n + ih.to(IDX) * sd_h + iw.to(IDX) * sd_w

    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = offs_c < C_IN_G
    w_cols = w_ptr + group * C_OUT_G * sw_o + offs_c.to(IDX) * sw_c
    offs_k = tl.arange(0, BLOCK_K)

    # The K loop over (th, tw, o0), an odometer as in the forward.
    o0 = tl.program_id(1) * 0
    th = o0
    tw = o0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for _ in range(n_th * n_tw * tl.cdiv(C_OUT_G, BLOCK_K)):
        q_h = q_h0 - th * OH_STEP
        q_w = q_w0 - tw * OW_STEP
        row_ok = m_ok & _in_range(j + q_h, H_OUT) & _in_range(i + q_w, W_OUT)
        o = o0 + offs_k
        o_ok = o < C_OUT_G
        g_tap = q_h.to(IDX) * sg_h + q_w.to(IDX) * sg_w
        g = tl.load(g_rows[:, None] + (g_tap + o.to(IDX) * sg_c)[None, :],
                    mask=row_ok[:, None] & o_ok[None, :], other=0.0)
        w_tap = (kh0 + th * TAP_STEP_H) * sw_h + (kw0 + tw * TAP_STEP_W) * sw_w
        b = tl.load(w_cols[None, :] + (w_tap + o * sw_o)[:, None], mask=o_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(g, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
        o0 += BLOCK_K
        next_tap = o0 >= C_OUT_G
        o0 = tl.where(next_tap, 0, o0)
        tw += tl.where(next_tap, 1, 0)
        next_row = tw == n_tw
        tw = tl.where(next_row, 0, tw)
        th += tl.where(next_row, 1, 0)

    chan_c = group * C_IN_G + offs_c
    if HAS_BIAS:
        acc += tl.load(b_ptr + chan_c, mask=c_ok, other=0.0).to(ACC)[None, :]
    dx_offs = dx_rows[:, None] + (chan_c * sd_c)[None, :]
    dx_mask = m_ok[:, None] & c_ok[None, :]
    out = apply_activation(acc, ACTIVATION).to(dx_ptr.dtype.element_ty)
    if STORE_Z:
        tl.store(z_ptr + dx_offs, acc.to(z_ptr.dtype.element_ty), mask=dx_mask)
    tl.store(dx_ptr + dx_offs, out, mask=dx_mask)


@triton.jit
def _conv2d_dgrad_depthwise_kernel(
    gz_ptr, w_ptr, dx_ptr, b_ptr, z_ptr,
    GROUPS, H, W, H_OUT, W_OUT, H_PHASE, W_PHASE, M_PHASE,
    sg_n, sg_c, sg_h, sg_w,
    sw_o, sw_c, sw_h, sw_w,
    sd_n, sd_c, sd_h, sd_w,
    PAD_TOP, PAD_LEFT,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    TAP_STEP_H: tl.constexpr, TAP_STEP_W: tl.constexpr, TAP_INV_H: tl.constexpr, TAP_INV_W: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, C_OUT_G: tl.constexpr, INDEX_64: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dgrad when every group has one input channel (C_in_g = 1: depthwise and channel-multiplier
    convolutions). Per group the implicit GEMM would have N = 1, a GEMV padded to a tensor-core
    tile, so this kernel is no GEMM: input channel c = group reads its own C_OUT_G output channels,
        dx[p, c] = sum over taps, j < C_OUT_G of  gz[p + tap, c * C_OUT_G + j] * w[c * C_OUT_G + j, 0, tap]
    accumulated on CUDA cores in a [BLOCK_M input positions, BLOCK_N channels] tile (channels
    innermost: a channels_last gz row is one vector load, and each weight value serves BLOCK_M
    positions). C_OUT_G (the channel multiplier, 1 for a depthwise convolution) is a constexpr, so
    the channel offsets are multiples of a constant and the loads of a multiplier-1 layer vectorize.
    Strides use the phases of `_conv2d_dgrad_kernel`: phase program_id(2) = (ph, pw) takes the taps
    kh0 + th * TAP_STEP_H (a scalar property), so no tap is masked for missing the stride grid.
    Addresses are element offsets (int32 unless INDEX_64) added to the base pointer at each access.
    bias / ACTIVATION / STORE_Z: the transposed convolution's epilogue, as in `_conv2d_dgrad_kernel`."""
    ACC: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    OH_STEP: tl.constexpr = TAP_STEP_H * DIL_H // STRIDE_H
    OW_STEP: tl.constexpr = TAP_STEP_W * DIL_W // STRIDE_W
    IDX: tl.constexpr = tl.int64 if INDEX_64 else tl.int32
    pid_m = tl.program_id(0).to(IDX)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    ph = phase // STRIDE_W
    pw = phase % STRIDE_W

    kh0 = _first_tap(ph + PAD_TOP, KH, STRIDE_H, TAP_STEP_H, TAP_INV_H)
    kw0 = _first_tap(pw + PAD_LEFT, KW, STRIDE_W, TAP_STEP_W, TAP_INV_W)
    n_th = (KH - kh0 + TAP_STEP_H - 1) // TAP_STEP_H
    n_tw = (KW - kw0 + TAP_STEP_W - 1) // TAP_STEP_W
    q_h0 = (ph + PAD_TOP - kh0 * DIL_H) // STRIDE_H
    q_w0 = (pw + PAD_LEFT - kw0 * DIL_W) // STRIDE_W

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n, j, i = _split_rows(pid_m * BLOCK_M, BLOCK_M, H_PHASE, W_PHASE)
    m_ok = (offs_m < M_PHASE) & (STRIDE_H * j < H - ph) & (STRIDE_W * i < W - pw)
    g_rows = n.to(IDX) * sg_n + j.to(IDX) * sg_h + i.to(IDX) * sg_w

    chan = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = chan < GROUPS
    g_cols = (chan * C_OUT_G).to(IDX) * sg_c  # the group's first output channel
    w_cols = (chan * C_OUT_G).to(IDX) * sw_o

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for th in range(n_th):
        q_h = q_h0 - th * OH_STEP
        h_ok = m_ok & _in_range(j + q_h, H_OUT)
        w_tap_h = (kh0 + th * TAP_STEP_H) * sw_h
        for tw in range(n_tw):
            q_w = q_w0 - tw * OW_STEP
            row_ok = h_ok & _in_range(i + q_w, W_OUT)
            g_tap = q_h.to(IDX) * sg_h + q_w.to(IDX) * sg_w
            w_tap = w_tap_h + (kw0 + tw * TAP_STEP_W) * sw_w
            for o in tl.static_range(C_OUT_G):
                g = tl.load(gz_ptr + (g_rows + g_tap)[:, None] + (g_cols + o * sg_c)[None, :],
                            mask=row_ok[:, None] & c_ok[None, :], other=0.0)
                wv = tl.load(w_ptr + w_cols + (w_tap + o * sw_o), mask=c_ok, other=0.0)
                acc += g.to(ACC) * wv.to(ACC)[None, :]

    chan_off = chan.to(IDX) * sd_c
    if HAS_BIAS:
        acc += tl.load(b_ptr + chan, mask=c_ok, other=0.0).to(ACC)[None, :]
    dx_rows = n.to(IDX) * sd_n + (ph + STRIDE_H * j).to(IDX) * sd_h + (pw + STRIDE_W * i).to(IDX) * sd_w
    dx_mask = m_ok[:, None] & c_ok[None, :]
    if STORE_Z:
        tl.store(z_ptr + dx_rows[:, None] + chan_off[None, :], acc.to(z_ptr.dtype.element_ty), mask=dx_mask)
    acc = apply_activation(acc, ACTIVATION)
    tl.store(dx_ptr + dx_rows[:, None] + chan_off[None, :], acc.to(dx_ptr.dtype.element_ty), mask=dx_mask)


@triton.autotune(configs=tuning_configs(WGRAD_TILES, interpreter=WGRAD_INTERPRETER_TILE),
                 key=["M", "C_IN_G", "C_OUT_G", "K_TOTAL", "M_PER_SPLIT"],
                 prune_configs_by={"early_config_prune": _prune_by_operand_dtype})
@triton.jit
def _conv2d_wgrad_kernel(
    gz_ptr, x_ptr, dw_ptr,
    C_IN_G, H, W, C_OUT_G, H_OUT, W_OUT, M, K_TOTAL, C_OUT, GROUPS, M_PER_SPLIT,
    sg_n, sg_c, sg_h, sg_w,
    sx_n, sx_c, sx_h, sx_w,
    PAD_TOP, PAD_LEFT,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, INDEX_64: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_K output channels, BLOCK_M input channels] tile of the weight gradient at one
    tap (program_id(0) = tap * channel blocks + channel block), summed over the rows m in
    [split * M_PER_SPLIT, (split + 1) * M_PER_SPLIT) of split program_id(2) // GROUPS. dw is
    [splits, C_out, C_in_g, kH, kW], contiguous: the weight gradient itself when there is one split,
    else fp32 (fp64) partials the host sums in a fixed order (deterministic, unlike atomics).
    The rows' coordinates advance by BLOCK_K per K step with carries, never divided."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    IDX: tl.constexpr = tl.int64 if INDEX_64 else tl.int32  # element offsets (int64 past 2**31)
    pid_k = tl.program_id(0)
    pid_o = tl.program_id(1)
    pid_z = tl.program_id(2).to(IDX)
    group = pid_z % GROUPS
    split = pid_z // GROUPS

    offs_o = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ok = offs_o < C_OUT_G
    chan_o = group * C_OUT_G + offs_o
    c_blocks = tl.cdiv(C_IN_G, BLOCK_N)
    tap = pid_k // c_blocks
    kh = tap // KW
    kw = tap - kh * KW
    c = (pid_k - tap * c_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < C_IN_G
    # Element offsets (IDX) rather than pointers: half the registers through the K loop.
    x_chan = (group * C_IN_G + c).to(IDX) * sx_c  # [BLOCK_N]
    g_chan = chan_o.to(IDX) * sg_c  # [BLOCK_M]
    h_off = kh * DIL_H - PAD_TOP  # ih = oh * sH + h_off
    w_off = kw * DIL_W - PAD_LEFT

    # This tap reads x at ih = oh * sH + h_off, iw = ow * sW + w_off: inside x exactly for oh in
    # [lo_h, lo_h + count_h) and ow in [lo_w, lo_w + count_w) (scalars, once per program).
    lo_h = (tl.maximum(-h_off, 0) + STRIDE_H - 1) // STRIDE_H
    lo_w = (tl.maximum(-w_off, 0) + STRIDE_W - 1) // STRIDE_W
    count_h = tl.maximum(tl.where(H - 1 - h_off >= 0, (H - 1 - h_off) // STRIDE_H + 1, 0) - lo_h, 0)
    count_w = tl.maximum(tl.where(W - 1 - w_off >= 0, (W - 1 - w_off) // STRIDE_W + 1, 0) - lo_w, 0)
    x_chan += h_off * sx_h + w_off * sx_w  # the tap's offset: x at output row (0, 0), maybe before x
    xs_h = STRIDE_H * sx_h
    xs_w = STRIDE_W * sx_w

    m_start = split * M_PER_SPLIT
    m_end = tl.minimum(m_start + M_PER_SPLIT, M)
    offs_m = m_start + tl.arange(0, BLOCK_K)
    n, oh, ow = _split_rows(m_start, BLOCK_K, H_OUT, W_OUT)
    # BLOCK_K rows = step_n images + step_h rows + step_w columns of the output grid.
    step_w = BLOCK_K % W_OUT
    step_h = (BLOCK_K // W_OUT) % H_OUT
    step_n = BLOCK_K // (W_OUT * H_OUT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for _ in range(0, tl.cdiv(M_PER_SPLIT, BLOCK_K)):
        # Both tiles are loaded [channels, rows], so the rows' offsets and masks serve both.
        m_ok = offs_m < m_end
        g_rows = n.to(IDX) * sg_n + oh.to(IDX) * sg_h + ow.to(IDX) * sg_w
        g = tl.load(gz_ptr + (g_chan[:, None] + g_rows[None, :]), mask=o_ok[:, None] & m_ok[None, :], other=0.0)
        row_ok = m_ok & _in_range(oh - lo_h, count_h) & _in_range(ow - lo_w, count_w)
        x_rows = n.to(IDX) * sx_n + oh.to(IDX) * xs_h + ow.to(IDX) * xs_w
        xt = tl.load(x_ptr + (x_chan[:, None] + x_rows[None, :]), mask=c_ok[:, None] & row_ok[None, :], other=0.0)
        acc = tl.dot(g, tl.trans(xt), acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
        offs_m += BLOCK_K
        ow += step_w
        carry_w = ow >= W_OUT
        ow = tl.where(carry_w, ow - W_OUT, ow)
        oh += step_h + tl.where(carry_w, 1, 0)
        carry_h = oh >= H_OUT
        oh = tl.where(carry_h, oh - H_OUT, oh)
        n += step_n + tl.where(carry_h, 1, 0)

    dw_offs = split * C_OUT * K_TOTAL + (chan_o * K_TOTAL)[:, None] + (c * (KH * KW) + tap)[None, :]
    tl.store(dw_ptr + dw_offs, acc.to(dw_ptr.dtype.element_ty), mask=o_ok[:, None] & c_ok[None, :])


@triton.jit
def _activation_grad_kernel(
    g_ptr, s_ptr, out_ptr, NUMEL, C, H, W,
    sg_n, sg_c, sg_h, sg_w,
    ss_n, ss_c, ss_h, ss_w,
    ACTIVATION: tl.constexpr, SAME_DENSE_LAYOUT: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = g * act'(pre), from the saved output (or pre-activation for gelu); out has saved's
    (dense) strides. SAME_DENSE_LAYOUT: g has them too, and the pass is flat over memory; else g is
    any view (autograd hands an expanded one for y.sum()) and out follows saved's memory order."""
    ACC: tl.constexpr = tl.float64 if g_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    if SAME_DENSE_LAYOUT:
        g_offs = offs
        s_offs = offs
    else:
        w = offs % W
        h = (offs // W) % H
        c = (offs // (W * H)) % C
        n = offs // (W * H * C)
        g_offs = n * sg_n + c * sg_c + h * sg_h + w * sg_w
        s_offs = n * ss_n + c * ss_c + h * ss_h + w * ss_w
    g = tl.load(g_ptr + g_offs, mask=mask, other=0.0)
    s = tl.load(s_ptr + s_offs, mask=mask, other=0.0)
    dz = activation_grad_from_saved(s.to(ACC), g.to(ACC), ACTIVATION)
    tl.store(out_ptr + s_offs, dz.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_grad_kernel(
    g_ptr, db_ptr, C, H, W, M, M_PER_SPLIT,
    sg_n, sg_c, sg_h, sg_w,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """db[split, c] = sum over the rows m in [split * M_PER_SPLIT, (split + 1) * M_PER_SPLIT),
    m = (n, h, w), of g[n, c, h, w], for BLOCK_C channels; split = program_id(1). db is the bias
    gradient itself with one split, else fp32 (fp64) partials the host sums in a fixed order."""
    ACC: tl.constexpr = tl.float64 if g_ptr.dtype.element_ty == tl.float64 else tl.float32
    split = tl.program_id(1).to(tl.int64)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    m_start = split * M_PER_SPLIT
    m_end = tl.minimum(m_start + M_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for start in range(m_start, m_end, BLOCK_M):
        n, h, w = _split_rows(start, BLOCK_M, H, W)
        rows = n.to(tl.int64) * sg_n + h.to(tl.int64) * sg_h + w.to(tl.int64) * sg_w
        m_ok = start + tl.arange(0, BLOCK_M) < m_end
        acc += tl.load(g_ptr + rows[:, None] + (offs_c * sg_c)[None, :], mask=m_ok[:, None] & c_ok[None, :],
                       other=0.0).to(ACC)
    tl.store(db_ptr + split * C + offs_c, tl.sum(acc, axis=0).to(db_ptr.dtype.element_ty), mask=c_ok)
