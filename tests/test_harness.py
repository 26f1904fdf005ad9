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
from helpers import assert_close, compare_with_reference, recording_launches

from gpudl.kernels import REGISTRY
from gpudl.kernels import conv2d as conv_kernels
from gpudl.kernels._common import forced_config, tuning_candidates
from gpudl.kernels.registry import INTERPRET, Case

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _load_mutant(tmp_path, file: str, op: str, mutation: tuple[str, str] | None, tag: str):
    """kernels/<file> with `mutation` (regex, replacement; must match exactly once) applied,
    imported as a new module whose spec is registered as `<op>_<tag>`. Returns (module, spec)."""
    source = (KERNELS / file).read_text()
    renamed, count = re.subn(rf'\bop="{op}"', f'op="{op}_{tag}"', source)
    assert count == 1, f"kernels/{file}: expected one op=\"{op}\" registration"
    # Its own custom ops too: torch.ops.gpudl.<name> can be defined once per process.
    renamed, count = re.subn(r'\bkernel_op\("(\w+)"', rf'kernel_op("\1_{tag}"', renamed)
    assert count >= 1, f"kernels/{file}: expected kernel_op(\"...\") definitions"
    renamed = re.sub(r"\btorch\.ops\.gpudl\.(\w+)", rf"torch.ops.gpudl.\1_{tag}", renamed)
    if mutation is not None:
        pattern, replacement = mutation
        renamed, count = re.subn(pattern, replacement, renamed)
        assert count == 1, f"kernels/{file} changed: the mutation anchor {pattern!r} matches {count} times; update it"
    path = tmp_path / f"mutant_{tag}_{file}"
    path.write_text(renamed)  # triton.jit reads a kernel's source from its file
    name = f"gpudl_mutant_{tag}_{file[:-3]}"
    spec_obj = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec_obj)
    sys.modules[name] = module
    spec_obj.loader.exec_module(module)
    spec = REGISTRY[f"{op}_{tag}"]
    object.__setattr__(spec, "reference", REGISTRY[op].reference)  # gpudl.reference has no <op>_<tag>
    return module, spec


@pytest.fixture
def mutants(tmp_path):
    names = []

    def load(file, op, mutation, tag):
        module, spec = _load_mutant(tmp_path, file, op, mutation, tag)
        names.append((spec.op, module.__name__))
        return module, spec

    yield load
    for op, module in names:
        REGISTRY.pop(op, None)
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


# (regex on kernels/mse.py, replacement): what a slip of the pen looks like in a kernel
MSE_MUTATIONS = {
    # the last element of every tensor is dropped (loss and gradient)
    "off-by-one-mask": (r"mask = idx < n\b", "mask = idx < n - 1"),
    # mean's gradient loses its 1/n
    "dropped-scale": (r"g = g / n\b", "g = g"),
    # the entry answers with the reference: right numbers, no kernel
    "reference-fallback": (r"(def mse_loss\(input, target, reduction\):\n    \"\"\"[^\"]*\"\"\"\n)",
                           r"\1    from gpudl import reference\n"
                           r"    return reference.mse_loss(input, target, reduction)\n"),
}


def test_unchanged_copy_passes(mutants, device):
    _, spec = mutants("mse.py", "mse_loss", None, "control")
    assert _harness_verdicts(spec, device) == [None] * len(spec.cases)


@pytest.mark.parametrize("name", sorted(MSE_MUTATIONS))
def test_planted_bug_fails_the_harness(name, mutants, device):
    _, spec = mutants("mse.py", "mse_loss", MSE_MUTATIONS[name], name.replace("-", "_"))
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
def test_group_order_bug_is_caught_only_by_forcing_the_configs(mutants, device):
    """linear's grouped program order mapping the last, partial group of row blocks wrong: every
    registered case fits one group, so the harness passes them; config 3 (64-row blocks) on 600
    rows (10 row blocks: a group of 8, then one of 2) fails."""
    module, spec = mutants("linear.py", "linear", (r"% group_size_m\n", "% GROUP_M\n"), "group_order")
    assert _harness_verdicts(spec, device) == [None] * len(spec.cases)
    case = Case("600x40x70", module._case((600,), 40, 70, True, None))
    assert len(tuning_candidates(module._matmul)) == len(module._GEMM_CONFIGS)
    assert module._GEMM_CONFIGS[3].kwargs["BLOCK_M"] == 64
    with forced_config(module._matmul, 3), recording_launches() as launches:
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
