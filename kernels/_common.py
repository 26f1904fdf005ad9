"""What the kernel files share: small @triton.jit helpers, accumulator dtypes, the deterministic
partial-sum reduction of the loss kernels, and host utilities. Kernel files import from here,
never from each other.

Everything here works under the Triton interpreter: no libdevice calls (tanh and softplus are
written from exp and log), and autotune config lists collapse to one config when interpreting.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from gpudl.kernels.registry import INTERPRET

# The epilogue activations, passed to kernels by name as a tl.constexpr (each compiles its own epilogue).
ACTIVATION_NAMES = ("none", "relu", "leaky_relu", "tanh", "sigmoid", "gelu")
LEAKY_RELU_SLOPE: tl.constexpr = tl.constexpr(0.01)

# Shared-memory limits per block, bytes (CUDA programming guide, compute capability tables).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}

# Loss reductions as a tl.constexpr code.
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
INT32_LIMIT = 2**31 - 1  # element offsets past this need int64 index arithmetic
REDUCE_BLOCK = 1024  # the one-program partial-sum kernel's block


def activation_constexpr(activation: str | None) -> str:
    """The ACTIVATION constexpr of an epilogue: the activation's name, "none" for None."""
    name = "none" if activation is None else activation
    if name not in ACTIVATION_NAMES:
        raise ValueError(f"activation: got {activation!r}, expected one of {ACTIVATION_NAMES[1:]} or None")
    return name


def gemm_tile(block_m: int, block_n: int, block_k: int, warps: int, stages: int, **extra) -> triton.Config:
    """One GEMM autotune candidate: a BLOCK_M x BLOCK_N output tile stepping BLOCK_K along K, plus the
    kernel's own tile constexprs (`extra`, e.g. linear's GROUP_M)."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, **extra},
                         num_warps=warps, num_stages=stages)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype: float32, or float64 for float64 inputs (so the float64 gradcheck is exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    """`acc_dtype` as a Triton dtype, to pass as a tl.constexpr."""
    return tl.float64 if dtype == torch.float64 else tl.float32


class TuningConfigs(list):
    """The configs an autotuner tries, remembering every candidate (`.candidates`) when it tries
    only some of them (the interpreter runs the first), so that `forced_config` can pick any."""

    def __init__(self, configs, candidates):
        super().__init__(configs)
        self.candidates = list(candidates)


def tuning_configs(configs: list[triton.Config], interpreter: triton.Config | None = None) -> list[triton.Config]:
    """The autotuner's candidates; one config when interpreting, so nothing is benchmarked: the
    first candidate, or `interpreter` where the GPU's tiles cost the interpreter too much (it runs
    a program's ops one numpy call at a time, so its time follows tile area x loop steps). The
    candidates are still each checked through the interpreter by the registry's tuning cases."""
    return TuningConfigs([interpreter or configs[0]] if INTERPRET else configs, configs)


def tuning_candidates(kernel) -> list[triton.Config]:
    """Every config an autotuned kernel (a triton Autotuner) may run, whether or not it is tried here."""
    return list(getattr(kernel.configs, "candidates", kernel.configs))


@contextlib.contextmanager
def forced_config(kernel, index: int) -> Iterator[triton.Config]:
    """Run the autotuned `kernel` with its `index`-th candidate config only (no pruning, no
    benchmarking: the autotuner skips both for a single config), e.g. to check each config's
    numbers against the reference through the interpreter. Restores the autotuner on exit."""
    candidates = tuning_candidates(kernel)
    config = candidates[index]
    saved = kernel.configs, kernel.cache
    kernel.configs, kernel.cache = TuningConfigs([config], candidates), {}
    try:
        yield config
    finally:
        kernel.configs, kernel.cache = saved


def fp32_matmul_allows_tf32() -> bool:
    """torch's own switch for fp32 matmuls (off by default). The new API's `fp32_precision`
    reflects the legacy `allow_tf32` and `set_float32_matmul_precision` too, while reading
    `allow_tf32` raises once the new API was used, so read the new one where it exists."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision not in ("ieee", "none")  # "tf32" (or the even looser "bf16")
    return bool(matmul.allow_tf32)


def triton_dtype(torch_dtype) -> str:
    """Signature string of a pointer to `torch_dtype`, for compile checks."""
    import torch

    names = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}
    return names[torch_dtype]


@triton.jit
def sigmoid(x):
    # exp of a non-positive number only: no overflow for any x.
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def tanh(x):
    z = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - z) / (1.0 + z)
    return tl.where(x >= 0, t, -t)


@triton.jit
def softplus(x):
    """log(1 + exp(x)), exact for any x."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr):
    """Epilogue activation by name (ACTIVATION_NAMES); gelu is the exact erf form."""
    if ACTIVATION == "relu":
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == "leaky_relu":
        x = tl.where(x >= 0, x, x * LEAKY_RELU_SLOPE)
    elif ACTIVATION == "tanh":
        x = tanh(x)
    elif ACTIVATION == "sigmoid":
        x = sigmoid(x)
    elif ACTIVATION == "gelu":
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    return x


