"""Op-specific tests of the fused LayerNorm (kernels/layer_norm.py) and gpudl.ops.layer_norm.

The registry harness (tests/test_kernels.py) already compares every registered case with the
reference; these cover what it cannot: multi-dim normalized_shape through gpudl.ops, layouts,
empty shapes, numerics against float64, reproducible weight/bias gradients over many programs,
which kernels launch for which required grads, the fallback for long rows, validation errors,
backend selection and the nn.LayerNorm drop-in.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_close, check_triton_against_torch, on_backend, run_against_reference

import gpudl
from gpudl import nn, ops
from gpudl.kernels import layer_norm as ln
from gpudl.kernels import layer_norm_triton as ln_triton


def _params(shape, device, dtype=torch.float32, requires_grad=True):
    w = (1.0 + 0.5 * torch.randn(shape, device=device, dtype=dtype)).requires_grad_(requires_grad)
    b = (0.5 * torch.randn(shape, device=device, dtype=dtype)).requires_grad_(requires_grad)
    return w, b


@pytest.mark.parametrize("shape,normalized_shape", [((2, 3, 4, 5), (4, 5)), ((3, 6), 6), ((2, 7), [7]), ((9,), (9,))])
def test_ops_matches_torch_for_any_normalized_shape(shape, normalized_shape, device):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, requires_grad=True)
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    w, b = _params(ns, device)
    out = check_triton_against_torch(lambda x, w, b: ops.layer_norm(x, normalized_shape, w, b, eps=1e-5), x, w, b).out
    assert out.shape == x.shape


def test_non_contiguous_input_and_grad_output(device):
    torch.manual_seed(0)
    x = torch.randn(24, 5, device=device).t().requires_grad_()  # [5, 24], rows strided
    assert not x.is_contiguous()
    w, b = _params((24,), device)
    check_triton_against_torch(lambda x, w, b: ops.layer_norm(x, (24,), w, b), x, w, b)
    # a non-contiguous grad_output (an expanded scalar, as from .sum()) reaches the kernel as well
    with gpudl.use_backend("triton"):
        x2 = x.detach().clone().requires_grad_()
        ops.layer_norm(x2, (24,)).sum().backward()
    x3 = x.detach().clone().requires_grad_()
    F.layer_norm(x3, (24,)).sum().backward()
    torch.testing.assert_close(x2.grad, x3.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (3, 0)])
def test_empty_shapes(shape, device, launches):
    x = torch.randn(shape, device=device, requires_grad=True)
    w, b = _params(shape[-1:], device)
    with gpudl.use_backend("triton"):
        out = ops.layer_norm(x, shape[-1:], w, b)
    assert out.shape == x.shape
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
    assert gx.shape == x.shape
    # no rows: the parameter gradients are zeros, as torch gives
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))
    assert len(launches) == 0, "nothing to launch for an empty input"


def test_numerics_against_float64(device):
    """Rows far from zero (mean 1e3, spread 1e-1), a constant row and a row at 1e4: fp32 stats
    with a two-pass variance stay close to a float64 computation."""
    torch.manual_seed(0)
    x = torch.randn(6, 257, device=device) * 0.1 + 1e3
    x[1] = 3.0  # constant row: var 0, y = bias exactly
    x[2] = torch.randn(257, device=device) * 1e2 + 1e4
    w, b = _params((257,), device, requires_grad=False)
    with gpudl.use_backend("triton"):
        out = ops.layer_norm(x, (257,), w, b)
    want = F.layer_norm(x.double(), (257,), w.double(), b.double())
    torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(out[1], b)


def test_float64_matches_reference_closely(device):
    torch.manual_seed(0)
    x = torch.randn(5, 33, device=device, dtype=torch.float64, requires_grad=True)
    w, b = _params((33,), device, torch.float64)
    out = check_triton_against_torch(lambda x, w, b: ops.layer_norm(x, (33,), w, b), x, w, b,
                                     atol=1e-12, rtol=1e-12).out
    assert out.dtype == torch.float64


def test_parameter_grads_over_many_programs_are_reproducible(device, launches):
    """Enough rows for several backward programs, each walking several row tiles: the partials
    sum in a fixed order, so two runs agree bit for bit, and they match torch."""
    torch.manual_seed(0)
    n = 24
    block_n, rows, _ = ln_triton.launch_config(n, 10**6)
    m = rows * 9 + 5  # 10 tiles, the last one ragged
    x = torch.randn(m, n, device=device)
    w, b = _params((n,), device)
    g = torch.randn(m, n, device=device)
    runs = []
    for _ in range(2):
        w_, b_ = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        with gpudl.use_backend("triton"):
            out = ops.layer_norm(x, (n,), w_, b_)
        runs.append(torch.autograd.grad(out, (w_, b_), g))
    bwd = launches.of("_ln_bwd_kernel")[0]
    programs = bwd["grid"][0]
    assert programs > 1 and bwd["ROWS"] == rows, "the test should cover several programs"
    assert launches.of("_ln_reduce_partials_kernel"), "the partials are reduced by the second kernel"
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    w_ref, b_ref = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    want = torch.autograd.grad(F.layer_norm(x, (n,), w_ref, b_ref), (w_ref, b_ref), g)
    for a, r in zip(runs[0], want):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("wanted", [("x", "w", "b"), ("w",), ("x", "b")])
def test_long_rows_take_the_separate_dweight_dbias_kernel(wanted, monkeypatch, device, launches):
    """Rows of SPLIT_DWDB_BLOCK_N and more (forced down to 64 here) get dweight/dbias from their own
    kernel over [rows, column block] tiles: the same gradients as the fused path (dx bit for bit, the
    parameter gradients up to summation order), reproducible, and only those asked for."""
    torch.manual_seed(0)
    m, n = 45, 600  # BLOCK_N 1024; two column blocks of the separate kernel, ragged rows and columns
    x = torch.randn(m, n, device=device)
    w, b = _params((n,), device)
    g = torch.randn(m, n, device=device)

    def grads():
        leaves = [t.detach().clone().requires_grad_(name in wanted) for t, name in ((x, "x"), (w, "w"), (b, "b"))]
        with gpudl.use_backend("triton"):
            out = ops.layer_norm(leaves[0], (n,), leaves[1], leaves[2])
        return torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g)

    fused = grads()
    monkeypatch.setattr(ln_triton, "SPLIT_DWDB_BLOCK_N", 64)
    launches.records.clear()
    split = grads()
    dwdb = launches.of("_ln_bwd_dwdb_kernel")
    assert len(dwdb) == 1 and dwdb[0]["grid"][1] == 2
    assert (dwdb[0]["DW"], dwdb[0]["DB"]) == ("w" in wanted, "b" in wanted)
    assert [c["DX"] for c in launches.of("_ln_bwd_kernel")] == ([True] if "x" in wanted else [])
    assert all(not (c["DW"] or c["DB"]) for c in launches.of("_ln_bwd_kernel"))
    for a, c, again in zip(fused, split, grads()):
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)
        assert torch.equal(c, again)
    if "x" in wanted:
        assert torch.equal(fused[0], split[0])


def test_longest_rows_match_torch(device, launches):
    """Rows of MAX_N: the backward reloads the weight per tile and leaves dweight/dbias to the
    separate kernel; outputs and all three gradients match torch."""
    torch.manual_seed(0)
    n = ln.MAX_N
    x = torch.randn(3, n, device=device)
    w, b = _params((n,), device)
    fn = lambda x_, w_, b_: ops.layer_norm(x_, (n,), w_, b_)  # noqa: E731
    out, want, grads, want_grads = run_against_reference(on_backend("triton", fn), on_backend("torch", fn),
                                                         x.requires_grad_(), w, b)
    assert launches.of("_ln_bwd_dwdb_kernel") and launches.of("_ln_bwd_kernel")[0]["BLOCK_N"] == n
    assert_all_close([out], [want], atol=1e-5, rtol=1e-5, what="output")
    assert_all_close(grads, want_grads, atol=1e-4, rtol=1e-4, what="gradient")


@pytest.mark.parametrize("wanted", [("x",), ("w",), ("b",), ("w", "b"), ("x", "b")])
def test_only_required_grads_are_computed(wanted, device, launches):
    torch.manual_seed(0)
    x = torch.randn(4, 40, device=device, requires_grad="x" in wanted)
    w = torch.randn(40, device=device, requires_grad="w" in wanted)
    b = torch.randn(40, device=device, requires_grad="b" in wanted)
    with gpudl.use_backend("triton"):
        out = ops.layer_norm(x, (40,), w, b)
    leaves = [t for t, name in ((x, "x"), (w, "w"), (b, "b")) if name in wanted]
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert all(g is not None for g in grads)
    call = launches.of("_ln_bwd_kernel")[0]
    assert (call["DX"], call["DW"], call["DB"]) == ("x" in wanted, "w" in wanted, "b" in wanted)
    assert bool(launches.of("_ln_reduce_partials_kernel")) == ("w" in wanted or "b" in wanted)


def test_inference_saves_no_statistics(device, launches):
    x = torch.randn(3, 16, device=device)
    w, b = _params((16,), device)
    with gpudl.use_backend("triton"), torch.no_grad():
        ops.layer_norm(x, (16,), w, b)
    assert launches.of("_ln_fwd_kernel")[0]["STORE_STATS"] is False


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)])
def test_missing_weight_or_bias(affine, device):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 37, device=device, requires_grad=True)
    w, b = _params((37,), device)
    w, b = (w if affine[0] else None), (b if affine[1] else None)
    grads = check_triton_against_torch(lambda x, w, b: ops.layer_norm(x, (37,), w, b), x, w, b).grads
    assert len(grads) == 1 + sum(affine)


def test_long_rows_fall_back_with_a_warning(device):
    n = ln.MAX_N + 1
    x = torch.randn(2, n, device=device)
    with gpudl.use_backend("triton"), pytest.warns(UserWarning, match=rf"layer_norm.*longer than {ln.MAX_N}.*N={n}"):
        out = ops.layer_norm(x, (n,))
    torch.testing.assert_close(out, F.layer_norm(x, (n,)))


def test_kernel_entry_refuses_long_rows():
    with pytest.raises(ValueError, match=rf"longer than {ln.MAX_N}"):
        ln.layer_norm(torch.randn(1, ln.MAX_N + 1), None, None, 1e-5)


def test_double_backward_is_refused(device):
    x = torch.randn(3, 8, device=device, requires_grad=True)
    with gpudl.use_backend("triton"):
        y = ops.layer_norm(x, (8,))
    (gx,) = torch.autograd.grad(y.square().sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("call,error,match", [
    (lambda x: ops.layer_norm(x, (5,)), ValueError, r"input of shape \(3, 4\) must end with normalized_shape \(5,\)"),
    (lambda x: ops.layer_norm(x, (2, 3, 4)), ValueError, r"must end with normalized_shape \(2, 3, 4\)"),
    (lambda x: ops.layer_norm(x, ()), ValueError, r"normalized_shape must have at least one dim"),
    (lambda x: ops.layer_norm(x, 4.0), TypeError, r"normalized_shape must be an int or a sequence of ints, got 4.0"),
    (lambda x: ops.layer_norm(x, (True,)), TypeError, r"normalized_shape must be an int or a sequence of ints"),
    (lambda x: ops.layer_norm(x, (4,), torch.ones(3)), ValueError,
     r"weight must have shape normalized_shape \(4,\), got \(3,\)"),
    (lambda x: ops.layer_norm(x, (4,), None, torch.ones(2, 2)), ValueError,
     r"bias must have shape normalized_shape \(4,\), got \(2, 2\)"),
    (lambda x: ops.layer_norm(x, (4,), torch.ones(4, dtype=torch.float64)), TypeError,
     r"weight has dtype torch.float64 but input has dtype torch.float32"),
    (lambda x: ops.layer_norm(x, (4,), [1.0] * 4), TypeError, r"weight must be a torch.Tensor, got list"),
    (lambda x: ops.layer_norm(x.long(), (4,)), TypeError, r"input must be a floating-point tensor"),
    (lambda x: ops.layer_norm(x, (4,), eps=-1e-5), ValueError, r"eps must be a finite float >= 0, got -1e-05"),
    (lambda x: ops.layer_norm(x, (4,), eps=float("nan")), ValueError, r"eps must be a finite float >= 0, got nan"),
    (lambda x: ops.layer_norm(x, (4,), eps=True), ValueError, r"eps must be a finite float >= 0, got True"),
])
def test_validation_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(3, 4))


def test_backend_selection(device, launches):
    x = torch.randn(3, 16, device=device)
    with gpudl.use_backend("torch"):
        ops.layer_norm(x, (16,))
    assert not launches.of("_ln_fwd_kernel")
    with gpudl.use_backend("triton"):
        ops.layer_norm(x, (16,))
    assert len(launches.of("_ln_fwd_kernel")) == 1


@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}])
def test_nn_layer_norm_is_a_drop_in(kwargs, device, launches):
    torch.manual_seed(0)
    theirs = torch.nn.LayerNorm((4, 6), **kwargs).to(device)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.normal_()
            if theirs.bias is not None:
                theirs.bias.normal_()
    ours = nn.LayerNorm((4, 6), **kwargs).to(device)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 3, 4, 6, device=device)
    with gpudl.use_backend("triton"):
        out = ours(x)
    assert launches.of("_ln_fwd_kernel"), "the module ran the kernel"
    torch.testing.assert_close(out, theirs(x), atol=1e-5, rtol=1e-5)
    if theirs.weight is not None:
        out.sum().backward()
        theirs(x).sum().backward()
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-5, rtol=1e-5)


def test_attention_model_runs_its_layer_norms_on_the_kernel(device, launches):
    from gpudl.models import AttentionModule

    model = AttentionModule(embed_dim=16, num_heads=2, num_layers=1, mlp_dim=16).to(device)
    assert all(type(m) is nn.LayerNorm for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    with gpudl.use_backend("triton"):
        model(torch.randn(2, 1, 8, 8, device=device)).sum().backward()
    assert len(launches.of("_ln_fwd_kernel")) == 3  # ln_1, ln_2 and ln_f
    assert len(launches.of("_ln_bwd_kernel")) == 3
