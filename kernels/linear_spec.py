"""Registration data of the linear family: cases, tuning and gradcheck cases, bench cases, compile
variants, FLOP/byte model (the kernels are in linear_triton.py, the op layer in linear.py)."""

from __future__ import annotations

import math

import torch
import triton.language as tl

from gpudl.kernels._common import SHARED_MEMORY_LIMIT, triton_dtype
from gpudl.kernels.linear import linear
from gpudl.kernels.linear_triton import (
    COLUMN_SUM_TILE,
    COLUMN_SUM_WARPS,
    ELEMENTWISE_TILE,
    ELEMENTWISE_WARPS,
    _activation_backward_kernel,
    _column_sum_kernel,
    _matmul_kernel,
    tile_table,
    tiles_that_fit,
    uses_tensor_cores,
)
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, register


def _case(lead, in_features, out_features, has_bias, activation_name):
    def make(dtype, device):
        x = torch.randn(*lead, in_features, dtype=dtype, device=device, requires_grad=True)
        w = torch.randn(out_features, in_features, dtype=dtype, device=device) / math.sqrt(max(in_features, 1))
        w.requires_grad_()
        b = torch.randn(out_features, dtype=dtype, device=device, requires_grad=True) if has_bias else None
        return x, w, b, activation_name

    return make


_CASES = [
    Case("regular-4x32x16-bias", _case((4,), 32, 16, True, None)),
    Case("regular-4x32x16-nobias-relu", _case((4,), 32, 16, False, "relu")),
    *[Case(f"ragged-3x5x37x23-{act}", _case((3, 5), 37, 23, True, act))
      for act in ("relu", "leaky_relu", "tanh", "sigmoid", "gelu")],
    Case("ragged-3x5x37x23-nobias-gelu", _case((3, 5), 37, 23, False, "gelu")),
    # Aligned rows (tensor-descriptor loads in all three GEMMs) and several programs of every kernel:
    # 6 output tiles of 128x256 over 4 persistent programs, a [10, 3] grid of the dz kernel (relu),
    # 3 column blocks of the bias gradient.
    Case("aligned-300x64x260-relu-descriptors", _case((300,), 64, 260, True, "relu")),
]

_BENCH_CASES = [
    Case("M4096-K4096-N4096", _case((4096,), 4096, 4096, True, None)),
    Case("M8192-K4096-N11008-gelu", _case((8192,), 4096, 11008, True, "gelu")),
    Case("M16384-K1024-N4096-relu", _case((16384,), 1024, 4096, True, "relu")),
]


