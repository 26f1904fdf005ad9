"""Registry-driven kernel tests: every registered KernelSpec, every case, against its reference.

Adding a kernel file that registers a KernelSpec adds its tests here without touching this file:
forward outputs and every input gradient against the PyTorch reference, element by element within
the spec's tolerance (through the Triton interpreter on the CPU, compiled on a GPU, where
float16/bfloat16 are added), with a Triton launch proven for every case; a float64 gradcheck;
every autotune config of every kernel forced in turn on a multi-tile shape (interpreter); and
ahead-of-time compilation of every variant for sm_80 and sm_90.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings

import pytest
import torch
from gpu_semantics import checking_gpu_semantics
from helpers import (
    HAS_CUDA,
    assert_close,
    autotuned_kernels,
    clone_args,
    compare_with_reference,
    flatten,
    grad_inputs,
    innermost_function,
    recording_launches,
    tolerance,
)
from traffic import MEMORY_BOUND, RATIO_LIMIT, format_table, traffic_rows

from gpudl.kernels import REGISTRY
from gpudl.kernels._common import forced_config, tuning_candidates
from gpudl.kernels.registry import INTERPRET, FallbackWarning

DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if HAS_CUDA else [])

CASES = [(spec, case) for spec in REGISTRY.values() for case in spec.cases]


@pytest.mark.parametrize("spec,case", CASES, ids=[f"{s.op}-{c.name}" for s, c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_reference(spec, case, dtype, device, launches):
    """Outputs and gradients against the reference; under the interpreter, in the same pass, the
    GPU-semantics checks of every launch (tests/gpu_semantics.py: no out-of-bounds access, no race
    between programs, no dependence on the programs' order)."""
    with warnings.catch_warnings(), _semantics_checked(f"{spec.op} {case.name}"):
        if case.expect_fallback:  # its one-time warning, if it gives one, is expected
            warnings.filterwarnings("ignore", category=FallbackWarning)
        compare_with_reference(spec, case, dtype, device, launches)


@contextlib.contextmanager
def _semantics_checked(what: str):
    """The block's interpreted launches checked for GPU semantics (nothing to hook when compiled)."""
    if not INTERPRET:
        yield
        return
    with checking_gpu_semantics() as semantics:
        yield
    semantics.assert_ok(what)


PARTIAL_GRAD_SPECS = [s for s in REGISTRY.values()
                      if s.differentiable and s.cases and len(grad_inputs(s.cases[0].make(torch.float32, "meta"))) > 1]


@pytest.mark.parametrize("spec", PARTIAL_GRAD_SPECS, ids=[s.op for s in PARTIAL_GRAD_SPECS])
def test_kernel_skips_grads_not_required(spec, device, launches):
    """With one input requiring grad (each in turn, the spec's first case), the kernel's gradient
    of it matches the reference, and its backward launches no more kernels than when every
    gradient is wanted: the gradients nobody asked for are not computed on the side."""
    torch.manual_seed(0)
    args = spec.cases[0].make(torch.float32, device)
    grad_idx = grad_inputs(args)
    every = clone_args(args)
    outs = [o for o in flatten(spec.triton(*every)) if o.requires_grad]
    before = len(launches)
    torch.autograd.grad(outs, [every[i] for i in grad_idx], [torch.ones_like(o) for o in outs])
    all_backward = len(launches) - before
    for keep in grad_idx:
        frozen = tuple(a.detach() if isinstance(a, torch.Tensor) and i != keep else a
                       for i, a in enumerate(clone_args(args)))
        ref_args = clone_args(frozen, torch.float64)
        outs = [o for o in flatten(spec.triton(*frozen)) if o.requires_grad]
        refs = [r for r in flatten(spec.reference(*ref_args)) if r.requires_grad]
        grads_out = [torch.randn_like(o) for o in outs]
        before = len(launches)
        (g,) = torch.autograd.grad(outs, [frozen[keep]], grads_out)
        backward = len(launches) - before
        (w,) = torch.autograd.grad(refs, [ref_args[keep]], [g_out.double() for g_out in grads_out])
        assert_close(f"gradient of argument {keep} alone", g, w, *tolerance(spec, torch.float32, device))
        assert backward <= all_backward, f"argument {keep} alone: {backward} backward launches, {all_backward} for all"


GRADCHECK_SPECS = [s for s in REGISTRY.values() if s.differentiable and s.gradcheck_case is not None]


@pytest.mark.parametrize("spec", GRADCHECK_SPECS, ids=[s.op for s in GRADCHECK_SPECS])
def test_kernel_gradcheck_float64(spec, device, launches):
    torch.manual_seed(0)
    args = spec.gradcheck_case.make(torch.float64, device)
    grad_idx = grad_inputs(args)

    def fn(*tensors):
        full = list(args)
        for i, t in zip(grad_idx, tensors):
            full[i] = t
        return tuple(flatten(spec.triton(*full)))

    assert torch.autograd.gradcheck(fn, tuple(args[i] for i in grad_idx), fast_mode=True, atol=1e-5, rtol=1e-4)
    assert len(launches) > 0, f"{spec.op}: the gradcheck ran no Triton kernel"


# --------------------------------------------------------------------------- every autotune config
TUNING = [(spec, case) for spec in REGISTRY.values() for case in spec.tuning_cases]


def _kernel_module(spec):
    return importlib.import_module(spec.triton.__module__)


@pytest.mark.skipif(not INTERPRET, reason="forces each autotune config through the interpreter; on a GPU the "
                                          "autotuner benchmarks them and the compile check covers each")
@pytest.mark.parametrize("spec,case", TUNING, ids=[f"{s.op}-{c.name}" for s, c in TUNING])
def test_every_autotune_config_matches_reference(spec, case, device):
    """Each autotune config of each of the spec's kernels, forced in turn (config i of every kernel
    together, wrapping around shorter lists), on a shape that spans several programs under every
    config: outputs and gradients against the reference, the GPU-semantics checks of every launch,
    and every autotuned kernel of the spec's file launched on more than one program."""
    tuned = autotuned_kernels(_kernel_module(spec))
    rounds = max((len(tuning_candidates(k)) for k in tuned.values()), default=1)
    for index in range(rounds):
        with recording_launches() as launches, _forcing(tuned, index) as configs:
            try:
                with _semantics_checked(f"{spec.op} {case.name}"):
                    compare_with_reference(spec, case, torch.float32, device, launches)
            except AssertionError as error:
                raise AssertionError(f"with configs {configs}: {error}") from None
        for name, kernel in tuned.items():
            fn = innermost_function(kernel)
            runs = [r for r in launches.records if r.function is fn]
            assert runs, f"{spec.op}: {name} did not run on the tuning case {case.name}"
            few = [r.grid for r in runs if r.programs is not None and r.programs < 2]
            assert not few, f"{spec.op}: {name} with config {configs[name]} ran a single program (grid {few}): " \
                            f"make {case.name} span several tiles"


@contextlib.contextmanager
def _forcing(tuned, index):
    """Config `index` (modulo each list's length) of every autotuner in `tuned`; yields what each runs."""
    with contextlib.ExitStack() as stack:
        yield {name: _describe(stack.enter_context(forced_config(kernel, index % len(tuning_candidates(kernel)))))
               for name, kernel in tuned.items()}


def _describe(config) -> str:
    tiles = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles},warps={config.num_warps},stages={config.num_stages}"


