"""Registration data of layer_norm: cases, gradcheck and tuning cases, bench cases, compile variants,
byte model."""

from __future__ import annotations

import torch

from gpudl.kernels._common import acc_dtype, tl_acc, triton_dtype
from gpudl.kernels.layer_norm import layer_norm, unsupported
from gpudl.kernels.layer_norm_triton import (
    DWDB_BLOCK_N,
    DWDB_WARPS,
    MAX_N,
    REDUCE_BLOCK_N,
    REDUCE_BLOCK_P,
    REDUCE_WARPS,
    SPLIT_DWDB_BLOCK_N,
    _dwdb_block_m,
    _ln_bwd_dwdb_kernel,
    _ln_bwd_kernel,
    _ln_fwd_kernel,
    _ln_reduce_partials_kernel,
    launch_config,
)
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, register


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
                 "M": "i32", "N": "i32", "eps": "fp32", "tiles_per_program": "i32", "HAS_W": "constexpr",
                 "HAS_B": "constexpr", "STORE_STATS": "constexpr", "ACC": "constexpr", "ROWS": "constexpr",
                 "BLOCK_N": "constexpr"},
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
        # Rows of BLOCK_N = SPLIT_DWDB_BLOCK_N: dweight/dbias from their own kernel, a [4, 17] grid
        # (40 one-row tiles over the interpreter's 4 programs), 4 forward programs, 65 column
        # blocks of the partials' reduction.
        _case((40, 8200)),
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
