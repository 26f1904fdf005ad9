"""Tests of the tests: known bugs planted in copies of real kernel files must fail the registry
harness (tests/helpers.compare_with_reference), while the unchanged copy passes it.

Each mutant is the kernel file's source with one textual change, loaded as a new module that
registers its spec under another op name (removed again afterwards). If a kernel file is
rewritten so that an anchor below no longer matches, the test says which one to update.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from gpu_semantics import checking_gpu_semantics
from helpers import assert_close, compare_with_reference, recording_launches

from gpudl.kernels import REGISTRY
from gpudl.kernels import conv2d as conv_kernels
from gpudl.kernels._common import forced_config, tuning_candidates
from gpudl.kernels.registry import INTERPRET, Case

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _load_mutant(tmp_path, family: str, op: str, mutation: tuple[str, str, str] | None, tag: str):
    """The kernel family `family` (kernels/<family>.py, <family>_triton.py, <family>_spec.py) with
    `mutation` (file, regex, replacement; must match exactly once in that file) applied, imported as
    new modules whose spec is registered as `<op>_<tag>`. Returns (modules by file, spec)."""
    files = [f"{family}_triton.py", f"{family}.py", f"{family}_spec.py"]  # in import order
    names = {file: f"gpudl_mutant_{tag}_{file[:-3]}" for file in files}
    modules = {}
    for file in files:
        source = (KERNELS / file).read_text()
        for other in files:  # the family's modules import each other: import the mutants instead
            source = re.sub(rf"\bgpudl\.kernels\.{other[:-3]}\b", names[other], source)
        if file == f"{family}_spec.py":
            source, count = re.subn(rf'\bop="{op}"', f'op="{op}_{tag}"', source)
            assert count == 1, f"kernels/{file}: expected one op=\"{op}\" registration"
        # Its own custom ops too: torch.ops.gpudl.<name> can be defined once per process.
        source = re.sub(r'\bkernel_op\("(\w+)"', rf'kernel_op("\1_{tag}"', source)
        source = re.sub(r"\btorch\.ops\.gpudl\.(\w+)", rf"torch.ops.gpudl.\1_{tag}", source)
        if mutation is not None and mutation[0] == file:
            _, pattern, replacement = mutation
            source, count = re.subn(pattern, replacement, source)
            assert count == 1, f"kernels/{file} changed: the anchor {pattern!r} matches {count} times; update it"
        path = tmp_path / f"{names[file]}.py"
        path.write_text(source)  # triton.jit reads a kernel's source from its file
        spec_obj = importlib.util.spec_from_file_location(names[file], path)
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[names[file]] = module
        spec_obj.loader.exec_module(module)
        modules[file] = module
    spec = REGISTRY[f"{op}_{tag}"]
    object.__setattr__(spec, "reference", REGISTRY[op].reference)  # gpudl.reference has no <op>_<tag>
    return modules, spec


@pytest.fixture
def mutants(tmp_path):
    names = []

    def load(family, op, mutation, tag):
        modules, spec = _load_mutant(tmp_path, family, op, mutation, tag)
        names.append((spec.op, [m.__name__ for m in modules.values()]))
        return modules, spec

    yield load
    for op, modules in names:
        REGISTRY.pop(op, None)
        for module in modules:
            sys.modules.pop(module, None)


def _harness_verdicts(spec, device) -> list[str | None]:
    """For each of the spec's cases: None if the harness passes it, else the first line of its failure."""
    verdicts = []
    for case in spec.cases:
        with recording_launches() as launches:
            try:
                compare_with_reference(spec, case, torch.float32, device, launches)
            except AssertionError as error:
                verdicts.append(str(error).splitlines()[0] or "AssertionError")
            else:
                verdicts.append(None)
    return verdicts