def test_every_autotuned_kernel_has_a_tuning_case():
    """A kernel file that autotunes registers tuning cases, so the test above checks its configs."""
    for spec in REGISTRY.values():
        if autotuned_kernels(_kernel_module(spec)):
            siblings = [s for s in REGISTRY.values() if s.triton.__module__ == spec.triton.__module__]
            assert any(s.tuning_cases for s in siblings), f"{spec.op}: autotuned kernels but no tuning_cases"


# --------------------------------------------------------------------------- the registry itself
def test_every_spec_is_complete():
    import gpudl.ops

    for spec in REGISTRY.values():
        assert spec.cases, f"{spec.op}: no test cases"
        assert torch.float32 in spec.tolerances, f"{spec.op}: no float32 tolerance"
        half = set(spec.tolerances) | set(spec.gpu_tolerances)
        assert {torch.float16, torch.bfloat16} <= half, f"{spec.op}: no half-precision tolerances"
        assert spec.bench_cases, f"{spec.op}: no benchmark cases"
        assert spec.bytes_moved is not None, f"{spec.op}: no byte model for the benchmark"
        assert hasattr(gpudl.ops, spec.op), f"{spec.op}: no gpudl.ops function of that name"


# --------------------------------------------------------------------------- several programs per kernel
# Kernels that run one program by design (a fixed-order sum of partials, deterministic where
# atomics would not be): nothing runs beside them, so there is no race or order to check.
ONE_PROGRAM_BY_DESIGN = {
    "_sum_partials_kernel": "adds the per-program partials in a fixed order (gpudl.kernels._common)",
    "_ce_finalize_kernel": "adds cross_entropy's per-program partial losses in a fixed order",
}


