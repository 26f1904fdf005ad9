"""The kernel registry: each kernel file registers a `KernelSpec`, and everything else reads it.

`gpudl.ops` dispatches through `REGISTRY[op]` (its Triton entry, and the arguments it does not
support, which run on the PyTorch reference instead); the test suite checks every spec's cases
against its reference, gradchecks it, runs `torch.library.opcheck` over the custom ops it calls,
compiles it with torch.compile and compiles every variant for sm_80 and sm_90;
scripts/bench_kernels.py benchmarks every spec. A new kernel file therefore gets tests, compile
checks and benchmarks by registering itself here.

Each kernel's launches live inside `torch.library` custom ops of the `gpudl` namespace, defined
with `kernel_op`, so autograd, fake tensors, torch.compile and CUDA graphs treat them as the
PyTorch ops they are.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
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
    # What the audit's hot-loop model compares the variant with: "gemm" (the plain GEMM at its
    # tile), "attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq" (the textbook flash
    # attention kernel of that role), or "" to let the audit infer it from the kernel's name.
    role: str = ""
    # The GPUs (compute capability x 10) whose launches can pick this compilation: all that the
    # compile check targets, unless the kernel's tile table depends on the arch (linear's).
    archs: tuple[int, ...] = (80, 90)


@dataclass(frozen=True, kw_only=True)
class KernelSpec:
    op: str  # the gpudl.ops function this kernel implements
    triton: Callable  # entry point: the op's normalized arguments (as gpudl.ops passes them on)
    cases: list[Case]  # interpreter-sized, regular and ragged shapes
    gradcheck_case: Case | None  # tiny, made in float64 for torch.autograd.gradcheck
    # dtype -> (atol, rtol) where the dtype's arithmetic is IEEE: fp32/fp64 through the interpreter
    # on the CPU, and every dtype on a GPU unless gpu_tolerances says otherwise. The harness
    # checks each element: |kernel - reference| <= atol * rms(reference) + rtol * |reference|.
    tolerances: dict[torch.dtype, tuple[float, float]]
    compile_variants: Callable[[], list[CompileVariant]]
    # The PyTorch oracle, same arguments as `triton`; None means gpudl.reference.<op>.
    reference: Callable | None = None
    # What the kernel does not run: called with the normalized arguments, it returns the reason
    # (gpudl.ops then runs the reference, warning once) or None when the kernel takes them.
    unsupported: Callable[..., str | None] | None = None
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


def _default_reference(op: str) -> Callable:
    # Looked up at call time: the kernel layer does not import gpudl.reference.
    def reference(*args):
        return getattr(importlib.import_module("gpudl.reference"), op)(*args)

    reference.__name__ = reference.__qualname__ = f"reference.{op}"
    return reference


def register(spec: KernelSpec) -> KernelSpec:
    if spec.op in REGISTRY and REGISTRY[spec.op] is not spec:
        raise ValueError(f"a kernel for op {spec.op!r} is already registered")
    if spec.reference is None:
        object.__setattr__(spec, "reference", _default_reference(spec.op))
    REGISTRY[spec.op] = spec
    return spec


# --------------------------------------------------------------------------- custom ops
def _launch_device_check(name: str, fn: Callable) -> Callable:
    """Refuse CPU tensors unless the interpreter runs the kernels: a clear error instead of
    Triton's failure deep inside a launch."""

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        if not INTERPRET:
            for a in (*args, *kwargs.values()):
                for t in (a if isinstance(a, (list, tuple)) else (a,)):
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        raise RuntimeError(
                            f"torch.ops.gpudl.{name} runs Triton kernels and needs CUDA tensors, got a CPU tensor. "
                            "Set TRITON_INTERPRET=1 before gpudl.kernels is imported to run the kernels on the CPU "
                            "through the Triton interpreter, or call gpudl.ops (backend 'auto' or 'torch')."
                        )
        return fn(*args, **kwargs)

    # torch.library infers the op's schema from the signature: give it the evaluated annotations
    # (kernel files use `from __future__ import annotations`, which leaves them as strings).
    checked.__signature__ = inspect.signature(fn, eval_str=True)
    return checked


def kernel_op(name: str, *, mutates_args: tuple[str, ...] | str = (), traceable: bool = True):
    """Decorator defining the custom op `torch.ops.gpudl.<name>` from a function that launches
    Triton kernels through `torch.library.wrap_triton(kernel)[grid](...)`.

    Compiled kernels: `torch.library.triton_op`, which Inductor traces into so it sees our kernels
    and can fuse around them. Under the interpreter (and for ops whose launch code reads data
    pointers, `traceable=False`): `torch.library.custom_op`, opaque to the compiler. Either way
    the caller adds a fake implementation (`register_fake`) and, if differentiable, autograd
    (`register_autograd`). The schema comes from the function's type annotations."""

    def decorate(fn: Callable):
        qualified = f"gpudl::{name}"
        checked = _launch_device_check(name, fn)
        if INTERPRET or not traceable:
            return torch.library.custom_op(qualified, mutates_args=mutates_args)(checked)
        return torch.library.triton_op(qualified, mutates_args=mutates_args)(checked)

    return decorate


def first_order_only(op) -> None:
    """Register, for a backward op, an autograd formula that refuses double backward: the Triton
    gradients carry no graph of their own (what `once_differentiable` says of an autograd.Function)."""

    def refuse(ctx, *grads):
        raise RuntimeError(
            f"torch.ops.{op._namespace}.{op._name}: gpudl's Triton gradients are once_differentiable; "
            "double backward (create_graph=True) needs backend 'torch'"
        )

    op.register_autograd(refuse)


def no_tensor(like: torch.Tensor) -> torch.Tensor:
    """A custom op cannot return None where it returns a tensor: this empty tensor stands for
    "not computed" (a gradient nobody asked for, statistics nobody will read)."""
    return like.new_empty(0)


# --------------------------------------------------------------------------- fallbacks
class FallbackWarning(UserWarning):
    """A call of a kernel op runs on the PyTorch reference instead of Triton (the tests turn it into
    an error wherever a fallback is not expected)."""


_warned: set[tuple[str, str]] = set()


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside gpudl's op layers (ops, nn, kernels) and torch:
    the line that called gpudl.ops, directly or through a gpudl.nn module."""
    gpudl_dir = Path(sys.modules["gpudl"].__file__).resolve().parent  # gpudl.kernels is its subpackage
    internal = (str(Path(__file__).resolve().parent) + os.sep, str(Path(torch.__file__).resolve().parent) + os.sep,
                *(str(gpudl_dir / name) for name in ("ops.py", "nn.py", "backend.py")))
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


def fall_back(op: str, reason: str) -> None:
    """Warn once per (op, reason) that a call runs on the PyTorch reference instead of Triton,
    pointing at the user's line."""
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"gpudl.ops.{op}: running the PyTorch reference instead of Triton: {reason}", FallbackWarning,
                      stacklevel=_caller_stacklevel())