# (file of the mse family, regex, replacement): what a slip of the pen looks like in a kernel
MSE_MUTATIONS = {
    # the last element of every tensor is dropped (loss and gradient)
    "off-by-one-mask": ("mse_triton.py", r"mask = idx < n\b", "mask = idx < n - 1"),
    # mean's gradient loses its 1/n
    "dropped-scale": ("mse_triton.py", r"g = g / n\b", "g = g"),
    # the entry answers with the reference: right numbers, no kernel
    "reference-fallback": ("mse.py", r"(def mse_loss\(input, target, reduction\):\n    \"\"\"[^\"]*\"\"\"\n)",
                           r"\1    from gpudl import reference\n"
                           r"    return reference.mse_loss(input, target, reduction)\n"),
}


def test_unchanged_copy_passes(mutants, device):
    _, spec = mutants("mse", "mse_loss", None, "control")
    assert _harness_verdicts(spec, device) == [None] * len(spec.cases)


@pytest.mark.parametrize("name", sorted(MSE_MUTATIONS))
def test_planted_bug_fails_the_harness(name, mutants, device):
    _, spec = mutants("mse", "mse_loss", MSE_MUTATIONS[name], name.replace("-", "_"))
    verdicts = _harness_verdicts(spec, device)
    assert any(verdicts), f"mutation {name} passed every case of the harness"
    if name == "reference-fallback":
        assert all(v and "no Triton kernel launched" in v for v in verdicts), verdicts


