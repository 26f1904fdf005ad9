"""The fused linear kernel (kernels/linear.py) beyond what the registry harness checks: the drop-in
module, every activation's gradient path, layouts, empty shapes, which gradients are computed,
and that gpudl.ops reaches the kernel. Runs through the Triton interpreter on the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, check_against_reference, leaves

import gpudl
from gpudl import nn as gnn
from gpudl import ops, reference
from gpudl.kernels import linear as L
from gpudl.kernels import linear_triton as LT

ACTIVATIONS = [None, "relu", "leaky_relu", "tanh", "sigmoid", "gelu"]


pytestmark = pytest.mark.usefixtures("on_test_device")


@pytest.fixture
def gemm_calls(monkeypatch):
    """Records every launch of the GEMM launcher and the column-sum launcher."""
    calls = []
    gemm, column_sum = L._gemm, L._column_sum

    def spy_gemm(a, b, c, *args, **kwargs):
        calls.append(("gemm", tuple(c.shape), kwargs))
        return gemm(a, b, c, *args, **kwargs)

    def spy_column_sum(x, dtype):
        calls.append(("column_sum", tuple(x.shape), {}))
        return column_sum(x, dtype)

    monkeypatch.setattr(L, "_gemm", spy_gemm)
    monkeypatch.setattr(L, "_column_sum", spy_column_sum)
    return calls


# --------------------------------------------------------------------------- drop-in module
@pytest.mark.parametrize("bias", [True, False])
def test_nn_linear_loads_torch_state_dict_and_matches(bias):
    torch.manual_seed(0)
    theirs = torch.nn.Linear(37, 23, bias=bias)
    ours = gnn.Linear(37, 23, bias=bias)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 37)
    with gpudl.use_backend("triton"):
        y = ours(x)
        y.square().sum().backward()
    y_ref = theirs(x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-4, rtol=1e-4)
    if bias:
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, atol=1e-4, rtol=1e-4)
    # ...and back: our state_dict loads into torch's module.
    again = torch.nn.Linear(37, 23, bias=bias)
    again.load_state_dict(ours.state_dict())
    torch.testing.assert_close(again(x), y_ref)


def test_nn_linear_with_activation_matches_torch_composition():
    torch.manual_seed(0)
    theirs = torch.nn.Linear(20, 17)
    ours = gnn.Linear(20, 17, activation="gelu")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 20)
    with gpudl.use_backend("triton"):
        y = ours(x)
    torch.testing.assert_close(y, F.gelu(theirs(x)), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- activations
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_activation_output_and_grads(act):
    torch.manual_seed(1)
    x = torch.randn(7, 19, requires_grad=True)
    w = torch.randn(21, 19, requires_grad=True)
    b = torch.randn(21, requires_grad=True)
    check_against_reference(L.linear, reference.linear, x, w, b, act)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck_float64_every_activation(act):
    """float64 gradcheck of each gradient path (from the saved output, or from the recomputed pre-activation)."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    # relu's kink only matters within gradcheck's eps (1e-6) of a pre-activation.
    assert F.linear(x, w, b).abs().min() > 1e-3
    assert torch.autograd.gradcheck(lambda *t: L.linear(*t, act), (x, w, b), fast_mode=True, atol=1e-5, rtol=1e-4)


def test_relu_grad_at_zero_follows_torch():
    """relu' (0) = 0 and leaky_relu'(0) = slope in torch; y == 0 exactly there, so the
    gradient taken from the output agrees."""
    x = torch.zeros(3, 16, requires_grad=True)
    w = torch.ones(16, 16, requires_grad=True)
    for act in ("relu", "leaky_relu"):
        check_against_reference(L.linear, reference.linear, x, w, None, act)