def spec_kernels(spec) -> set[str]:
    """The names of the @triton.jit kernels a spec compiles (its compile variants)."""
    return {innermost_function(variant.kernel).fn.__name__ for variant in spec.compile_variants()}


def most_programs_per_kernel(spec, device) -> dict[str, int]:
    """{kernel: the most programs one launch of it ran} over the spec's cases, forward and backward,
    for every kernel the spec compiles (0: never launched). The launches are recorded without
    running their programs (tests/gpu_semantics.py, run_programs=False): only the grids count."""
    most = dict.fromkeys(spec_kernels(spec), 0)
    for case in spec.cases:
        torch.manual_seed(0)
        args = case.make(torch.float32, device)
        with warnings.catch_warnings(), checking_gpu_semantics(run_programs=False) as semantics:
            warnings.simplefilter("ignore", FallbackWarning)
            outs = [o for o in flatten(spec.triton(*args)) if o.requires_grad]
            wanted = [args[i] for i in grad_inputs(args)]
            if spec.differentiable and outs and wanted:
                torch.autograd.grad(outs, wanted, [torch.ones_like(o) for o in outs], allow_unused=True)
        for launch in semantics.launches:
            most[launch.kernel] = max(most.get(launch.kernel, 0), launch.programs)
    return most


@pytest.mark.skipif(not INTERPRET, reason="reads the grids of interpreted launches")
def test_every_kernel_runs_several_programs_in_some_case(device):
    """The GPU-semantics checks (races, order) need a launch of several programs: every kernel of
    every spec gets one from at least one of the spec's cases (not only from a test's monkeypatch)."""
    single, by_design = [], []
    for spec in REGISTRY.values():
        for kernel, programs in sorted(most_programs_per_kernel(spec, device).items()):
            if kernel in ONE_PROGRAM_BY_DESIGN:
                by_design.append(f"{spec.op}/{kernel} ({programs})")
            elif programs < 2:
                single.append(f"{spec.op}/{kernel} ({'never launched' if programs == 0 else 'one program'})")
    print("\none program by design:", ", ".join(by_design) or "none")
    assert not single, "kernels no registry case launches with several programs (add a case to the spec):\n  " \
                       + "\n  ".join(single)


# --------------------------------------------------------------------------- traffic
@pytest.mark.skipif(not INTERPRET, reason="counts the bytes of interpreted launches")
def test_memory_bound_kernels_move_at_most_their_byte_model(device):
    """Every case of the memory-bound ops (tests/traffic.py): the bytes the forward's launches
    load and store, counted under the interpreter, at most 1.10x the spec's bytes_moved. The
    table is printed (pytest -s) for the docs (docs/gpu-semantics.md)."""
    rows = traffic_rows(device=device)
    print("\nforward traffic, counted under the Triton interpreter:\n" + format_table(rows))
    assert {r.op for r in rows} == set(MEMORY_BOUND), "a memory-bound op has no case its byte model applies to"
    over = [f"{r.op} {r.case}: {r.ratio:.2f}x ({r.counted:,} bytes counted, {r.model:,.0f} modelled; "
            f"loaded+stored: {r.breakdown()})" for r in rows if r.ratio > RATIO_LIMIT]
    assert not over, f"counted traffic above {RATIO_LIMIT}x the byte model:\n  " + "\n  ".join(over)