def test_small_weight_gradient_error_fails_where_the_old_tolerance_passed_it(device, monkeypatch):
    """A 1% error in every element of conv2d's weight gradient: the old harness (atol 5e-3 scaled by
    the gradient's largest element, rtol 5e-3) accepted it, the element-wise RMS-scaled IEEE
    tolerance does not (IEEE fp32 products, also on a GPU)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    wgrad = conv_kernels._conv2d_wgrad

    def off_by_one_percent(*args):
        return wgrad(*args) * 1.01

    monkeypatch.setattr(conv_kernels, "_conv2d_wgrad", off_by_one_percent)
    spec = REGISTRY["conv2d"]
    case = next(c for c in spec.cases if c.name == "regular_3x3_relu")
    with recording_launches() as launches, pytest.raises(AssertionError, match="gradient of argument 1"):
        compare_with_reference(spec, case, torch.float32, device, launches)
    # The old acceptance, on the same gradients:
    torch.manual_seed(0)
    x, w, b, *rest = case.make(torch.float32, device)
    (gw,) = torch.autograd.grad(spec.triton(x, w, b, *rest).sum(), [w])
    w64 = w.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(spec.reference(x.detach().double(), w64, b.detach().double(), *rest).sum(), [w64])
    torch.testing.assert_close(gw.double(), want, atol=5e-3 * max(1.0, want.abs().max().item()), rtol=5e-3)


@pytest.mark.skipif(not INTERPRET, reason="forces a config through the interpreter")
def test_group_order_bug_is_caught_by_a_case_spanning_several_groups(mutants, device):
    """linear's grouped program order mapping the last, partial group of row blocks wrong: a
    registered case whose row blocks span more than one group fails (the cases that fit one group
    pass), and so does config 3 (64-row blocks) forced on 600 rows (10 row blocks: a group of 8,
    then one of 2)."""
    modules, spec = mutants("linear", "linear", ("linear_triton.py", r"% group_size_m\n", "% GROUP_M\n"),
                            "group_order")
    kernels = modules["linear_triton.py"]
    verdicts = _harness_verdicts(spec, device)
    assert any(verdicts), "no registered linear case spans several groups of row blocks: add one"
    assert not all(verdicts), verdicts
    case = Case("600x40x70", modules["linear_spec.py"]._case((600,), 40, 70, True, None))
    assert len(tuning_candidates(kernels.matmul)) == len(kernels.GEMM_TILES)
    assert kernels.GEMM_TILES[3].kwargs["BLOCK_M"] == 64
    with forced_config(kernels.matmul, 3), recording_launches() as launches:
        with pytest.raises(AssertionError, match="output 0"):
            compare_with_reference(spec, case, torch.float32, device, launches)


def test_assert_close_scales_atol_by_rms_and_handles_empty_tensors():
    want = torch.tensor([100.0, 1.0, -1.0, 0.0])  # rms 50
    assert_close("t", want + torch.tensor([0.0, 0.0, 0.0, 4e-4]), want, atol=1e-5, rtol=1e-5)  # 4e-4 < 1e-5 * 50
    with pytest.raises(AssertionError, match="worst element"):
        assert_close("t", want + torch.tensor([0.0, 0.0, 0.0, 1e-3]), want, atol=1e-5, rtol=1e-5)
    assert_close("empty", torch.empty(0, 3), torch.empty(0, 3), atol=0.0, rtol=0.0)
    with pytest.raises(AssertionError, match="shape"):
        assert_close("empty", torch.empty(0, 3), torch.empty(3, 0), atol=0.0, rtol=0.0)
    inf = torch.tensor([float("inf"), 1.0])
    assert_close("inf", inf.clone(), inf, atol=0.0, rtol=0.0)
    with pytest.raises(AssertionError):
        assert_close("inf", torch.tensor([1.0, 1.0]), inf, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- GPU semantics
# Small kernels with the bugs a GPU exposes and the interpreter's in-order, one-by-one programs
# hide; tests/gpu_semantics.py must name each (kernel, program ids, tensor and element).
@triton.jit
def _reads_one_past_the_end(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n + 1)  # the bug: n + 1
    tl.store(y_ptr + offsets, x, mask=offsets < n)


@triton.jit
def _every_program_stores_block_zero(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)  # the bug: no program_id * BLOCK
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets + tl.program_id(0) * BLOCK))


@triton.jit
def _reads_the_previous_programs_output(y_ptr):
    pid = tl.program_id(0)
    previous = tl.load(y_ptr + pid - 1, mask=pid > 0, other=0.0)  # written by program pid - 1
    tl.store(y_ptr + pid, previous + 1.0)


@triton.jit
def _takes_a_ticket(counter_ptr, out_ptr):
    pid = tl.program_id(0)
    ticket = tl.atomic_add(counter_ptr, 1)  # the bug: the ticket is the order of arrival
    tl.store(out_ptr + pid, ticket)


@triton.jit
def _counts_with_atomics(x_ptr, count_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)
    tl.atomic_add(count_ptr, tl.sum((x > 0).to(tl.int32), axis=0))  # integer adds commute exactly


@triton.jit
def _scales_through_a_pointer_table(table_ptr, n, BLOCK: tl.constexpr):
    """Program t doubles tensor t, addressed through an int64 table (as sgd_step's multi-tensor launch)."""
    t = tl.program_id(0)
    ptr = tl.load(table_ptr + t).to(tl.pointer_type(tl.float32))
    offsets = tl.arange(0, BLOCK)
    tl.store(ptr + offsets, 2.0 * tl.load(ptr + offsets, mask=offsets < n), mask=offsets < n)


needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="hooks the Triton interpreter")


def _problems(launch) -> list[str]:
    with checking_gpu_semantics() as semantics:
        launch()
    return semantics.problems()


@needs_interpreter
def test_an_out_of_bounds_read_is_named():
    x, y = torch.randn(10), torch.empty(10)
    problems = _problems(lambda: _reads_one_past_the_end[(3,)](x, y, 10, BLOCK=4))
    assert len(problems) == 1, problems
    assert "_reads_one_past_the_end" in problems[0] and "out of bounds" in problems[0]
    assert "program (2,) loaded 1 active element(s)" in problems[0]
    assert "element 10 of x_ptr, which has 10" in problems[0]


@needs_interpreter
def test_two_programs_storing_one_address_is_a_race():
    x, y = torch.randn(12), torch.empty(4)
    problems = _problems(lambda: _every_program_stores_block_zero[(3,)](x, y, BLOCK=4))
    assert problems and all("_every_program_stores_block_zero" in p for p in problems), problems
    assert "race on y_ptr[element 0]" in problems[0]
    assert "stored by program(s) (0,), (1,), (2,)" in problems[0]


