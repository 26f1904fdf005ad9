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
as one partial row per program [P, N]. A second small kernel sums the P partials per column in a
fixed order (no atomics), so the weight and bias gradients are reproducible run to run.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gpudl import reference
from gpudl.kernels._common import triton_dtype
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, fall_back, register

# The largest row kept in registers: 16384 fp32 values over 16 warps is 32 per thread. Longer rows
# would spill; they run on the reference (a warning says so) rather than slowly here.
MAX_N = 16384
# Elements per program tile: short rows are batched ROWS at a time so a program still moves a
# useful amount of memory (N=64 -> 64 rows per program).
TILE = 4096
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
    if HAS_W:
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
def _acc(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def launch_config(n: int, m: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for rows of n elements, m rows: tiles of up to TILE elements
    (more for rows longer than TILE), 16 elements per thread (32 at BLOCK_N = 16384)."""
    block_n = max(16, triton.next_power_of_2(n))
    rows = max(1, min(TILE // block_n, triton.next_power_of_2(max(m, 1))))
    tile = rows * block_n
    num_warps = 4 if tile <= 1024 else 8 if tile <= 4096 else 16
    return block_n, rows, num_warps


def _backward_programs(num_tiles: int, device: torch.device) -> int:
    """About two programs per SM keeps every SM busy while the partials stay few ([P, N])."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # the interpreter: cost is the same however the tiles are split
    return max(1, min(num_tiles, target))


def layer_norm_forward(x: torch.Tensor, weight, bias, eps: float, store_stats: bool):
    """x [M, N] contiguous; weight, bias [N] contiguous or None.
    Returns (y [M, N], mean [M], rstd [M]) (mean, rstd None unless store_stats)."""
    m, n = x.shape
    y = torch.empty_like(x)
    acc_torch, acc_tl = _acc(x.dtype)
    mean = torch.empty(m, dtype=acc_torch, device=x.device) if store_stats else None
    rstd = torch.empty(m, dtype=acc_torch, device=x.device) if store_stats else None
    if m == 0 or n == 0:
        if mean is not None and m:  # N == 0: torch gives an empty output; stats are unused
            mean.zero_(), rstd.zero_()
        return y, mean, rstd
    block_n, rows, num_warps = launch_config(n, m)
    _ln_fwd_kernel[(triton.cdiv(m, rows),)](
        x, weight if weight is not None else x, bias if bias is not None else x, y,
        mean if store_stats else y, rstd if store_stats else y,
        m, n, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, STORE_STATS=store_stats, ACC=acc_tl,
        ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y, mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd, need_dx: bool, need_dw: bool, need_db: bool):
    """dy, x [M, N] contiguous; weight [N] or None; mean, rstd [M].
    Returns (dx [M, N] or None, dweight [N] or None, dbias [N] or None)."""
    m, n = x.shape
    param_dtype = weight.dtype if weight is not None else x.dtype
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.zeros(n, dtype=param_dtype, device=x.device) if need_dw else None
    db = torch.zeros(n, dtype=param_dtype, device=x.device) if need_db else None
    if m == 0 or n == 0 or not (need_dx or need_dw or need_db):
        return dx, dw, db  # no rows: the parameter gradients are exactly zero, as in torch
    block_n, rows, num_warps = launch_config(n, m)
    acc_torch, acc_tl = _acc(x.dtype)
    num_tiles = triton.cdiv(m, rows)
    programs = _backward_programs(num_tiles, x.device)
    tiles_per_program = triton.cdiv(num_tiles, programs)
    programs = triton.cdiv(num_tiles, tiles_per_program)  # no program left without tiles
    dw_part = torch.empty(programs, n, dtype=acc_torch, device=x.device) if need_dw else None
    db_part = torch.empty(programs, n, dtype=acc_torch, device=x.device) if need_db else None
    _ln_bwd_kernel[(programs,)](
        x, dy, weight if weight is not None else x, mean, rstd,
        dx if need_dx else x, dw_part if need_dw else mean, db_part if need_db else mean,
        m, n, tiles_per_program,
        HAS_W=weight is not None, DX=need_dx, DW=need_dw, DB=need_db, ACC=acc_tl,
        ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
    )
    if need_dw or need_db:
        _ln_reduce_partials_kernel[(triton.cdiv(n, REDUCE_BLOCK_N),)](
            dw_part if need_dw else db_part, db_part if need_db else dw_part,
            dw if need_dw else db, db if need_db else dw,
            programs, n, DW=need_dw, DB=need_db,
            BLOCK_P=REDUCE_BLOCK_P, BLOCK_N=REDUCE_BLOCK_N, num_warps=REDUCE_WARPS,
        )
    return dx, dw, db


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, store_stats):
        y, mean, rstd = layer_norm_forward(x, weight, bias, eps, store_stats)
        if store_stats:
            ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = layer_norm_backward(dy.contiguous(), x, weight, mean, rstd, need_dx, need_dw, need_db)
        return dx, dw, db, None, None


def layer_norm(input, weight, bias, eps):
    """input [..., N]; weight, bias [N] or None (input's dtype and device); eps a float.
    Returns [..., N]: each row normalized to zero mean and unit variance, scaled and shifted."""
    n = input.shape[-1]
    if n > MAX_N:
        fall_back("layer_norm", f"rows longer than {MAX_N} elements (got N={n}) do not fit in registers")
        return reference.layer_norm(input, weight, bias, eps)
    x = input.reshape(math.prod(input.shape[:-1]), n).contiguous()  # explicit M: reshape(-1, 0) is ambiguous
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    needs = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    y = _LayerNorm.apply(x, w, b, float(eps), needs)
    return y.reshape(input.shape)


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
        acc_ptr = "*fp64" if dtype == torch.float64 else "*fp32"
        acc = tl.float64 if dtype == torch.float64 else tl.float32
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
                {"HAS_W": True, "DX": True, "DW": True, "DB": True, "ACC": acc, "ROWS": rows, "BLOCK_N": block_n},
                num_warps=warps,
            ))
        acc_ptr_red = "*fp64" if dtype == torch.float64 else "*fp32"
        variants.append(CompileVariant(
            f"ln_reduce-{ptr[1:]}", _ln_reduce_partials_kernel,
            {"dw_part_ptr": acc_ptr_red, "db_part_ptr": acc_ptr_red, "dw_ptr": ptr, "db_ptr": ptr, "P": "i32", "N": "i32",
             "DW": "constexpr", "DB": "constexpr", "BLOCK_P": "constexpr", "BLOCK_N": "constexpr"},
            {"DW": True, "DB": True, "BLOCK_P": REDUCE_BLOCK_P, "BLOCK_N": REDUCE_BLOCK_N},
            num_warps=REDUCE_WARPS,
        ))
    return variants


SPEC = register(KernelSpec(
    op="layer_norm",
    triton=layer_norm,
    reference=reference.layer_norm,
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
