"""Registration of mse_loss (kernels/mse.py): cases, compile variants, the byte model."""

from __future__ import annotations

import torch
import triton.language as tl

from gpudl.kernels._common import sum_partials_variants, triton_dtype
from gpudl.kernels.mse import mse_loss
from gpudl.kernels.mse_triton import BLOCK, NUM_WARPS, _mse_fwd_kernel
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, register


def _case(name, shape, reduction, target_grad=False):
    def make(dtype, device):
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        t = torch.randn(shape, device=device, dtype=dtype).requires_grad_(target_grad)
        return x, t, reduction

    return Case(name, make)


def _bench(n, reduction="mean"):
    def make(dtype, device):
        return (torch.randn(n, device=device, dtype=dtype, requires_grad=True),
                torch.randn(n, device=device, dtype=dtype), reduction)

    return Case(f"n={n} {reduction}", make)


def _bytes(args):
    x, t, reduction = args
    # read input and target; write the loss ('none') and the saved gradient (if any grad is needed)
    writes = (reduction == "none") + (x.requires_grad or t.requires_grad)
    return x.numel() * x.element_size() * (2 + writes)


def _variants():
    variants = []
    for dtype in (torch.float32, torch.bfloat16):
        ptr = triton_dtype(dtype)
        for reduction, index_64 in (("mean", False), ("none", False), ("sum", True)):
            variants.append(CompileVariant(
                f"mse-{str(dtype)[6:]}-{reduction}-i{64 if index_64 else 32}-B{BLOCK}", _mse_fwd_kernel,
                {"x_ptr": ptr, "t_ptr": ptr, "out_ptr": ptr if reduction == "none" else "*fp32", "g_ptr": ptr,
                 "n": "i64" if index_64 else "i32", "REDUCTION": "constexpr", "GRAD": "constexpr",
                 "ACC": "constexpr", "INDEX_64": "constexpr", "BLOCK": "constexpr"},
                {"REDUCTION": reduction, "GRAD": True, "ACC": tl.float32, "INDEX_64": index_64, "BLOCK": BLOCK},
                num_warps=NUM_WARPS,
            ))
    return variants + sum_partials_variants()


SPEC = register(KernelSpec(
    op="mse_loss",
    triton=mse_loss,
    cases=[
        _case("n=1000 mean", (1000,), "mean", target_grad=True),
        _case("n=4097 sum", (4097,), "sum"),
        _case("[37,5] none", (37, 5), "none", target_grad=True),
        _case("[3,7,11] mean", (3, 7, 11), "mean"),
    ],
    gradcheck_case=_case("[6,5] mean", (6, 5), "mean", target_grad=True),
    tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)},
    compile_variants=_variants,
    bench_cases=[_bench(2**24), _bench(2**26), _bench(2**24, "none")],
    flops=lambda args: 3 * args[0].numel(),  # subtract, square, add
    bytes_moved=_bytes,
    description="MSE: loss and d/dinput in one launch; backward is one multiply (target: its negation)",
))
