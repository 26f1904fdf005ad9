"""The LayerNorm family's Triton code (op layer in layer_norm.py, registration in layer_norm_spec.py):
forward, and backward with deterministic dweight/dbias.

    layer_norm(input, weight, bias, eps)     input [..., N]; weight, bias [N] or None

gpudl.ops.layer_norm flattens torch's `normalized_shape` (the last k dims) into the one last dim N,
so the kernels see rows [M, N]. Each program holds a [ROWS, BLOCK_N] tile, whole rows in
registers (N up to MAX_N; BLOCK_N = N rounded up to a power of two, masked).

Forward (one launch): mean and rstd = 1 / sqrt(var + eps) in fp32 (fp64 for float64 input), the
two-pass variance from the row already in registers (no E[x^2] - E[x]^2 cancellation), then
y = (x - mean) * rstd * weight + bias. mean and rstd [M] are saved for backward.

Backward, with xhat = (x - mean) * rstd and g = dy * weight (dy without weight):
    dx      = rstd * (g - mean_N(g * xhat) * xhat - mean_N(g))
    dweight = sum_M dy * xhat,   dbias = sum_M dy
One launch of a fixed number of programs (about two per SM), each walking a contiguous run of row
tiles: it writes dx and adds its rows' dy * xhat and dy into register accumulators, stored once
as one partial row per program [P, N]. Rows of SPLIT_DWDB_BLOCK_N and more leave the partials to
a second kernel over [rows, column block] tiles (each program the same run of rows).
A last small kernel sums the P partials per column in a fixed order (no atomics), so the weight
and bias gradients are reproducible run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The largest row kept in registers: 16384 fp32 values over 16 warps is 32 per thread. Longer rows
# would spill; they run on the reference (a warning says so) rather than slowly here.
MAX_N = 16384
# Elements per program tile: short rows are batched ROWS at a time so a program still moves a
# useful amount of memory (N=64 -> 64 rows per program).
TILE = 4096
# Rows this long (BLOCK_N) leave the weight and bias gradients to a kernel of their own: the fused
# backward holding a whole row of x, dy, weight, xhat and both gradient accumulators per program
# spilled registers there (gpudl.kernels.audit).
SPLIT_DWDB_BLOCK_N = 16384
DWDB_BLOCK_M, DWDB_BLOCK_N, DWDB_WARPS = 8, 512, 4  # the separate kernel's [rows, columns] tile


def _dwdb_block_m(dtype: torch.dtype) -> int:
    return DWDB_BLOCK_M // 2 if dtype == torch.float64 else DWDB_BLOCK_M  # 8 float64 rows spill (the audit)


# The partials' reduction: 1024 columns over 128 threads, 8 contiguous columns a thread, so its
# partial loads and its dweight/dbias stores are 128-bit (the audit's 128-bit rule); 4 partial rows
# a step keep 32 accumulators a thread.
REDUCE_BLOCK_P = 4  # partial rows summed per step by the reduction kernel
REDUCE_BLOCK_N = 1024  # columns per reduction program
REDUCE_WARPS = 4


@triton.jit
def _ln_fwd_kernel(
    x_ptr,  # [M, N] contiguous
    w_ptr, b_ptr,  # [N] (unused when HAS_W / HAS_B is False)
    y_ptr,  # [M, N] output, input's dtype
    mean_ptr, rstd_ptr,  # [M] in ACC precision, saved for backward (when STORE_STATS)
    M, N,
    eps,
    tiles_per_program,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    STORE_STATS: tl.constexpr,
    ACC: tl.constexpr,  # fp32, or fp64 for float64 input
    ROWS: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # power of two >= N
):
    """Program p normalizes the row tiles [p * tiles_per_program, ...): weight and bias are loaded
    once per program, not once per tile (long rows are one-row tiles)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    first = pid * tiles_per_program
    last = tl.minimum(first + tiles_per_program, tl.cdiv(M, ROWS))
    for tile in range(first, last):
        rows = tile * ROWS + tl.arange(0, ROWS).to(tl.int64)  # int64: row * N passes 2**31 on large inputs
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)  # padded lanes must not enter the variance
        var = tl.sum(xc * xc, axis=1) / N
        if ACC == tl.float64:
            rstd = 1.0 / tl.sqrt(var + eps)  # fp64 sqrt is IEEE-rounded already
        else:
            rstd = 1.0 / tl.sqrt_rn(var + eps)  # IEEE sqrt: tl.sqrt is the approximate one for fp32
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * w[None, :]
        if HAS_B:
            y = y + b[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        if STORE_STATS:
            tl.store(mean_ptr + rows, mean, mask=row_mask)
            tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _ln_bwd_kernel(
    x_ptr, dy_ptr,  # [M, N] contiguous
    w_ptr,  # [N] (unused when HAS_W is False)
    mean_ptr, rstd_ptr,  # [M], ACC precision
    dx_ptr,  # [M, N], input's dtype (unused when DX is False)
    dw_part_ptr, db_part_ptr,  # [P, N] ACC partial sums, one row per program (when DW / DB)
    M, N,
    tiles_per_program,
    HAS_W: tl.constexpr,
    DX: tl.constexpr, DW: tl.constexpr, DB: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    # Rows of 16384: the weight is reloaded per tile (from cache) rather than held in registers
    # across the loop; held, the fp32 backward spilled (gpudl.kernels.audit).
    W_PER_TILE: tl.constexpr = BLOCK_N >= 16384
    if HAS_W:
        if not W_PER_TILE:
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    # 2-D accumulators, reduced over ROWS once at the end: no cross-thread sum per tile.
    dw_acc = tl.zeros((ROWS, BLOCK_N), ACC)
    db_acc = tl.zeros((ROWS, BLOCK_N), ACC)
    num_tiles = tl.cdiv(M, ROWS)
    first = pid * tiles_per_program
    last = tl.minimum(first + tiles_per_program, num_tiles)
    for tile in range(first, last):
        rows = tile * ROWS + tl.arange(0, ROWS).to(tl.int64)  # tile * ROWS < M + ROWS: no int32 overflow
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)  # 0 on padding: g, dw, db vanish there
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if DX:
            if HAS_W:
                if W_PER_TILE:
                    g = dy * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
                else:
                    g = dy * w[None, :]
            else:
                g = dy
            c1 = tl.sum(g * xhat, axis=1) / N
            c2 = tl.sum(g, axis=1) / N
            dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if DW:
            dw_acc += dy * xhat
        if DB:
            db_acc += dy
    part = pid.to(tl.int64) * N + cols
    if DW:
        tl.store(dw_part_ptr + part, tl.sum(dw_acc, axis=0), mask=col_mask)
    if DB:
        tl.store(db_part_ptr + part, tl.sum(db_acc, axis=0), mask=col_mask)


@triton.jit
def _ln_bwd_dwdb_kernel(
    x_ptr, dy_ptr,  # [M, N] contiguous
    mean_ptr, rstd_ptr,  # [M], ACC precision
    dw_part_ptr, db_part_ptr,  # [P, N] ACC partial sums
    M, N,
    rows_per_program,
    DW: tl.constexpr, DB: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Partial dweight / dbias for long rows: program (p, c) sums dy * xhat and dy over its run of
    rows [p * rows_per_program, ...) for column block c, into partial row p (the fused kernel's
    partial rows, summed in another, equally fixed, order)."""
    pid_p = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    first = pid_p.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < last
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None] * N + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        if DW:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            dw_acc += dy * tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if DB:
            db_acc += dy
    part = pid_p.to(tl.int64) * N + cols
    if DW:
        tl.store(dw_part_ptr + part, tl.sum(dw_acc, axis=0), mask=col_mask)
    if DB:
        tl.store(db_part_ptr + part, tl.sum(db_acc, axis=0), mask=col_mask)


@triton.jit
def _ln_reduce_partials_kernel(
    dw_part_ptr, db_part_ptr,  # [P, N] ACC partial sums
    dw_ptr, db_ptr,  # [N] in the parameters' dtype
    P, N,
    DW: tl.constexpr, DB: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dw = dw_part.sum(0), db = db_part.sum(0), in a fixed order (reproducible)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw_acc = tl.zeros((BLOCK_P, BLOCK_N), dw_part_ptr.dtype.element_ty)
    db_acc = tl.zeros((BLOCK_P, BLOCK_N), db_part_ptr.dtype.element_ty)
    for start in range(0, P, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P).to(tl.int64)
        mask = (parts < P)[:, None] & col_mask[None, :]
        offs = parts[:, None] * N + cols[None, :]
        if DW:
            dw_acc += tl.load(dw_part_ptr + offs, mask=mask, other=0.0)
        if DB:
            db_acc += tl.load(db_part_ptr + offs, mask=mask, other=0.0)
    if DW:
        tl.store(dw_ptr + cols, tl.sum(dw_acc, axis=0).to(dw_ptr.dtype.element_ty), mask=col_mask)
    if DB:
        tl.store(db_ptr + cols, tl.sum(db_acc, axis=0).to(db_ptr.dtype.element_ty), mask=col_mask)



# --------------------------------------------------------------------------- tiles
def launch_config(n: int, m: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for rows of n elements, m rows: tiles of up to TILE elements
    (more for rows longer than TILE), 16 elements per thread (32 warps at BLOCK_N = 16384: on 16,
    32 elements per thread, the fp32 backward spilled)."""
    block_n = max(16, triton.next_power_of_2(n))
    rows = max(1, min(TILE // block_n, triton.next_power_of_2(max(m, 1))))
    tile = rows * block_n
    num_warps = 4 if tile <= 1024 else 8 if tile <= 4096 else 16 if tile <= 8192 else 32
    return block_n, rows, num_warps