@triton.jit
def activation_grad_from_saved(saved, grad, ACTIVATION: tl.constexpr):
    """d activation / d pre times grad, from what the forward saved: the OUTPUT y for relu,
    leaky_relu, tanh and sigmoid (their derivative is a function of y, and the output exists
    anyway, as in PyTorch's autograd), the pre-activation for gelu (not a function of y)."""
    if ACTIVATION == "relu":
        grad = tl.where(saved > 0, grad, 0.0)
    elif ACTIVATION == "leaky_relu":
        grad = tl.where(saved > 0, grad, grad * LEAKY_RELU_SLOPE)  # y > 0 exactly when pre > 0
    elif ACTIVATION == "tanh":
        grad = grad * (1.0 - saved * saved)
    elif ACTIVATION == "sigmoid":
        grad = grad * saved * (1.0 - saved)
    elif ACTIVATION == "gelu":
        grad = activation_grad(saved, grad, "gelu")
    return grad


@triton.jit
def activation_grad(pre, grad, ACTIVATION: tl.constexpr):
    """d activation(pre) / d pre times grad, from the pre-activation value."""
    if ACTIVATION == "relu":
        grad = tl.where(pre > 0, grad, 0.0)
    elif ACTIVATION == "leaky_relu":
        grad = tl.where(pre > 0, grad, grad * LEAKY_RELU_SLOPE)  # torch uses the slope at 0
    elif ACTIVATION == "tanh":
        t = tanh(pre)
        grad = grad * (1.0 - t * t)
    elif ACTIVATION == "sigmoid":
        s = sigmoid(pre)
        grad = grad * s * (1.0 - s)
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(pre * 0.7071067811865476))
        pdf = tl.exp(-0.5 * pre * pre) * 0.3989422804014327
        grad = grad * (cdf + pre * pdf)
    return grad


# --------------------------------------------------------------------------- deterministic sums
@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, num_partials, divisor, DIVIDE: tl.constexpr, BLOCK: tl.constexpr):
    """out[0] = sum(partials) (/ divisor): one program, a fixed order, so results are reproducible."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], partial_ptr.dtype.element_ty)
    for start in range(0, num_partials, BLOCK):
        acc += tl.load(partial_ptr + start + offs, mask=start + offs < num_partials, other=0.0)
    total = tl.sum(acc, axis=0)
    if DIVIDE:
        total = total / divisor
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


def sum_partials(partials: torch.Tensor, out_dtype: torch.dtype, divisor: int | None = None) -> torch.Tensor:
    """0-d tensor of dtype out_dtype: the sum of `partials` [P], divided by `divisor` if given."""
    out = torch.empty((), dtype=out_dtype, device=partials.device)
    wrap_triton(_sum_partials_kernel)[(1,)](partials, out, partials.numel(), divisor or 1, DIVIDE=divisor is not None,
                                            BLOCK=REDUCE_BLOCK, num_warps=4)
    return out


def sum_partials_variants() -> list:
    """Compile variants of the partial-sum kernel, for the specs of the ops that use it."""
    from gpudl.kernels.registry import CompileVariant

    return [CompileVariant(
        f"sum_partials-{out}", _sum_partials_kernel,
        {"partial_ptr": "*fp32", "out_ptr": f"*{out}", "num_partials": "i32", "divisor": "i64",
         "DIVIDE": "constexpr", "BLOCK": "constexpr"},
        {"DIVIDE": True, "BLOCK": REDUCE_BLOCK}, num_warps=4,
    ) for out in ("fp32", "bf16")]


def empty_reduction(reduction: str, like: torch.Tensor) -> torch.Tensor:
    """What PyTorch returns for a loss over zero elements: nan for mean, 0 for sum."""
    return torch.full((), math.nan if reduction == "mean" else 0.0, dtype=like.dtype, device=like.device)
