"""Fused LayerNorm over the last dimension: forward, and backward with deterministic dweight/dbias.

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

Custom ops: torch.ops.gpudl.layer_norm (input, weight, bias, eps, store_stats) -> (y, mean, rstd),
the statistics only when store_stats (a backward will read them), and its backward op
layer_norm_backward -> (dx, dweight, dbias), computing only the gradients asked for.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import acc_dtype, tl_acc, triton_dtype
from gpudl.kernels.registry import (
    Case,
    CompileVariant,
    KernelSpec,
    first_order_only,
    kernel_op,
    no_tensor,
    register,
)

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
    return DWDB_BLOCK_M // 2 if dtype == torch.float64 else DWDB_BLOCK_M  # 8 float64 rows spilled
REDUCE_BLOCK_P = 32  # partial rows summed per step by the reduction kernel
REDUCE_BLOCK_N = 128  # columns per reduction program
REDUCE_WARPS = 4


# --------------------------------------------------------------------------- kernels
@triton.jit
def _ln_fwd_kernel(
    x_ptr,  # [M, N] contiguous
    w_ptr, b_ptr,  # [N] (unused when HAS_W / HAS_B is False)
    y_ptr,  # [M, N] output, input's dtype
    mean_ptr, rstd_ptr,  # [M] in ACC precision, saved for backward (when STORE_STATS)
    M, N,
    eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    STORE_STATS: tl.constexpr,
    ACC: tl.constexpr,  # fp32, or fp64 for float64 input
    ROWS: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # power of two >= N
):
    # int64 rows: row * N passes 2**31 on large activations.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
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
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(ACC)
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


# --------------------------------------------------------------------------- host launchers
def launch_config(n: int, m: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for rows of n elements, m rows: tiles of up to TILE elements
    (more for rows longer than TILE), 16 elements per thread (32 warps at BLOCK_N = 16384: on 16,
    32 elements per thread, the fp32 backward spilled)."""
    block_n = max(16, triton.next_power_of_2(n))
    rows = max(1, min(TILE // block_n, triton.next_power_of_2(max(m, 1))))
    tile = rows * block_n
    num_warps = 4 if tile <= 1024 else 8 if tile <= 4096 else 16 if tile <= 8192 else 32
    return block_n, rows, num_warps


def _backward_programs(num_tiles: int, device: torch.device) -> int:
    """About two programs per SM keeps every SM busy while the partials stay few ([P, N])."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # the interpreter: cost is the same however the tiles are split
    return max(1, min(num_tiles, target))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] as [M, N] contiguous (a view when it already is; explicit M: reshape(-1, 0) is ambiguous)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1]).contiguous()


def layer_norm_forward(input: torch.Tensor, weight, bias, eps: float, store_stats: bool):
    """input [..., N] (any strides); weight, bias [N] or None.
    Returns (y [..., N] contiguous, mean [M], rstd [M]) (mean, rstd empty unless store_stats)."""
    x = _rows(input)
    m, n = x.shape
    y = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    stats_shape = m if store_stats else 0
    mean = torch.empty(stats_shape, dtype=acc_dtype(x.dtype), device=x.device)
    rstd = torch.empty(stats_shape, dtype=acc_dtype(x.dtype), device=x.device)
    if m == 0 or n == 0:
        if store_stats:  # N == 0: torch gives an empty output; stats are unused
            mean.zero_(), rstd.zero_()
        return y, mean, rstd
    block_n, rows, num_warps = launch_config(n, m)
    wrap_triton(_ln_fwd_kernel)[(triton.cdiv(m, rows),)](
        x, weight.contiguous() if weight is not None else x, bias.contiguous() if bias is not None else x, y,
        mean if store_stats else y, rstd if store_stats else y,
        m, n, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, STORE_STATS=store_stats, ACC=tl_acc(x.dtype),
        ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y, mean, rstd


def layer_norm_backward(dy, input, weight, mean, rstd, need_dx: bool, need_dw: bool, need_db: bool):
    """dy, input [..., N] (any strides); weight [N] or None; mean, rstd [M].
    Returns (dx [..., N] contiguous, dweight [N], dbias [N]), each empty when not asked for."""
    x, dy = _rows(input), _rows(dy)
    m, n = x.shape
    param_dtype = weight.dtype if weight is not None else x.dtype
    dx = torch.empty(input.shape, dtype=input.dtype, device=x.device) if need_dx else no_tensor(x)
    # No rows: the parameter gradients are exactly zero, as in torch.
    dw = torch.zeros(n, dtype=param_dtype, device=x.device) if need_dw else no_tensor(x)
    db = torch.zeros(n, dtype=param_dtype, device=x.device) if need_db else no_tensor(x)
    if m == 0 or n == 0 or not (need_dx or need_dw or need_db):
        return dx, dw, db
    block_n, rows, num_warps = launch_config(n, m)
    acc = acc_dtype(x.dtype)
    num_tiles = triton.cdiv(m, rows)
    programs = _backward_programs(num_tiles, x.device)
    tiles_per_program = triton.cdiv(num_tiles, programs)
    programs = triton.cdiv(num_tiles, tiles_per_program)  # no program left without tiles
    dw_part = torch.empty(programs, n, dtype=acc, device=x.device) if need_dw else None
    db_part = torch.empty(programs, n, dtype=acc, device=x.device) if need_db else None
    split = block_n >= SPLIT_DWDB_BLOCK_N
    fused_dw, fused_db = need_dw and not split, need_db and not split
    if need_dx or fused_dw or fused_db:
        wrap_triton(_ln_bwd_kernel)[(programs,)](
            x, dy, weight.contiguous() if weight is not None else x, mean, rstd,
            dx if need_dx else x, dw_part if fused_dw else mean, db_part if fused_db else mean,
            m, n, tiles_per_program,
            HAS_W=weight is not None, DX=need_dx, DW=fused_dw, DB=fused_db, ACC=tl_acc(x.dtype),
            ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
        )
    if split and (need_dw or need_db):
        wrap_triton(_ln_bwd_dwdb_kernel)[(programs, triton.cdiv(n, DWDB_BLOCK_N))](
            x, dy, mean, rstd, dw_part if need_dw else mean, db_part if need_db else mean,
            m, n, tiles_per_program * rows,
            DW=need_dw, DB=need_db, ACC=tl_acc(x.dtype), BLOCK_M=_dwdb_block_m(x.dtype), BLOCK_N=DWDB_BLOCK_N,
            num_warps=DWDB_WARPS,
        )
    if need_dw or need_db:
        wrap_triton(_ln_reduce_partials_kernel)[(triton.cdiv(n, REDUCE_BLOCK_N),)](
            dw_part if need_dw else db_part, db_part if need_db else dw_part,
            dw if need_dw else db, db if need_db else dw,
            programs, n, DW=need_dw, DB=need_db,
            BLOCK_P=REDUCE_BLOCK_P, BLOCK_N=REDUCE_BLOCK_N, num_warps=REDUCE_WARPS,
        )
    return dx, dw, db


# --------------------------------------------------------------------------- custom ops
@kernel_op("layer_norm")
def _layer_norm_op(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   store_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y [..., N] contiguous, mean [M], rstd [M]); mean and rstd (accumulator dtype) only when
    store_stats (a backward will read them), else empty tensors."""
    return layer_norm_forward(input, weight, bias, eps, store_stats)


@_layer_norm_op.register_fake
def _(input, weight, bias, eps, store_stats):
    stats_shape = math.prod(input.shape[:-1]) if store_stats else 0
    return (input.new_empty(input.shape), input.new_empty(stats_shape, dtype=acc_dtype(input.dtype)),
            input.new_empty(stats_shape, dtype=acc_dtype(input.dtype)))


def _setup_layer_norm(ctx, inputs, output):
    input, weight, _, _, store_stats = inputs
    _, mean, rstd = output
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    # The backward kernel reads x and the statistics for every gradient; the weight only for dx.
    ctx.save_for_backward(input, weight if need_x else None, mean, rstd)
    ctx.store_stats = store_stats
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _layer_norm_backward(ctx, grad_output, _grad_mean, _grad_rstd):
    input, weight, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_output is None:
        return None, None, None, None, None
    if not ctx.store_stats:
        raise RuntimeError("torch.ops.gpudl.layer_norm was called with store_stats=False, so it has no statistics "
                           "for a backward pass; pass store_stats=True when a gradient will be needed")
    dx, dw, db = torch.ops.gpudl.layer_norm_backward(grad_output, input, weight, mean, rstd, need_x, need_w, need_b)
    return (dx if need_x else None), (dw if need_w else None), (db if need_b else None), None, None


_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_setup_layer_norm)


@kernel_op("layer_norm_backward")
def _layer_norm_backward_op(grad_output: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                            need_input: bool, need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dinput [..., N] contiguous, dweight [N], dbias [N]); each an empty tensor when not asked
    for. `weight` is needed only for dinput."""
    return layer_norm_backward(grad_output, input, weight, mean, rstd, need_input, need_weight, need_bias)


first_order_only(_layer_norm_backward_op)


@_layer_norm_backward_op.register_fake
def _(grad_output, input, weight, mean, rstd, need_input, need_weight, need_bias):
    n = input.shape[-1]
    param_dtype = weight.dtype if weight is not None else input.dtype
    return (input.new_empty(input.shape if need_input else 0),
            input.new_empty(n if need_weight else 0, dtype=param_dtype if need_weight else input.dtype),
            input.new_empty(n if need_bias else 0, dtype=param_dtype if need_bias else input.dtype))


# --------------------------------------------------------------------------- public entry
def unsupported(input, weight, bias, eps) -> str | None:
    """What the kernel does not run (gpudl.ops runs the reference instead, warning once)."""
    n = input.shape[-1]
    if n > MAX_N:
        return f"rows longer than {MAX_N} elements (got N={n}) do not fit in registers"
    return None


def layer_norm(input, weight, bias, eps):
    """input [..., N]; weight, bias [N] or None (input's dtype and device); eps a float.
    Returns [..., N]: each row normalized to zero mean and unit variance, scaled and shifted.
    Arguments `unsupported` names are an error here; gpudl.ops sends them to the reference."""
    reason = unsupported(input, weight, bias, eps)
    if reason is not None:
        raise ValueError(f"the Triton kernel cannot run this call ({reason}); gpudl.ops.layer_norm runs the reference")
    # Statistics are written only when a backward will read them.
    store_stats = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    # A strided input is copied once here (autograd keeps the copy for backward), not in both ops.
    return torch.ops.gpudl.layer_norm(input.contiguous(), weight, bias, float(eps), store_stats)[0]


# --------------------------------------------------------------------------- registration
def _case(shape, affine="both", scale=1.0, shift=0.0):
    """input of `shape` (rows drawn around `shift` with spread `scale`); affine 'both',
    'weight', 'bias' or 'none'."""

    def make(dtype, device):
        n = shape[-1]
        x = (torch.randn(shape, device=device, dtype=torch.float32) * scale + shift).to(dtype).requires_grad_()
        w = b = None
        if affine in ("both", "weight"):
            w = (1.0 + 0.5 * torch.randn(n, device=device)).to(dtype).requires_grad_()
        if affine in ("both", "bias"):
            b = (0.5 * torch.randn(n, device=device)).to(dtype).requires_grad_()
        return x, w, b, 1e-5

    return Case(f"{list(shape)} {affine}", make)


def _bench(m, n):
    def make(dtype, device):
        x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(n, device=device, dtype=dtype, requires_grad=True)
        b = torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
        return x, w, b, 1e-5

    return Case(f"[{m}, {n}]", make)


def _bytes(args):
    x, w, b = args[0], args[1], args[2]
    params = sum(t.numel() for t in (w, b) if t is not None)
    # read x and the parameters, write y (the saved mean/rstd are 8 bytes a row: negligible)
    return float((2 * x.numel() + params) * x.element_size())


def _compile_variants() -> list[CompileVariant]:
    """Every tile launch_config picks for large M (the tiles that hold the most per thread; a
    small M only shrinks ROWS): BLOCK_N from 16 to MAX_N, forward and backward with every
    option on, in fp32 and bf16; plus one float64 tile (the GPU gradcheck) and the reduction."""
    variants = []
    block_ns = [2**k for k in range(4, MAX_N.bit_length())]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        ptr = triton_dtype(dtype)
        acc_ptr, acc = triton_dtype(acc_dtype(dtype)), tl_acc(dtype)
        for block_n in block_ns if dtype != torch.float64 else [16]:
            _, rows, warps = launch_config(block_n, 2**20)
            tag = f"{ptr[1:]}-N{block_n}-R{rows}-w{warps}"
            variants.append(CompileVariant(
                f"ln_fwd-{tag}", _ln_fwd_kernel,
                {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr, "mean_ptr": acc_ptr, "rstd_ptr": acc_ptr,
                 "M": "i32", "N": "i32", "eps": "fp32", "HAS_W": "constexpr", "HAS_B": "constexpr",
                 "STORE_STATS": "constexpr", "ACC": "constexpr", "ROWS": "constexpr", "BLOCK_N": "constexpr"},
                {"HAS_W": True, "HAS_B": True, "STORE_STATS": True, "ACC": acc, "ROWS": rows, "BLOCK_N": block_n},
                num_warps=warps,
            ))
            variants.append(CompileVariant(
                f"ln_bwd-{tag}", _ln_bwd_kernel,
                {"x_ptr": ptr, "dy_ptr": ptr, "w_ptr": ptr, "mean_ptr": acc_ptr, "rstd_ptr": acc_ptr, "dx_ptr": ptr,
                 "dw_part_ptr": acc_ptr, "db_part_ptr": acc_ptr, "M": "i32", "N": "i32", "tiles_per_program": "i32",
                 "HAS_W": "constexpr", "DX": "constexpr", "DW": "constexpr", "DB": "constexpr", "ACC": "constexpr",
                 "ROWS": "constexpr", "BLOCK_N": "constexpr"},
                {"HAS_W": True, "DX": True, "DW": block_n < SPLIT_DWDB_BLOCK_N, "DB": block_n < SPLIT_DWDB_BLOCK_N,
                 "ACC": acc, "ROWS": rows, "BLOCK_N": block_n},
                num_warps=warps,
            ))
        variants.append(CompileVariant(
            f"ln_bwd_dwdb-{ptr[1:]}-M{_dwdb_block_m(dtype)}-N{DWDB_BLOCK_N}-w{DWDB_WARPS}", _ln_bwd_dwdb_kernel,
            {"x_ptr": ptr, "dy_ptr": ptr, "mean_ptr": acc_ptr, "rstd_ptr": acc_ptr, "dw_part_ptr": acc_ptr,
             "db_part_ptr": acc_ptr, "M": "i32", "N": "i32", "rows_per_program": "i32", "DW": "constexpr",
             "DB": "constexpr", "ACC": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
            {"DW": True, "DB": True, "ACC": acc, "BLOCK_M": _dwdb_block_m(dtype), "BLOCK_N": DWDB_BLOCK_N},
            num_warps=DWDB_WARPS,
        ))
        variants.append(CompileVariant(
            f"ln_reduce-{ptr[1:]}", _ln_reduce_partials_kernel,
            {"dw_part_ptr": acc_ptr, "db_part_ptr": acc_ptr, "dw_ptr": ptr, "db_ptr": ptr, "P": "i32", "N": "i32",
             "DW": "constexpr", "DB": "constexpr", "BLOCK_P": "constexpr", "BLOCK_N": "constexpr"},
            {"DW": True, "DB": True, "BLOCK_P": REDUCE_BLOCK_P, "BLOCK_N": REDUCE_BLOCK_N},
            num_warps=REDUCE_WARPS,
        ))
    return variants


SPEC = register(KernelSpec(
    op="layer_norm",
    triton=layer_norm,
    unsupported=unsupported,
    cases=[
        _case((4, 64)),
        _case((3, 5, 37)),
        _case((3, 5, 37), "none"),
        _case((7, 100), "weight", scale=3.0, shift=5.0),  # off-centre rows: the two-pass variance
        _case((6, 33), "bias"),
    ],
    gradcheck_case=_case((3, 7)),
    tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)},
    compile_variants=_compile_variants,
    # Not autotuned (launch_config picks the tile), but this is the multi-tile path: 300 rows of 40
    # are 5 tiles of 64 rows, so the backward's programs walk two tiles each and leave 3 partials.
    tuning_cases=[_case((300, 40))],
    bench_cases=[_bench(8192, 4096), _bench(32768, 1024)],
    flops=None,
    bytes_moved=_bytes,
    description="LayerNorm over the last dim: rows in registers, mean/rstd saved; backward dx in one "
                "pass with per-program dweight/dbias partials summed in a fixed order",
))
