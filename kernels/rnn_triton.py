"""The Elman RNN recurrence's Triton kernels: the whole sequence in one persistent launch.

    h_t = act(xproj_t + h_{t-1} @ W_hh^T + b_hh)   each program owns BLOCK_N batch rows, keeps h on
                                                   chip and loops over t (xproj = x W_ih^T + b_ih
                                                   comes from one GEMM before the launch)
Backward (BPTT), also one launch, looping t = L-1 .. 0 with dh carried on chip:
    dz_t     = (dh_t + dy_t) * act'(h_t)           tanh' = 1 - h_t^2, relu' = [h_t > 0], from the output
    dh_{t-1} = dz_t @ W_hh
and dz_t is stored for every t (the gradient of xproj; the weight gradients are GEMMs over it).

Two ways to multiply by W_hh each step, picked by the hidden size (launch_config):
  * resident (BLOCK_H <= 64): the [BLOCK_H, BLOCK_H] tile is loaded once and kept in registers
    and h never leaves the chip between steps;
  * chunked (larger H): a register-resident W_hh would spill, so each step streams W_hh in
    BLOCK_K-row chunks (from L2: every program reads the same matrix every step) and reads
    h_{t-1} back in matching chunks from the output it has just written (a CTA barrier makes
    the stores visible). The fp32 accumulator of h_t stays on chip.
ACTIVATION is the nonlinearity's name, "tanh" or "relu".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpudl.kernels._common import tanh

MAX_HIDDEN = 512  # beyond: the fp32 accumulator [BLOCK_N, BLOCK_H] and W chunks outgrow one CTA
RESIDENT_MAX_BLOCK_H = 64  # W_hh kept in registers up to this padded hidden size
BLOCK_N = 16  # batch rows per program: tl.dot's smallest M


# --------------------------------------------------------------------------- kernels
@triton.jit
def _rnn_forward_kernel(
    xp_ptr,  # [L, N, H] by strides (s_xt, s_xn, s_xh): x @ W_ih^T + b_ih
    h0_ptr,  # [N, H] contiguous
    w_ptr,  # W_hh^T [H, H] contiguous, transposed by the host: row-major chunks load as wide vectors
            # (read through W_hh's strides, fp32 H >= 128 spills: see the audit)
    b_ptr,  # b_hh [H] or a dummy when HAS_BIAS is False
    out_ptr,  # [L, N, H] by strides (s_ot, s_on, 1): every h_t
    hn_ptr,  # [N, H] contiguous: the last h_t (the host handles L == 0 without a launch)
    L, N, H,
    s_xt, s_xn, s_xh, s_ot, s_on,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "tanh" or "relu"
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for float64 inputs
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RESIDENT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    row_mask = rows < N
    col_mask = cols < H
    mask = row_mask[:, None] & col_mask[None, :]
    dot_dtype = w_ptr.dtype.element_ty

    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
    else:
        bias = tl.zeros([BLOCK_H], dtype=ACC_DTYPE)
    # Padded rows/columns stay exactly 0: zero input, zero weights, act(0) = 0 for tanh and relu.
    h = tl.load(h0_ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    # Row pointers advance by one time stride per step: 64-bit pointer arithmetic, where t * stride
    # in int32 could overflow on long sequences of large batches.
    x_row = xp_ptr + rows * s_xn
    o_row = out_ptr + rows * s_on
    prev_row = h0_ptr + rows * H  # where h_{t-1} lives: h0, then the output just written
    if RESIDENT:
        # W_hh^T, loaded once for all steps.
        w_t = tl.load(w_ptr + cols[:, None] * H + cols[None, :], mask=col_mask[:, None] & col_mask[None, :], other=0.0)

    for _ in range(0, L):
        xp = tl.load(x_row[:, None] + cols[None, :] * s_xh, mask=mask, other=0.0).to(ACC_DTYPE)
        if RESIDENT:
            acc = tl.dot(h.to(dot_dtype), w_t, out_dtype=ACC_DTYPE, input_precision="ieee")
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=ACC_DTYPE)
            for k in range(0, H, BLOCK_K):
                ks = k + tl.arange(0, BLOCK_K)
                k_mask = ks < H
                a = tl.load(prev_row[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                w_t = tl.load(w_ptr + ks[:, None] * H + cols[None, :], mask=k_mask[:, None] & col_mask[None, :],
                              other=0.0)
                acc += tl.dot(a.to(dot_dtype), w_t, out_dtype=ACC_DTYPE, input_precision="ieee")
        z = xp + acc + bias[None, :]
        if ACTIVATION == "tanh":
            h = tanh(z)
        else:
            h = tl.maximum(z, 0.0)
        tl.store(o_row[:, None] + cols[None, :], h.to(out_ptr.dtype.element_ty), mask=mask)
        if not RESIDENT:
            tl.debug_barrier()  # the next step reads h_t back, written by other threads of this CTA
        prev_row = o_row
        x_row += s_xt
        o_row += s_ot
    tl.store(hn_ptr + rows[:, None] * H + cols[None, :], h.to(hn_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rnn_backward_kernel(
    dy_ptr,  # [L, N, H] by strides (s_dyt, s_dyn, s_dyh): gradient of the output
    dhn_ptr,  # [N, H] by strides (s_dhn, s_dhh): gradient of h_n
    out_ptr,  # [L, N, H] by strides (s_ot, s_on, 1): the forward's h_t
    w_ptr,  # W_hh [H, H] contiguous
    dz_ptr,  # [L, N, H], same strides as out: gradient of the pre-activation (= of xproj)
    dh0_ptr,  # [N, H] contiguous: gradient of h0
    L, N, H,
    s_dyt, s_dyn, s_dyh, s_dhn, s_dhh, s_ot, s_on,
    last_dy, last_o,  # (L - 1) * s_dyt and (L - 1) * s_ot, from the host (may exceed int32)
    ACTIVATION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RESIDENT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    row_mask = rows < N
    col_mask = cols < H
    mask = row_mask[:, None] & col_mask[None, :]
    dot_dtype = w_ptr.dtype.element_ty

    dh = tl.load(dhn_ptr + rows[:, None] * s_dhn + cols[None, :] * s_dhh, mask=mask, other=0.0).to(ACC_DTYPE)
    if RESIDENT:
        w = tl.load(w_ptr + cols[:, None] * H + cols[None, :], mask=col_mask[:, None] & col_mask[None, :], other=0.0)

    # Row pointers start at t = L - 1 and step back one time stride per iteration (64-bit).
    o_row = out_ptr + rows * s_on + last_o
    dz_row = dz_ptr + rows * s_on + last_o
    dy_row = dy_ptr + rows * s_dyn + last_dy
    for _ in range(0, L):
        h = tl.load(o_row[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        dy = tl.load(dy_row[:, None] + cols[None, :] * s_dyh, mask=mask, other=0.0).to(ACC_DTYPE)
        g = dh + dy
        if ACTIVATION == "tanh":
            dz = g * (1.0 - h * h)
        else:
            dz = tl.where(h > 0.0, g, 0.0)
        tl.store(dz_row[:, None] + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if RESIDENT:
            dh = tl.dot(dz.to(dot_dtype), w, out_dtype=ACC_DTYPE, input_precision="ieee")
        else:
            tl.debug_barrier()  # dz_t is read back in chunks, written by other threads of this CTA
            dh = tl.zeros([BLOCK_N, BLOCK_H], dtype=ACC_DTYPE)
            for k in range(0, H, BLOCK_K):
                ks = k + tl.arange(0, BLOCK_K)
                k_mask = ks < H
                a = tl.load(dz_row[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                w = tl.load(w_ptr + ks[:, None] * H + cols[None, :], mask=k_mask[:, None] & col_mask[None, :],
                            other=0.0)
                dh += tl.dot(a.to(dot_dtype), w, out_dtype=ACC_DTYPE, input_precision="ieee")
        o_row -= s_ot
        dz_row -= s_ot
        dy_row -= s_dyt
    tl.store(dh0_ptr + rows[:, None] * H + cols[None, :], dh.to(dh0_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launch configuration
def launch_config(hidden: int, dtype: torch.dtype) -> dict:
    """Block sizes and warps for a hidden size: the only 'tuning', fixed so a call never benchmarks."""
    # Hidden sizes under 64 are padded to 64 (the padding is exact zeros): a step is latency-bound
    # at these sizes, and four block sizes (64 .. 512) keep the compiled variants few.
    block_h = max(64, triton.next_power_of_2(hidden))
    resident = block_h <= RESIDENT_MAX_BLOCK_H
    if resident:
        block_k = block_h
    else:
        # a W_hh chunk of at most 32 KiB: [BLOCK_K, BLOCK_H] in the operand's dtype
        elem = torch.finfo(dtype).bits // 8
        block_k = max(16, min(64, 32768 // (block_h * elem)))
    return dict(BLOCK_N=BLOCK_N, BLOCK_H=block_h, BLOCK_K=block_k, RESIDENT=resident,
                num_warps=4 if block_h <= 64 else 8)


def forward_stages(cfg: dict) -> int:
    """The forward's num_stages. Resident: 1, as its loop has nothing to pipeline (W_hh is on chip
    before it, h is carried in registers, xp is not a tl.dot operand); 3 compiles to the same SASS."""
    return 1 if cfg["RESIDENT"] else 3