@needs_interpreter
def test_reading_what_another_program_stores_is_a_race():
    y = torch.zeros(4)
    problems = _problems(lambda: _reads_the_previous_programs_output[(4,)](y))
    assert "race on y_ptr[element 0]" in problems[0], problems
    assert "loaded by program(s) (1,); stored by program(s) (0,)" in problems[0]
    # reruns were made (a race): program 1 reads program 0's output only when it runs after it
    assert any("order dependence: with the programs run reversed" in p for p in problems), problems


@needs_interpreter
def test_an_order_dependent_result_is_caught_by_running_the_grid_reversed_and_shuffled():
    counter, out = torch.zeros(1, dtype=torch.int32), torch.empty(6, dtype=torch.int32)
    problems = _problems(lambda: _takes_a_ticket[(6,)](counter, out))
    assert [p.split(": order dependence: with the programs run ")[1].split(",")[0] for p in problems] == \
        ["reversed", "shuffled"], problems
    assert "_takes_a_ticket grid (6,)" in problems[0] and "out_ptr[element 0]" in problems[0]
    assert "written by program(s) (0,)" in problems[0]
    # the launch's own (grid-order) result is what the caller gets
    assert out.tolist() == list(range(6)) and counter.item() == 6


@needs_interpreter
def test_a_correct_kernel_passes_and_its_atomics_are_rerun_in_other_orders():
    x = torch.randn(37)
    count = torch.zeros(1, dtype=torch.int32)
    with checking_gpu_semantics() as semantics:
        _counts_with_atomics[(5,)](x, count, 37, BLOCK=8)
    semantics.assert_ok()
    (launch,) = semantics.launches
    assert launch.uses_atomics and launch.reordered == ("reversed", "shuffled")
    assert count.item() == int((x > 0).sum())
    assert launch.traffic["x_ptr"].loaded == 37 * 4 and launch.traffic["count_ptr"].stored == 5 * 4


@needs_interpreter
def test_tensors_reached_through_a_pointer_table_are_in_bounds():
    tensors = [torch.randn(5), torch.randn(5)]
    table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    want = [2 * t for t in tensors]
    with checking_gpu_semantics(all_orders=True) as semantics:
        _scales_through_a_pointer_table[(2,)](table, 5, BLOCK=8)
    semantics.assert_ok()
    assert all(torch.equal(t, w) for t, w in zip(tensors, want))  # once, despite the reruns
    assert semantics.launches[0].reordered == ("reversed", "shuffled")


@needs_interpreter
def test_the_checks_find_nothing_on_a_registry_case_and_count_its_traffic(device):
    spec = REGISTRY["mse_loss"]
    case = Case("several programs", lambda dtype, device: (
        torch.randn(3, 7001, dtype=dtype, device=device, requires_grad=True),
        torch.randn(3, 7001, dtype=dtype, device=device), "mean"))
    with recording_launches() as launches, checking_gpu_semantics(all_orders=True, count_distinct=True) as semantics:
        compare_with_reference(spec, case, torch.float32, device, launches)
    semantics.assert_ok()
    assert {launch.kernel for launch in semantics.launches} == set(launches.kernels())
    several = [launch for launch in semantics.launches if launch.programs > 1]
    assert several and all(launch.reordered == ("reversed", "shuffled") for launch in several)
    assert all(t.distinct <= t.loaded + t.stored for launch in semantics.launches for t in launch.traffic.values())


@needs_interpreter
def test_launches_can_be_listed_without_running_their_programs():
    x, y = torch.randn(10), torch.zeros(10)
    with checking_gpu_semantics(run_programs=False) as semantics:
        _reads_one_past_the_end[(3,)](x, y, 10, BLOCK=4)
    assert [(launch.kernel, launch.programs) for launch in semantics.launches] == [("_reads_one_past_the_end", 3)]
    assert not semantics.problems() and not y.any()  # nothing ran
