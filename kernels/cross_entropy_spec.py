"""Registration of cross_entropy (kernels/cross_entropy.py): cases, compile variants of every
chunk width, the byte model."""

from __future__ import annotations

import torch
import triton.language as tl

from gpudl.kernels._common import REDUCE_BLOCK, triton_dtype
from gpudl.kernels.cross_entropy import cross_entropy, unsupported
from gpudl.kernels.cross_entropy_triton import BLOCK_C_CHOICES, _ce_finalize_kernel, _ce_fwd_kernel, block_sizes
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, register


def _case(name, n, c, reduction="mean", weight=False, ignore=False, smoothing=0.0, ignore_index=-100, scale=3.0):
    def make(dtype, device):
        x = (torch.randn(n, c, device=device) * scale).to(dtype).requires_grad_()
        y = torch.randint(0, c, (n,), device=device)
        if ignore:
            y[::3] = ignore_index
        w = torch.rand(c, device=device, dtype=dtype) + 0.5 if weight else None
        return x, y, w, ignore_index, reduction, smoothing

    return Case(name, make)


def _bench(n, c, smoothing=0.0):
    def make(dtype, device):
        x = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
        return x, torch.randint(0, c, (n,), device=device), None, -100, "mean", smoothing

    return Case(f"N={n} C={c}" + (f" smoothing={smoothing}" if smoothing else ""), make)


def _bytes(args):
    x, y, w, _, reduction, _ = args
    # read logits (once from HBM: the second pass of a row hits L2) and targets; write the gradient
    weight_bytes = w.numel() * w.element_size() if w is not None else 0
    return x.numel() * x.element_size() * (1 + x.requires_grad) + y.numel() * 8 + weight_bytes


def _variants():
    variants = []
    # Rows that fit one chunk (SINGLE_CHUNK: every width), and rows wider than the widest chunk.
    shapes = [(block_c, True) for block_c in BLOCK_C_CHOICES] + [(BLOCK_C_CHOICES[-1], False)]
    for block_c, single in shapes:
        block_n, _, num_warps = block_sizes(block_c)
        for dtype in (torch.float32, torch.bfloat16):
            ptr = triton_dtype(dtype)
            variants.append(CompileVariant(
                f"ce-{str(dtype)[6:]}-BN{block_n}-BC{block_c}-{'single' if single else 'chunked'}", _ce_fwd_kernel,
                {"x_ptr": ptr, "y_ptr": "*i64", "w_ptr": ptr, "out_ptr": "*fp32", "g_ptr": ptr, "n_rows": "i32",
                 "n_classes": "i32", "stride_xn": "i64", "ignore_index": "i64", "smoothing": "fp32",
                 "HAS_WEIGHT": "constexpr", "SMOOTHING": "constexpr", "REDUCTION": "constexpr", "GRAD": "constexpr",
                 "ACC": "constexpr", "BLOCK_N": "constexpr", "BLOCK_C": "constexpr", "SINGLE_CHUNK": "constexpr"},
                {"HAS_WEIGHT": True, "SMOOTHING": True, "REDUCTION": "mean", "GRAD": True, "ACC": tl.float32,
                 "BLOCK_N": block_n, "BLOCK_C": block_c, "SINGLE_CHUNK": single},
                num_warps=num_warps,
            ))
    for out in ("fp32", "bf16"):
        variants.append(CompileVariant(
            f"ce_finalize-{out}", _ce_finalize_kernel,
            {"partial_ptr": "*fp32", "out_ptr": f"*{out}", "scale_ptr": "*fp32", "num_partials": "i32",
             "MEAN": "constexpr", "BLOCK": "constexpr"},
            {"MEAN": True, "BLOCK": REDUCE_BLOCK}, num_warps=4,
        ))
    return variants


SPEC = register(KernelSpec(
    op="cross_entropy",
    triton=cross_entropy,
    unsupported=unsupported,
    cases=[
        _case("[37,5] mean", 37, 5),
        _case("[64,1000] sum weight", 64, 1000, "sum", weight=True),
        _case("[37,5000] mean ignore smoothing=0.1", 37, 5000, "mean", ignore=True, smoothing=0.1),
        _case("[37,10] mean weight ignore=3 smoothing=0.2", 37, 10, "mean", weight=True, ignore=True,
              smoothing=0.2, ignore_index=3),
        _case("[37,17] none weight ignore extreme", 37, 17, "none", weight=True, ignore=True, scale=300.0),
    ],
    gradcheck_case=_case("[5,7] mean weight ignore smoothing", 5, 7, "mean", weight=True, ignore=True, smoothing=0.3),
    tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)},
    compile_variants=_variants,
    bench_cases=[_bench(8192, 32000), _bench(8192, 32000, 0.1), _bench(65536, 1000)],
    flops=None,
    bytes_moved=_bytes,
    description="softmax cross-entropy [N, C] with int64 targets: online logsumexp and gradient in one launch",
))
