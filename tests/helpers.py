"""Helpers shared by the test files: leaf copies of arguments, the one kernel-vs-reference check of
the per-kernel test files (check_against_reference), the registry harness's comparison (honest
tolerances, a proof that a Triton kernel ran), a recorder of Triton launches, and the autotuned
kernels of a kernel file.

Launches are counted where Triton starts one: `JITFunction.run` (compiled kernels, triton 3.x)
and `InterpretedFunction.run` (the interpreter), which `kernel[grid](...)` and the autotuner
both call. Nothing in the kernel files changes for it, so the count cannot be forgotten there.
The autotuner's own benchmark runs (on a GPU, the first call of each new tuning key) are kept
apart: they are not the launches the code under test asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
from typing import Any, Iterator, NamedTuple

import torch

# A CUDA machine, or the collection of the suite as one (GPUDL_TEST_AS_CUDA=1, tests/conftest.py).
HAS_CUDA = torch.cuda.is_available() or os.environ.get("GPUDL_TEST_AS_CUDA") == "1"

# --------------------------------------------------------------------------- arguments
def flatten(out) -> list[torch.Tensor]:
    """Every tensor of a (nested) output, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in flatten(item)] if isinstance(out, (tuple, list)) else []


def clone_args(args, dtype=None) -> tuple:
    """Independent leaf copies (optionally cast), keeping which tensors require grad; recurses
    into lists and tuples so in-place kernels cannot touch the reference's inputs."""

    def clone(a):
        if isinstance(a, torch.Tensor):
            c = a.detach().clone()
            if dtype is not None and c.is_floating_point():
                c = c.to(dtype)
            return c.requires_grad_(a.requires_grad)
        if isinstance(a, (list, tuple)):
            return type(a)(clone(item) for item in a)
        return a

    return tuple(clone(a) for a in args)


def grad_inputs(args) -> list[int]:
    """Positions of the arguments that require grad."""
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """A new leaf holding a copy of t."""
    return t.detach().clone().requires_grad_(requires_grad)


def leaves(*tensors):
    """New leaves over the same memory (strides kept, for non-contiguous views); None stays None."""
    return [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in tensors]


# --------------------------------------------------------------------------- comparison
def tolerance(spec, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(atol, rtol) of a KernelSpec for a dtype on a device: the GPU's own where it computes
    differently (TF32), else the IEEE one."""
    if torch.device(device).type == "cuda" and dtype in spec.gpu_tolerances:
        return spec.gpu_tolerances[dtype]
    return spec.tolerances[dtype]


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float,
                 min_scale: float = 0.0) -> None:
    """Element by element: |got - want| <= atol * max(rms(want), min_scale) + rtol * |want|
    (compared in float64).

    atol is relative to the tensor's root-mean-square, not its largest element: an element that is
    a sum of many terms carries a rounding error of about eps times a typical element, while one
    large outlier must not loosen every other element (the max did: conv2d accepted 4% errors).
    min_scale is for a result that cancels to zero (the query gradient of attention with one visible
    key): the reference is then rounding noise, and the scale is that of the terms it sums.
    Non-finite values must match exactly; an empty tensor has nothing to compare but its shape."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    if want.numel() == 0:
        return
    g, w = got.detach().double(), want.detach().double()
    finite = torch.isfinite(w)
    rms = w[finite].square().mean().sqrt().item() if finite.any() else 0.0
    scale = max(rms, min_scale) if rms > 0 else max(1.0, min_scale)  # an all-zero reference: atol is absolute
    err = (g - w).abs()
    bound = atol * scale + rtol * w.abs()
    torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{name}: {m}\nworst element: |error| {_worst(err, bound, finite)}; "
                                             f"atol {atol:g} x {scale:.3g} (rms {rms:.3g}), rtol {rtol:g}")


def _worst(err, bound, finite) -> str:
    ratio = torch.where(finite, err / bound.clamp_min(1e-300), torch.zeros_like(err))
    i = int(ratio.flatten().argmax())
    return f"{err.flatten()[i].item():.3g} at flat index {i}, {ratio.flatten()[i].item():.3g}x its bound"


class Pair(NamedTuple):
    """A kernel's and its reference's results on the same inputs (see run_against_reference)."""

    out: Any  # what the kernel returned (a tensor or a tuple of them)
    ref: Any  # what the reference returned
    grads: list  # gradients of the kernel's inputs that require grad, in argument order (None: unused)
    ref_grads: list  # the same for the reference


