"""The kernel registry: each kernel file registers a `KernelSpec`, and everything else reads it.

`gpudl.ops` dispatches through `REGISTRY[op].triton`; the test suite (tests/test_kernels.py)
checks every spec's cases against its reference, gradchecks it and compiles every variant for
sm_80 and sm_90; scripts/bench_kernels.py benchmarks every spec. A new kernel file therefore
gets tests, compile checks and benchmarks by registering itself here.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# The @triton.jit decorator reads TRITON_INTERPRET when the kernel modules are imported; capture
# the same moment so `gpudl.backend` knows whether CPU tensors can run our kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MakeInputs = Callable[[torch.dtype, torch.device], tuple]


@dataclass(frozen=True)
class Case:
    """One set of arguments for an op: `make(dtype, device)` returns the normalized argument tuple
    that both `spec.triton` and `spec.reference` take. Tensors that should get gradients are
    returned with requires_grad=True (the harness compares every one of those gradients)."""

    name: str
    make: MakeInputs
    # The case runs no Triton kernel, by design: it is answered on the host (an empty sequence) or
    # by the PyTorch reference (an argument the kernel does not support, with its one-time
    # warning). The harness fails every other case that launches nothing, and this one if it does.
    expect_fallback: bool = False


@dataclass(frozen=True)
class CompileVariant:
    """One compilation of one @triton.jit kernel: what the autotuner may pick, with a dtype."""

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class KernelSpec:
    op: str  # the gpudl.ops function this kernel implements
    triton: Callable  # entry point, same normalized arguments as `reference`
    reference: Callable  # the PyTorch oracle (gpudl.reference.<op>)
    cases: list[Case]  # interpreter-sized, regular and ragged shapes
    gradcheck_case: Case | None  # tiny, made in float64 for torch.autograd.gradcheck
    # dtype -> (atol, rtol) where the dtype's arithmetic is IEEE: fp32/fp64 through the interpreter
    # on the CPU, and every dtype on a GPU unless gpu_tolerances says otherwise. The harness
    # checks each element: |kernel - reference| <= atol * rms(reference) + rtol * |reference|.
    tolerances: dict[torch.dtype, tuple[float, float]]
    compile_variants: Callable[[], list[CompileVariant]]
    bench_cases: list[Case] = field(default_factory=list)  # GPU-sized
    flops: Callable[[tuple], float] | None = None  # forward FLOPs of one call with these args
    bytes_moved: Callable[[tuple], float] | None = None  # forward minimal HBM bytes
    baselines: dict[str, Callable] = field(default_factory=dict)  # more GPU baselines (same args)
    differentiable: bool = True
    description: str = ""
    # dtype -> (atol, rtol) on a GPU where it computes differently from the interpreter (fp32 on
    # TF32 tensor cores); a dtype not listed uses `tolerances`.
    gpu_tolerances: dict[torch.dtype, tuple[float, float]] = field(default_factory=dict)
    # Shapes that span several programs and loop steps under EVERY autotune config (and every
    # launch heuristic) of the spec's kernels; the tests run each one once per config, forced in
    # turn (gpudl.kernels._common.forced_config), through the interpreter.
    tuning_cases: list[Case] = field(default_factory=list)


REGISTRY: dict[str, KernelSpec] = {}


def register(spec: KernelSpec) -> KernelSpec:
    if spec.op in REGISTRY and REGISTRY[spec.op] is not spec:
        raise ValueError(f"a kernel for op {spec.op!r} is already registered")
    REGISTRY[spec.op] = spec
    return spec


class FallbackWarning(UserWarning):
    """A call of a kernel op runs on the PyTorch reference instead of Triton (the tests turn it into
    an error wherever a fallback is not expected)."""


_warned: set[tuple[str, str]] = set()


def fall_back(op: str, reason: str) -> None:
    """Warn once per (op, reason) that a call runs on the PyTorch reference instead of Triton."""
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"gpudl.ops.{op}: running the PyTorch reference instead of Triton: {reason}", FallbackWarning,
                      stacklevel=3)