# --------------------------------------------------------------------------- shapes and layouts
@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (2, 1, 3, 2)], ids=str)
def test_leading_batch_dims(lead):
    torch.manual_seed(3)
    x = torch.randn(*lead, 18, requires_grad=True)
    w = torch.randn(20, 18, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    y = check_against_reference(L.linear, reference.linear, x, w, b, "tanh").out
    assert y.shape == (*lead, 20)


def test_non_contiguous_input_and_weight():
    torch.manual_seed(4)
    # A transposed 2-D input (handled by strides) and a permuted 3-D one (flattening copies).
    x2 = torch.randn(33, 9).t().requires_grad_()
    x3 = torch.randn(4, 17, 3).permute(2, 0, 1).requires_grad_()  # [3, 4, 17], strides (1, 51, 3)
    w = torch.randn(17, 25).t().requires_grad_()  # weight [25, 17] with strides (1, 25)
    b = torch.randn(50)[::2].requires_grad_()  # stride 2
    assert not x2.is_contiguous() and not x3.is_contiguous() and not w.is_contiguous()
    assert x3.reshape(12, 17).data_ptr() != x3.data_ptr()  # really the copying path
    w_in = torch.randn(25, 33, requires_grad=True)
    check_against_reference(L.linear, reference.linear, x2, w_in, None, "sigmoid")
    check_against_reference(L.linear, reference.linear, x3, w, b, "gelu")
    check_against_reference(L.linear, reference.linear, x3, w, b, None)


def test_expanded_grad_output():
    """y.sum() backpropagates an expanded (all-zero-stride) gradient; the kernels read it by strides."""
    torch.manual_seed(5)
    for act in (None, "gelu"):
        x = torch.randn(4, 6, 21, requires_grad=True)
        w = torch.randn(19, 21, requires_grad=True)
        b = torch.randn(19, requires_grad=True)
        grad = torch.ones(()).expand(4, 6, 19)
        check_against_reference(L.linear, reference.linear, x, w, b, act, grad=grad)


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
def test_zero_size_batch(lead):
    x = torch.randn(*lead, 12, requires_grad=True)
    w = torch.randn(7, 12, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    y = L.linear(x, w, b, "gelu")
    assert y.shape == (*lead, 7)
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


def test_zero_in_features_gives_activation_of_bias():
    x = torch.randn(3, 0, requires_grad=True)
    w = torch.randn(5, 0, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    check_against_reference(L.linear, reference.linear, x, w, b, "sigmoid")


def test_inference_runs_one_gemm(gemm_calls):
    x, w, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    y = L.linear(x, w, b, "gelu")
    assert y.grad_fn is None
    assert [c[:2] for c in gemm_calls] == [("gemm", (4, 8))]
    torch.testing.assert_close(y, reference.linear(x, w, b, "gelu"), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- what backward keeps
def _saved_by_forward(*args):
    """(output, [tensors autograd saved while the forward ran]) via saved-tensor hooks."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = L.linear(*args)
    return y, saved


def _same(a, b):
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_backward_keeps_one_output_sized_tensor_at_most(act):
    """Besides x and W (what dW and dx read, and b where gelu recomputes), backward keeps the OUTPUT
    y for relu, leaky_relu, tanh and sigmoid (the tensor the next layer keeps anyway) and no
    [M, N] tensor for gelu (recomputed) or no activation; gradients still match PyTorch."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    y, saved = _saved_by_forward(x, w, b, act)
    output_sized = [t for t in saved if t.shape == y.shape]
    if act in ("relu", "leaky_relu", "tanh", "sigmoid"):
        assert len(output_sized) == 1 and _same(output_sized[0], y)
    else:
        assert output_sized == []
    rest = [t for t in saved if t.shape != y.shape]
    expected = [x, w, b] if act == "gelu" else [x, w]
    assert len(rest) == len(expected) and all(_same(t, e) for t, e in zip(rest, expected))
    check_against_reference(L.linear, reference.linear, x, w, b, act)


def test_gelu_without_weight_grad_still_keeps_no_output_sized_tensor():
    x = torch.randn(4, 16, requires_grad=True)
    w, b = torch.randn(8, 16), torch.randn(8)
    y, saved = _saved_by_forward(x, w, b, "gelu")
    assert not [t for t in saved if t.shape == y.shape]
    assert len(saved) == 3  # x, W, b: the recompute reads all three


# --------------------------------------------------------------------------- which grads run
def _backward_launches(calls, forward_count):
    return [(kind, shape) for kind, shape, _ in calls[forward_count:]]


def test_only_input_grad_runs_only_the_grad_input_gemm(gemm_calls):
    x = torch.randn(6, 16, requires_grad=True)
    w, b = torch.randn(8, 16), torch.randn(8)
    y = L.linear(x, w, b, "gelu")
    forward = len(gemm_calls)
    (gx,) = torch.autograd.grad(y.sum(), (x,))
    # gelu: the recompute of dz (a [6, 8] GEMM), then dx.
    assert _backward_launches(gemm_calls, forward) == [("gemm", (6, 8)), ("gemm", (6, 16))]
    (want,) = torch.autograd.grad(reference.linear(x, w, b, "gelu").sum(), (x,))
    torch.testing.assert_close(gx, want, atol=1e-5, rtol=1e-4)


def test_weight_grad_is_one_gemm_and_bias_grad_a_column_sum(gemm_calls):
    x = torch.randn(6, 16)
    w = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    y = L.linear(x, w, b, "relu")
    forward = len(gemm_calls)
    gw, gb = torch.autograd.grad(y.sum(), (w, b))
    assert _backward_launches(gemm_calls, forward) == [("gemm", (8, 16)), ("column_sum", (6, 8))]
    rw, rb = leaves(w, b)
    want_w, want_b = torch.autograd.grad(reference.linear(x, rw, rb, "relu").sum(), (rw, rb))
    assert_close("weight gradient", gw, want_w, 1e-5, 1e-5)
    assert_close("bias gradient", gb, want_b, 1e-5, 1e-5)


def test_only_bias_grad_runs_only_the_column_sum(gemm_calls):
    x, w = torch.randn(6, 16), torch.randn(8, 16)
    b = torch.randn(8, requires_grad=True)
    y = L.linear(x, w, b, "tanh")
    forward = len(gemm_calls)
    (gb,) = torch.autograd.grad(y.sum(), (b,))
    assert _backward_launches(gemm_calls, forward) == [("column_sum", (6, 8))]
    b_ref = b.detach().clone().requires_grad_()
    torch.testing.assert_close(gb, torch.autograd.grad(reference.linear(x, w, b_ref, "tanh").sum(), (b_ref,))[0])


def test_double_backward_is_refused():
    """The Triton gradients carry no graph, so a second derivative must raise, not come out zero."""
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    y = L.linear(x, w, None, "tanh")
    (gx,) = torch.autograd.grad(y.square().sum(), (x,), create_graph=True)  # grad_output = 2y needs grad
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


# --------------------------------------------------------------------------- through gpudl.ops
def test_ops_linear_dispatches_to_the_kernel_only_on_triton_backend(gemm_calls):
    x, w = torch.randn(3, 16), torch.randn(4, 16)
    with gpudl.use_backend("triton"):
        y = ops.linear(x, w, None, activation="leaky_relu")
    assert len(gemm_calls) == 1
    with gpudl.use_backend("torch"):
        y_ref = ops.linear(x, w, None, activation="leaky_relu")
    assert len(gemm_calls) == 1
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda: ops.linear(torch.randn(5, 7), torch.randn(3, 6)), ValueError, r"input has 7 features .* expects 6"),
        (lambda: ops.linear(torch.randn(5, 6), torch.randn(6)), ValueError, r"weight must be 2-D, got shape \(6,\)"),
        (lambda: ops.linear(torch.randn(5, 6), torch.randn(3, 6), torch.randn(4)),
         ValueError, r"bias must have shape \(3,\)"),
        (lambda: ops.linear(torch.randn(5, 6), torch.randn(3, 6), torch.randn(1, 3)), ValueError, r"bias must be 1-D"),
        (lambda: ops.linear(torch.randn(5, 6), torch.randn(3, 6).double()),
         TypeError, r"weight has dtype torch.float64 but input has dtype torch.float32"),
        (lambda: ops.linear(torch.randn(5, 6).long(), torch.randn(3, 6).long()),
         TypeError, r"input must be a floating-point tensor"),
        (lambda: ops.linear(torch.randn(5, 6), torch.randn(3, 6), activation="swish"),
         ValueError, r"activation must be one of"),
        (lambda: ops.linear(torch.tensor(1.0), torch.randn(3, 1)), ValueError, r"at least 1 dimension"),
    ],
)
def test_validation_errors_before_the_kernel(call, error, pattern, gemm_calls):
    with gpudl.use_backend("triton"):
        with pytest.raises(error, match=pattern):
            call()
    assert not gemm_calls


def test_fp32_precision_follows_torch_tf32_switch():
    """fp32 products are IEEE unless torch's own switch allows TF32 (legacy or new API). Run in
    a subprocess: mixing torch's two TF32 APIs in this process would make later reads raise."""
    script = """
import torch
from gpudl.kernels import linear as L
got = [L._input_precision(torch.float32)]
torch.set_float32_matmul_precision("high")
got.append(L._input_precision(torch.float32))
torch.backends.cuda.matmul.fp32_precision = "ieee"
got.append(L._input_precision(torch.float32))
torch.backends.cuda.matmul.fp32_precision = "tf32"
got += [L._input_precision(torch.float32), L._input_precision(torch.bfloat16), L._input_precision(torch.float64)]
print(",".join(got))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "ieee,tf32,ieee,tf32,ieee,ieee"


def test_config_pruning_keeps_what_fits():
    configs = LT.GEMM_TILES
    # sm_80's 163 KiB: the 128x256x64 bf16 tile fits, not in fp32; fp64 always keeps one config.
    bf16 = LT.tiles_that_fit(configs, 2, 166912)
    fp32 = LT.tiles_that_fit(configs, 4, 166912)
    fp64 = LT.tiles_that_fit(configs, 8, 1)
    assert configs[0] in bf16 and configs[0] not in fp32 and fp32
    assert len(fp64) == 1


def _tile(config) -> tuple:
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages


def test_tile_tables_per_dtype_precision_and_gpu():
    """The audited tables (docs/kernels/linear.md): sm_80 half precision without the tiles that keep
    128 fp32 accumulators a thread, IEEE fp32 / fp64 (FMA units) with K steps of at most 16, and
    every candidate of every table among the autotuner's."""
    half90, half80 = LT.tile_table(2, "ieee", 90), LT.tile_table(2, "ieee", 80)
    assert (128, 256, 64, 8, 3) in map(_tile, half90)
    assert LT.tile_table(2, "ieee", 86) is half80 and LT.tile_table(2, "ieee", 100) is half90
    assert {(128, 256, 64, 8, 3), (128, 128, 32, 4, 4)}.isdisjoint(map(_tile, half80))
    assert all(m * n // (32 * w) <= 64 for m, n, _, w, _ in map(_tile, half80) if m == 128)
    fma = LT.tile_table(4, "ieee", 90)
    assert fma is LT.tile_table(8, "ieee", 80) is LT.tile_table(8, "tf32", 90)
    assert all(k <= 16 for _, _, k, _, _ in map(_tile, fma))
    assert LT.tile_table(4, "tf32", 80) is LT.tile_table(4, "tf32", 90) is LT.TF32_TILES
    candidates = L.matmul.configs.candidates
    for table in (half90, half80, fma, LT.TF32_TILES):
        assert all(any(c is t for c in candidates) for t in table)
    assert candidates[0] is half90[0]  # the interpreter's one: the largest tile


def test_pruning_reads_the_precision_and_the_gpu(monkeypatch):
    """On a GPU the autotuner tries the table of the operands' dtype, the launch's precision and the
    device's compute capability, within its shared memory."""
    monkeypatch.setattr(LT, "_shared_memory_limit", lambda device: 166912)
    candidates = L.matmul.configs.candidates
    a16, a32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    def tried(a, precision):
        return {id(c) for c in LT._prune_tiles(candidates, {"a_ptr": a}, INPUT_PRECISION=precision)}

    for arch, half in ((80, LT.HALF_TILES_SM80), (90, LT.HALF_TILES)):
        monkeypatch.setattr(LT, "_arch", lambda device, arch=arch: arch)
        assert tried(a16, "ieee") == set(map(id, half))
        assert tried(a32, "ieee") == set(map(id, LT.FMA_TILES))
        assert tried(a32, "tf32") == set(map(id, LT.TF32_TILES))
    assert "INPUT_PRECISION" in L.matmul.keys  # a TF32 switch after tuning tunes again


def test_compile_variants_are_the_tables_on_their_gpus():
    """The audit compiles each candidate for the GPUs whose table holds it, and IEEE fp32 with the
    pointer loads a GPU launch takes for it."""
    from gpudl.kernels import linear_spec

    seen = {}
    for v in linear_spec._compile_variants():
        if v.kernel is LT._matmul_kernel:
            kw = v.constexprs
            dtype = "bf16" if "bf16" in v.name else "fp32"
            for arch in v.archs:
                seen.setdefault((dtype, kw["INPUT_PRECISION"], arch), set()).add(
                    (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], v.num_warps, v.num_stages))
            if dtype == "fp32" and kw["INPUT_PRECISION"] == "ieee":
                assert kw["LOADS"] == "pointer", v.name
    for (dtype, precision, arch), tiles in seen.items():
        table = LT.tile_table(2 if dtype == "bf16" else 4, precision, arch)
        assert tiles == set(map(_tile, table)), (dtype, precision, arch)
    assert len(seen) == 6


# --------------------------------------------------------------------------- persistent GEMM, load paths
@pytest.mark.parametrize("in_features,loads", [(32, "descriptor"), (37, "pointer")])
def test_gemm_loads_through_descriptors_where_the_tma_can(in_features, loads, launches):
    """Operands with a unit stride, 16-byte aligned base and other stride go through tensor
    descriptors (all three GEMMs of a layer); a ragged in_features (37 fp32 = 148-byte rows) takes
    the pointer loads. Both match PyTorch."""
    torch.manual_seed(0)
    x = torch.randn(300, in_features, requires_grad=True)
    w = torch.randn(48, in_features, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    check_against_reference(L.linear, reference.linear, x, w, b, "gelu")
    gemms = launches.of("_matmul_kernel")
    assert len(gemms) == 4  # forward, gelu's recompute, dx, dW
    assert {g["LOADS"] for g in gemms} == {loads}
    if loads == "descriptor":
        assert [(g["A_MAJOR"], g["B_MAJOR"]) for g in gemms] == [
            ("row", "column"), ("row", "column"), ("row", "row"), ("column", "row")]


def test_persistent_programs_walk_several_tiles(launches):
    """The grid is capped at the SM count (INTERPRETER_PROGRAMS here): with more output tiles than
    programs, each program computes several, and the result still matches."""
    torch.manual_seed(0)
    x = torch.randn(1100, 64, requires_grad=True)
    w = torch.randn(300, 64, requires_grad=True)
    check_against_reference(L.linear, reference.linear, x, w, None, "relu")
    forward = launches.of("_matmul_kernel")[0]
    tiles = -(-1100 // forward["BLOCK_M"]) * -(-300 // forward["BLOCK_N"])
    assert forward["grid"][0] == L.INTERPRETER_PROGRAMS < tiles
    assert all(g["grid"][0] <= L.INTERPRETER_PROGRAMS for g in launches.of("_matmul_kernel"))


def test_on_a_gpu_only_tensor_core_products_take_descriptors():
    """IEEE fp32 / fp64 products (FMA units) read through pointers on a GPU; bf16 and TF32 through
    descriptors; the interpreter takes descriptors wherever they apply, so the tests run them."""
    def path(dtype, precision, on_gpu):
        x, w = torch.empty(64, 32, dtype=dtype), torch.empty(48, 32, dtype=dtype)
        return L._load_path(x, w.t(), "row", "column", precision, on_gpu)

    assert path(torch.float32, "ieee", True) == "pointer"
    assert path(torch.float64, "ieee", True) == "pointer"
    assert path(torch.float32, "tf32", True) == "descriptor"
    assert path(torch.bfloat16, "ieee", True) == "descriptor"
    assert path(torch.float32, "ieee", False) == "descriptor"
    ragged = torch.empty(64, 37)
    assert L._load_path(ragged, torch.empty(48, 37).t(), "row", "column", "tf32", True) == "pointer"


def test_gemm_with_no_unit_stride_takes_pointer_loads(launches):
    x = torch.randn(20, 64)[:, ::2].requires_grad_()  # [20, 32], strides (64, 2)
    w = torch.randn(12, 32, requires_grad=True)
    y = L.linear(x, w, None, "tanh")
    assert launches.of("_matmul_kernel")[0]["LOADS"] == "pointer"
    torch.testing.assert_close(y, reference.linear(x, w, None, "tanh"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_torch_compile_traces_the_custom_op(act):
    """One graph (fullgraph) through the custom op and its backward, gelu's recompute included;
    the same numbers as eager."""
    torch.manual_seed(0)
    x = torch.randn(40, 64, requires_grad=True)
    w = torch.randn(48, 64, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    compiled = torch.compile(lambda *t: L.linear(*t, act), backend="aot_eager", fullgraph=True)
    y = compiled(x, w, b)
    got = torch.autograd.grad(y.square().sum(), (x, w, b))
    eager = L.linear(x, w, b, act)
    want = torch.autograd.grad(eager.square().sum(), (x, w, b))
    torch.testing.assert_close(y, eager)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)