def run_against_reference(kernel, reference, *inputs, grad=None, **kwargs) -> Pair:
    """kernel(*inputs) and reference(*inputs), each on its own leaves over the input tensors (new
    leaves over the same memory, so views keep their strides; None and non-tensor arguments pass
    through), then the gradients of every input that requires grad under one output gradient
    shared by both: `grad` (a tensor, or one per output that requires grad), else random.
    Keyword arguments go to both functions."""
    kernel_inputs, ref_inputs = _leaves_of(inputs), _leaves_of(inputs)
    out, ref = kernel(*kernel_inputs, **kwargs), reference(*ref_inputs, **kwargs)
    wanted = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor) and a.requires_grad]
    pairs = [(o, r) for o, r in zip(flatten(out), flatten(ref)) if r.requires_grad]
    if not wanted or not pairs or all(r.numel() == 0 for _, r in pairs):
        return Pair(out, ref, [], [])
    if grad is None:
        grads_out = [torch.randn_like(r) for _, r in pairs]
    else:
        grads_out = list(grad) if isinstance(grad, (list, tuple)) else [grad]
    got = torch.autograd.grad([o for o, _ in pairs], [kernel_inputs[i] for i in wanted], grads_out, allow_unused=True)
    want = torch.autograd.grad([r for _, r in pairs], [ref_inputs[i] for i in wanted], grads_out, allow_unused=True)
    return Pair(out, ref, list(got), list(want))


def check_against_reference(kernel, reference, *inputs, grad=None, atol: float = 1e-5, rtol: float = 1e-5,
                            min_scale: float = 0.0, **kwargs) -> Pair:
    """The one kernel-vs-reference check of the per-kernel test files: run_against_reference, then
    every output (same shape and dtype) and every input gradient element by element
    (assert_close: atol x the tensor's RMS + rtol x |reference|). Keyword arguments other than
    these go to both functions. Returns the Pair, for the test's own further checks (layouts,
    which kernel ran)."""
    pair = run_against_reference(kernel, reference, *inputs, grad=grad, **kwargs)
    outs, refs = flatten(pair.out), flatten(pair.ref)
    assert len(outs) == len(refs), f"the kernel returned {len(outs)} tensors, the reference {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.dtype == r.dtype, f"output {i} has dtype {o.dtype}, the reference {r.dtype}"
    assert_all_close(outs, refs, atol, rtol, what="output", min_scale=min_scale)
    assert_all_close(pair.grads, pair.ref_grads, atol, rtol, what="gradient", min_scale=min_scale)
    return pair


def assert_all_close(got, want, atol: float = 1e-5, rtol: float = 1e-5, what: str = "tensor",
                     min_scale: float = 0.0) -> None:
    """assert_close on each pair of two equally long sequences of tensors (None only against None)."""
    got, want = list(got), list(want)
    assert len(got) == len(want), f"{len(got)} {what}s, the reference has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"{what} {i}: {'none' if g is None else 'one'} against the " \
                                           f"reference's {'none' if w is None else 'one'}"
        if w is not None:
            assert_close(f"{what} {i}", g, w, atol, rtol, min_scale)


def on_backend(name: str, fn):
    """fn, run inside gpudl.use_backend(name): `check_against_reference(on_backend("triton", f),
    on_backend("torch", f), ...)` compares the two backends of one gpudl.ops call."""
    import gpudl

    def run(*args, **kwargs):
        with gpudl.use_backend(name):
            return fn(*args, **kwargs)

    return run


def check_triton_against_torch(fn, *inputs, **kwargs) -> Pair:
    """check_against_reference of a gpudl.ops call `fn` on the triton backend against the same
    call on the torch backend (same keyword arguments as check_against_reference)."""
    return check_against_reference(on_backend("triton", fn), on_backend("torch", fn), *inputs, **kwargs)


def _leaves_of(inputs) -> list:
    return [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in inputs]


def compare_with_reference(spec, case, dtype: torch.dtype, device: torch.device, launches) -> None:
    """The registry harness on one case: the kernel entry (`spec.triton`) against the reference on
    copies of the same arguments, every output and every input gradient, element by element within
    the spec's tolerance for this dtype and device; and a Triton launch proven (`launches` counts
    them), unless the case is declared `expect_fallback`, which must then launch none.

    The reference runs in float64 on the same (already rounded) inputs and output gradients, so
    what is measured is the kernel's own error, not the sum of two roundings."""
    atol, rtol = tolerance(spec, dtype, device)
    torch.manual_seed(0)
    args = case.make(dtype, torch.device(device))
    kernel_args = clone_args(args)
    ref_args = clone_args(args, torch.float64)

    before = len(launches)
    outs = flatten(spec.triton(*kernel_args))
    refs = flatten(spec.reference(*ref_args))
    assert len(outs) == len(refs), f"{len(outs)} outputs, reference has {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert not o.is_floating_point() or o.dtype == dtype, f"output {i} has dtype {o.dtype}, expected {dtype}"
        assert_close(f"output {i}", o, r, atol, rtol)

    grad_idx = grad_inputs(args)
    if spec.differentiable and grad_idx:
        pairs = [(o, r) for o, r in zip(outs, refs) if r.requires_grad]
        grads_out = [torch.randn_like(o) for o, _ in pairs]
        got = torch.autograd.grad([o for o, _ in pairs], [kernel_args[i] for i in grad_idx], grads_out,
                                  allow_unused=True)
        want = torch.autograd.grad([r for _, r in pairs], [ref_args[i] for i in grad_idx],
                                   [g.to(r.dtype) for g, (_, r) in zip(grads_out, pairs)], allow_unused=True)
        for i, g, w in zip(grad_idx, got, want):
            assert (g is None) == (w is None), \
                f"gradient of argument {i}: kernel gives {'none' if g is None else 'one'}, " \
                f"reference {'none' if w is None else 'one'}"
            if w is not None:
                assert_close(f"gradient of argument {i}", g, w, atol, rtol)

    ran = len(launches) - before
    if case.expect_fallback:
        assert ran == 0, f"{spec.op} {case.name}: declared expect_fallback, yet launched {ran} Triton kernel(s)"
    else:
        assert ran > 0, f"{spec.op} {case.name}: no Triton kernel launched (the reference answered?)"