def _flops(args) -> float:
    x, w = args[0], args[1]
    return 2.0 * (x.numel() // x.shape[-1]) * w.shape[0] * w.shape[1]


def _bytes_moved(args) -> float:
    x, w, b = args[0], args[1], args[2]
    y = (x.numel() // x.shape[-1]) * w.shape[0]
    return float((x.numel() + w.numel() + (0 if b is None else b.numel()) + y) * x.element_size())


# The GEMM's launches, each compiled on its own (a launch specializes them), with descriptor loads
# in the layouts of the three products: the forward (x row-major, W^T column-major) with bias and
# gelu (the heaviest activation); gelu's backward recompute (bias, gelu's gradient times dy) in the
# same layout; grad input (dz and W row-major) and grad weight (dz^T column-major, x row-major)
# plain; and the pointer loads of operands a descriptor cannot address (ragged features), forward.
_PLAIN = {"HAS_BIAS": False, "ACTIVATION": "none", "EPILOGUE": "activation"}
_DESCRIPTORS = {"LOADS": "descriptor"}
_GEMM_MODES = {
    "fwd-bias-gelu": {"HAS_BIAS": True, "ACTIVATION": "gelu", "EPILOGUE": "activation",
                      **_DESCRIPTORS, "A_MAJOR": "row", "B_MAJOR": "column"},
    "bwd-recompute-gelu": {"HAS_BIAS": True, "ACTIVATION": "gelu", "EPILOGUE": "activation_grad",
                           **_DESCRIPTORS, "A_MAJOR": "row", "B_MAJOR": "column"},
    "dgrad": {**_PLAIN, **_DESCRIPTORS, "A_MAJOR": "row", "B_MAJOR": "row"},
    "wgrad": {**_PLAIN, **_DESCRIPTORS, "A_MAJOR": "column", "B_MAJOR": "row"},
    "pointer-fwd-bias-gelu": {"HAS_BIAS": True, "ACTIVATION": "gelu", "EPILOGUE": "activation",
                              "LOADS": "pointer", "A_MAJOR": "row", "B_MAJOR": "column"},
}


def _tiles_by_arch(size: int, precision: str) -> list[tuple]:
    """[(config, archs)]: each candidate of the tile tables for the element size and precision, with
    the GPUs whose table holds it and whose shared memory its pipeline fits."""
    tiles: dict[int, tuple] = {}
    for arch, limit in sorted(SHARED_MEMORY_LIMIT.items()):
        for config in tiles_that_fit(tile_table(size, precision, arch), size, limit):
            tiles.setdefault(id(config), (config, []))[1].append(arch)
    return [(config, tuple(archs)) for config, archs in tiles.values()]


def _compile_variants() -> list[CompileVariant]:
    """Every autotune config the GEMM may pick for the dtype and precision on each GPU (compiled for
    the GPUs whose table holds it), with each epilogue, in fp32 (IEEE, torch's default, and TF32,
    opt-in) and bf16; and the two elementwise kernels in fp32 and bf16. IEEE fp32 products take
    the pointer loads on a GPU (kernels/linear.py), so their four GEMMs compile so."""
    variants = []
    gemm_sig = {name: "i32" for name in ("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn",
                                         "stride_cm", "stride_cn")}
    for dtype, precision in ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "ieee")):
        ptr = triton_dtype(dtype)
        size = torch.empty((), dtype=dtype).element_size()
        if uses_tensor_cores(size, precision):
            modes = _GEMM_MODES
        else:
            modes = {mode: {**switches, "LOADS": "pointer"} for mode, switches in _GEMM_MODES.items()
                     if not mode.startswith("pointer-")}
        for config, archs in _tiles_by_arch(size, precision):
            kw = config.kwargs
            for mode, switches in modes.items():
                variants.append(CompileVariant(
                    name=f"matmul-{mode}-{ptr[1:]}-{precision}-{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}"
                         f"-w{config.num_warps}-s{config.num_stages}",
                    kernel=_matmul_kernel,
                    signature={"a_ptr": ptr, "b_ptr": ptr, "c_ptr": ptr, "bias_ptr": ptr, "dy_ptr": ptr,
                               **gemm_sig},
                    constexprs={**switches, "ACC_DTYPE": tl.float32, "INPUT_PRECISION": precision, **kw},
                    num_warps=config.num_warps,
                    num_stages=config.num_stages,
                    archs=archs,
                ))
    for dtype in (torch.float32, torch.bfloat16):
        ptr = triton_dtype(dtype)
        variants.append(CompileVariant(
            name=f"activation_backward-{ptr[1:]}-sigmoid",
            kernel=_activation_backward_kernel,
            signature={"dy_ptr": ptr, "saved_ptr": ptr, "dz_ptr": ptr,
                       **{n: "i32" for n in ("M", "N", "stride_dym", "stride_dyn", "stride_sm", "stride_sn")}},
            constexprs={"ACTIVATION": "sigmoid", "COMPUTE_DTYPE": tl.float32, **ELEMENTWISE_TILE},
            num_warps=ELEMENTWISE_WARPS,
        ))
        variants.append(CompileVariant(
            name=f"column_sum-{ptr[1:]}",
            kernel=_column_sum_kernel,
            signature={"x_ptr": ptr, "out_ptr": ptr, **{n: "i32" for n in ("M", "N", "stride_m", "stride_n")}},
            constexprs={"ACC_DTYPE": tl.float32, **COLUMN_SUM_TILE},
            num_warps=COLUMN_SUM_WARPS,
        ))
    return variants


SPEC = register(KernelSpec(
    op="linear",
    triton=linear,
    cases=_CASES,
    gradcheck_case=Case("gradcheck-2x3x5x4-gelu", _case((2, 3), 5, 4, True, "gelu")),
    # fp32 products are IEEE unless the user opts into TF32 (the cases need 6e-7).
    tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)},
    compile_variants=_compile_variants,
    # M = 1100 rows: more than GROUP_M (8) row blocks under every config, so the grouped order has a
    # full and a partial group, and more output tiles than the interpreter's persistent programs
    # (each walks several); several K steps in all three GEMMs. 72 / 260 features: every operand
    # goes through tensor descriptors; 37 / 131: none can (148-byte rows), the pointer loads run.
    # gelu's backward recomputes its pre-activation in the GEMM; the bias gradient is a column sum.
    tuning_cases=[Case("tuning-1100x72x260-gelu", _case((1100,), 72, 260, True, "gelu")),
                  Case("tuning-1100x37x131-relu-pointer-loads", _case((1100,), 37, 131, True, "relu"))],
    bench_cases=_BENCH_CASES,
    flops=_flops,
    bytes_moved=_bytes_moved,
    description="tiled GEMM with bias and activation epilogue; Triton backward (dz from the saved output, or "
                "gelu's pre-activation recomputed by the GEMM; dx and dW GEMMs, bias grad by a column sum)",
))
