"""The Elman RNN's Triton kernels: the whole sequence in one persistent launch, the input projection
fused into it, and BPTT over windows of time steps.

Forward, one launch; each program owns BLOCK_N batch rows, keeps h on chip and loops over t:
    z_t = x_t @ W_ih^T + h_{t-1} @ W_hh^T + (b_ih + b_hh)      h_t = act(z_t)
x_t @ W_ih^T is computed inside the step (no [L, N, H] projection is ever stored): with W_ih^T
resident in registers when H_in fits one BLOCK_I block (INPUT_RESIDENT), else streamed in
BLOCK_I-row chunks. Both products accumulate into one fp32 tile.

Backward (BPTT), one launch per window of steps t1-1 .. t0 (the host walks the windows from the
end), dh carried on chip inside a window and recomputed from the later window's first dz between
windows:
    dz_t     = (dh_t + dy_t) * act'(h_t)           tanh' = 1 - h_t^2, relu' = [h_t > 0], from the output
    dh_{t-1} = dz_t @ W_hh
    dx_t     = dz_t @ W_ih                         (HAS_DX) W_ih resident or streamed as forward
dy_t is not read at all without HAS_DY (only h_n's gradient arrived). dz_t is stored into a
window-sized buffer only; the host turns each window into the weight and bias gradients with GEMMs
(kernels/rnn.py), so no [L, N, H] gradient of the pre-activation exists. The resident kernel takes
dh and dx from dz in registers; the chunked one reads dz_t back in BLOCK_K chunks for both.

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
BPTT_WINDOWS = 8  # BPTT launches per backward at most (window_steps)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _rnn_forward_kernel(
    x_ptr,  # [L, N, H_in] by strides (sx_t, sx_n, 1): the layer's input
    h0_ptr,  # [N, H] contiguous
    wi_ptr,  # W_ih^T [H_in, H] contiguous, transposed by the host
    w_ptr,  # W_hh^T [H, H] contiguous, transposed by the host: row-major chunks load as wide vectors
            # (read through W_hh's strides, fp32 H >= 128 spills: see the audit)
    b_ptr,  # b_ih + b_hh [H] in the accumulator's dtype, or a dummy when HAS_BIAS is False
    out_ptr,  # [L, N, H] by strides (so_t, so_n, 1): every h_t
    hn_ptr,  # [N, H] contiguous: the last h_t (the host handles L == 0 without a launch)
    L, N, H, H_in,
    sx_t, sx_n, so_t, so_n,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "tanh" or "relu"
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for float64 inputs
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_I: tl.constexpr,  # input features per W_ih^T block
    RESIDENT: tl.constexpr,
    INPUT_RESIDENT: tl.constexpr,  # H_in <= BLOCK_I: W_ih^T loaded once, x_t one block per step
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
    x_row = x_ptr + rows * sx_n
    o_row = out_ptr + rows * so_n
    prev_row = h0_ptr + rows * H  # where h_{t-1} lives: h0, then the output just written
    if RESIDENT:
        # W_hh^T, loaded once for all steps.
        w_t = tl.load(w_ptr + cols[:, None] * H + cols[None, :], mask=col_mask[:, None] & col_mask[None, :], other=0.0)
    if INPUT_RESIDENT:
        ins = tl.arange(0, BLOCK_I)
        in_mask = ins < H_in
        x_mask = row_mask[:, None] & in_mask[None, :]
        wi_t = tl.load(wi_ptr + ins[:, None] * H + cols[None, :], mask=in_mask[:, None] & col_mask[None, :],
                       other=0.0)

    for _ in range(0, L):
        # the input projection x_t @ W_ih^T, into the step's accumulator
        if INPUT_RESIDENT:
            xt = tl.load(x_row[:, None] + ins[None, :], mask=x_mask, other=0.0)
            acc = tl.dot(xt.to(dot_dtype), wi_t, out_dtype=ACC_DTYPE, input_precision="ieee")
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=ACC_DTYPE)
            for i in range(0, H_in, BLOCK_I):
                ks = i + tl.arange(0, BLOCK_I)
                k_mask = ks < H_in
                xt = tl.load(x_row[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                             other=0.0)
                wi = tl.load(wi_ptr + ks[:, None] * H + cols[None, :], mask=k_mask[:, None] & col_mask[None, :],
                             other=0.0)
                acc += tl.dot(xt.to(dot_dtype), wi, out_dtype=ACC_DTYPE, input_precision="ieee")
        # the recurrence h_{t-1} @ W_hh^T
        if RESIDENT:
            acc = tl.dot(h.to(dot_dtype), w_t, acc, out_dtype=ACC_DTYPE, input_precision="ieee")
        else:
            for k in range(0, H, BLOCK_K):
                ks = k + tl.arange(0, BLOCK_K)
                k_mask = ks < H
                a = tl.load(prev_row[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                w_t = tl.load(w_ptr + ks[:, None] * H + cols[None, :], mask=k_mask[:, None] & col_mask[None, :],
                              other=0.0)
                acc += tl.dot(a.to(dot_dtype), w_t, out_dtype=ACC_DTYPE, input_precision="ieee")
        z = acc + bias[None, :]
        if ACTIVATION == "tanh":
            h = tanh(z)
        else:
            h = tl.maximum(z, 0.0)
        tl.store(o_row[:, None] + cols[None, :], h.to(out_ptr.dtype.element_ty), mask=mask)
        if not RESIDENT:
            tl.debug_barrier()  # the next step reads h_t back, written by other threads of this CTA
        prev_row = o_row
        x_row += sx_t
        o_row += so_t
    tl.store(hn_ptr + rows[:, None] * H + cols[None, :], h.to(hn_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_times(z_row, row_mask, b_ptr, ldb, out_cols, out_mask, H, dot_dtype: tl.constexpr,
                ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_C] = (the [BLOCK_N, H] rows at z_row, read back in BLOCK_K-column chunks) @
    B[:, out_cols], B row-major [H, ldb], streamed in matching BLOCK_K-row chunks: the chunked
    backward's dh = dz @ W_hh and dx = dz @ W_ih."""
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC_DTYPE)
    for k in range(0, H, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        a = tl.load(z_row[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * ldb + out_cols[None, :], mask=k_mask[:, None] & out_mask[None, :], other=0.0)
        acc += tl.dot(a.to(dot_dtype), b, out_dtype=ACC_DTYPE, input_precision="ieee")
    return acc


@triton.jit
def _rnn_backward_kernel(
    dy_ptr,  # [L, N, H] by strides (sdy_t, sdy_n, sdy_h): gradient of the output (a dummy without HAS_DY)
    dhn_ptr,  # [N, H] by strides (sdh_n, sdh_h): gradient of h_n (read by the window ending at L only)
    out_ptr,  # [L, N, H] by strides (so_t, so_n, 1): the forward's h_t
    w_ptr,  # W_hh [H, H] contiguous
    dz_ptr,  # [steps, N, H] by strides (sz_t, H, 1): slot s holds dz of the window's step t0 + s
    wi_ptr,  # W_ih [H, H_in] contiguous (a dummy when HAS_DX is False)
    dx_ptr,  # [L, N, H_in] by strides (sdx_t, sdx_n, 1): dx_t = dz_t @ W_ih (a dummy without HAS_DX)
    steps, N, H, H_in,
    from_dz,  # 0 for the window ending at L (dh = grad h_n), else 1 (dh = slot 0's dz @ W_hh)
    sdy_t, sdy_n, sdy_h, sdh_n, sdh_h, so_t, so_n, sz_t, sdx_t, sdx_n,
    last_dy, last_o, last_z, last_dx,  # offsets of the window's last step, from the host (may exceed int32)
    ACTIVATION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_I: tl.constexpr,
    RESIDENT: tl.constexpr,
    INPUT_RESIDENT: tl.constexpr,  # H_in <= BLOCK_I: W_ih loaded once, dx_t one block per step
    HAS_DX: tl.constexpr,
    HAS_DY: tl.constexpr,  # False when only h_n's gradient arrived: no dy loads at all
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    row_mask = rows < N
    col_mask = cols < H
    mask = row_mask[:, None] & col_mask[None, :]
    dot_dtype = w_ptr.dtype.element_ty

    if RESIDENT:
        w = tl.load(w_ptr + cols[:, None] * H + cols[None, :], mask=col_mask[:, None] & col_mask[None, :], other=0.0)
    if HAS_DX and INPUT_RESIDENT:
        ins = tl.arange(0, BLOCK_I)
        in_mask = ins < H_in
        dx_mask = row_mask[:, None] & in_mask[None, :]
        wi = tl.load(wi_ptr + cols[:, None] * H_in + ins[None, :], mask=col_mask[:, None] & in_mask[None, :],
                     other=0.0)

    # dh at the window's last step. Between windows nothing is carried but the later window's first
    # dz, in slot 0: dh = dz @ W_hh is recomputed from it, the product the previous launch would have
    # made next (the same operands, the same fp32 accumulation). Each program reads only its rows.
    slot0 = dz_ptr + rows * H
    if from_dz != 0:
        if RESIDENT:
            z0 = tl.load(slot0[:, None] + cols[None, :], mask=mask, other=0.0)
            dh = tl.dot(z0.to(dot_dtype), w, out_dtype=ACC_DTYPE, input_precision="ieee")
        else:
            dh = _rows_times(slot0, row_mask, w_ptr, H, cols, col_mask, H, dot_dtype, ACC_DTYPE, BLOCK_N, BLOCK_H,
                             BLOCK_K)
            tl.debug_barrier()  # slot 0 is read by other threads of this CTA before it is overwritten
    else:
        dh = tl.load(dhn_ptr + rows[:, None] * sdh_n + cols[None, :] * sdh_h, mask=mask, other=0.0).to(ACC_DTYPE)

    # Row pointers start at the window's last step and step back one time stride per iteration (64-bit).
    o_row = out_ptr + rows * so_n + last_o
    dz_row = slot0 + last_z
    dy_row = dy_ptr + rows * sdy_n + last_dy
    dx_row = dx_ptr + rows * sdx_n + last_dx
    for _ in range(0, steps):
        h = tl.load(o_row[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        if HAS_DY:
            g = dh + tl.load(dy_row[:, None] + cols[None, :] * sdy_h, mask=mask, other=0.0).to(ACC_DTYPE)
        else:
            g = dh
        if ACTIVATION == "tanh":
            dz = g * (1.0 - h * h)
        else:
            dz = tl.where(h > 0.0, g, 0.0)
        tl.store(dz_row[:, None] + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if RESIDENT:
            # dh_{t-1} = dz_t @ W_hh and dx_t = dz_t @ W_ih from the registers
            dz_op = dz.to(dot_dtype)
            if HAS_DX:
                if INPUT_RESIDENT:
                    dx = tl.dot(dz_op, wi, out_dtype=ACC_DTYPE, input_precision="ieee")
                    tl.store(dx_row[:, None] + ins[None, :], dx.to(dx_ptr.dtype.element_ty), mask=dx_mask)
                else:
                    for i in range(0, H_in, BLOCK_I):
                        ks = i + tl.arange(0, BLOCK_I)
                        k_mask = ks < H_in
                        wi_c = tl.load(wi_ptr + cols[:, None] * H_in + ks[None, :],
                                       mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                        dx = tl.dot(dz_op, wi_c, out_dtype=ACC_DTYPE, input_precision="ieee")
                        tl.store(dx_row[:, None] + ks[None, :], dx.to(dx_ptr.dtype.element_ty),
                                 mask=row_mask[:, None] & k_mask[None, :])
            dh = tl.dot(dz_op, w, out_dtype=ACC_DTYPE, input_precision="ieee")
        else:
            # dz_t read back in BLOCK_K chunks (a [BLOCK_N, BLOCK_H] dot operand would spill), for
            # dx_t = dz_t @ W_ih and dh_{t-1} = dz_t @ W_hh
            tl.debug_barrier()  # dz_t was written by other threads of this CTA
            if HAS_DX:
                for i in range(0, H_in, BLOCK_I):
                    ks = i + tl.arange(0, BLOCK_I)
                    k_mask = ks < H_in
                    dx = _rows_times(dz_row, row_mask, wi_ptr, H_in, ks, k_mask, H, dot_dtype, ACC_DTYPE, BLOCK_N,
                                     BLOCK_I, BLOCK_K)
                    tl.store(dx_row[:, None] + ks[None, :], dx.to(dx_ptr.dtype.element_ty),
                             mask=row_mask[:, None] & k_mask[None, :])
            dh = _rows_times(dz_row, row_mask, w_ptr, H, cols, col_mask, H, dot_dtype, ACC_DTYPE, BLOCK_N, BLOCK_H,
                             BLOCK_K)
        o_row -= so_t
        dz_row -= sz_t
        dy_row -= sdy_t
        dx_row -= sdx_t


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


def input_config(input_size: int, cfg: dict, dtype: torch.dtype) -> dict:
    """The input-projection blocks (W_ih^T forward, W_ih backward) for H_in input features, beside
    launch_config's cfg. Resident: W_ih kept in registers when H_in fits one block of at most 64
    (the models' 8 and 28 do), else streamed in chunks of 64 features in half precision, 32 in
    fp32/fp64 (64 spills the resident fp32 kernels: see the audit); chunked: BLOCK_K, like W_hh's
    (at most 32 in fp32/fp64: the fp32 H 128 backward's dx chunk of 64 spills on sm_90)."""
    if cfg["RESIDENT"]:
        if input_size <= 64:
            return dict(BLOCK_I=max(16, triton.next_power_of_2(max(input_size, 1))), INPUT_RESIDENT=True)
        return dict(BLOCK_I=64 if torch.finfo(dtype).bits == 16 else 32, INPUT_RESIDENT=False)
    return dict(BLOCK_I=cfg["BLOCK_K"] if torch.finfo(dtype).bits == 16 else min(32, cfg["BLOCK_K"]),
                INPUT_RESIDENT=False)


def window_steps(length: int, dtype: torch.dtype) -> int:
    """Time steps per BPTT launch: the window's dz buffer [steps, N, H] holds at most one [N, H]
    fp32 tile's bytes (2 steps in half precision, 1 in fp32/fp64: the backward's whole scratch
    stays a few [N, H] tiles, issue 22's memory target), and at most ceil(L / BPTT_WINDOWS)."""
    per_fp32_tile = max(1, 4 // (torch.finfo(dtype).bits // 8))
    return max(1, min(per_fp32_tile, -(-length // BPTT_WINDOWS)))


def backward_warps(cfg: dict, dtype: torch.dtype) -> int:
    """The backward's num_warps: launch_config's, but 16 for the fp32/fp64 H 512 kernels (at 8 the
    fp32 one without dy spills on sm_90: see the audit)."""
    return 16 if cfg["BLOCK_H"] >= 512 and torch.finfo(dtype).bits > 16 else cfg["num_warps"]


def backward_stages(dtype: torch.dtype) -> int:
    """The backward's num_stages: 3 in half precision (its weight-chunk loops pipelined); 1 in
    fp32/fp64, whose FMA dots hold the operands in registers (the fp32 H 128 kernel spills on sm_80
    at 3 stages, the fp64 H 512 one needs more shared memory than sm_80 has: see the audit)."""
    return 3 if torch.finfo(dtype).bits == 16 else 1


def forward_stages(cfg: dict, inputs: dict, dtype: torch.dtype) -> int:
    """The forward's num_stages. Resident with W_ih^T resident: 1, as its time loop has nothing to
    pipeline (the weights are on chip before it, h is carried in registers, x_t is the step's only
    load); 3 wherever a loop streams weight chunks (pipelined loads), except the resident fp32/fp64
    kernel streaming W_ih^T (1: it spills on sm_80 at 3, see the audit)."""
    if cfg["RESIDENT"] and (inputs["INPUT_RESIDENT"] or torch.finfo(dtype).bits > 16):
        return 1
    return 3