# --------------------------------------------------------------------------- launches
@dataclasses.dataclass
class Launch:
    kernel: str  # the @triton.jit function's name
    module: str  # the module that defines it, e.g. gpudl.kernels.linear
    grid: tuple | None  # programs per grid axis (None when the grid function could not be evaluated here)
    kwargs: dict[str, Any]  # keyword arguments of the launch (constexprs, and an autotuner's config)
    function: Any  # the JITFunction / InterpretedFunction itself

    @property
    def programs(self) -> int | None:
        return None if self.grid is None else math.prod(self.grid)


class Launches:
    """Every Triton launch while recording, in order (`records`), apart from the autotuner's
    benchmark runs (`benchmark_records`)."""

    def __init__(self):
        self.records: list[Launch] = []
        self.benchmark_records: list[Launch] = []
        self._benchmarking = 0

    def __len__(self) -> int:
        return len(self.records)

    def of(self, kernel: str) -> list[dict[str, Any]]:
        """The keyword arguments (plus "grid") of each launch of the kernel named `kernel`."""
        return [{"grid": r.grid, **r.kwargs} for r in self.records if r.kernel == kernel]

    def kernels(self) -> list[str]:
        return [r.kernel for r in self.records]

    def modules(self) -> set[str]:
        return {r.module for r in self.records}

    def _add(self, function, grid, kwargs) -> None:
        fn = getattr(function, "fn", function)
        if callable(grid):
            try:
                grid = grid(dict(kwargs))
            except Exception:  # a grid function reading positional arguments: count it, size unknown
                grid = None
        if grid is not None:
            grid = tuple(int(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,)))
        launch = Launch(fn.__name__, getattr(fn, "__module__", "?"), grid, dict(kwargs), function)
        (self.benchmark_records if self._benchmarking else self.records).append(launch)


def _launch_classes() -> list[type]:
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a triton without the interpreter
        pass
    else:
        classes.append(InterpretedFunction)
    return classes


@contextlib.contextmanager
def recording_launches() -> Iterator[Launches]:
    """Record every Triton kernel launch (compiled or interpreted) made inside the block."""
    from triton.runtime.autotuner import Autotuner

    launches = Launches()
    originals = {cls: cls.__dict__["run"] for cls in _launch_classes()}
    bench = Autotuner.__dict__["_bench"]

    def recorded(run):
        def run_and_record(self, *args, grid, warmup, **kwargs):
            if not warmup:
                launches._add(self, grid, kwargs)
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

        return run_and_record

    def benchmarking(self, *args, **kwargs):
        launches._benchmarking += 1
        try:
            return bench(self, *args, **kwargs)
        finally:
            launches._benchmarking -= 1

    for cls, run in originals.items():
        cls.run = recorded(run)
    Autotuner._bench = benchmarking
    try:
        yield launches
    finally:
        for cls, run in originals.items():
            cls.run = run
        Autotuner._bench = bench


# --------------------------------------------------------------------------- autotuned kernels
def autotuned_kernels(module: types.ModuleType) -> dict[str, Any]:
    """{name: Autotuner} of every autotuned kernel a kernel file defines at module level."""
    from triton.runtime.autotuner import Autotuner

    return {name: obj for name, obj in vars(module).items() if isinstance(obj, Autotuner)}


def innermost_function(kernel):
    """The JITFunction / InterpretedFunction an autotuner (or heuristics wrapper) finally launches."""
    classes = tuple(_launch_classes())
    while not isinstance(kernel, classes):
        kernel = kernel.fn
    return kernel


# --------------------------------------------------------------------------- training runs
def add_callback(monkeypatch, callback) -> None:
    """Make gpudl.train.train() add `callback` to the callbacks it builds from the config."""
    import gpudl.train as train_module

    original = train_module.instantiate_group

    def with_callback(node, key, extra=None):
        objects = original(node, key, extra)
        return objects + [callback] if key == "callbacks" else objects

    monkeypatch.setattr(train_module, "instantiate_group", with_callback)
