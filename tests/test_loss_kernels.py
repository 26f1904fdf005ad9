"""Op-specific tests of the fused loss kernels (kernels/bce.py, mse.py, cross_entropy.py).

The registry harness (tests/test_kernels.py) already compares every registered case with the
reference; these cover what it cannot: extreme logits against float64, empty inputs, broadcast
layouts, launch counts (one forward launch; backward launches no kernel), fallbacks, errors and
backend selection through gpudl.ops.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import leaf

import gpudl
from gpudl import ops
from gpudl.kernels import bce, cross_entropy, mse

# --------------------------------------------------------------------------- extreme logits
EXTREME = [-1000.0, -100.0, -30.0, -20.0, -1.0, 0.0, 1.0, 20.0, 30.0, 100.0, 1000.0]


def _exact_float64(x, t, pos_weight):
    """Loss, d/dinput, d/dtarget in float64 from cancellation-free forms (logaddexp(0, x) is
    softplus(x) to full precision). PyTorch's own float64 loss is not exact here: it computes
    (1 - t) x + softplus(-x), which gives 0 instead of exp(-100) at x = -100, t = 0."""
    p = 1.0 if pos_weight is None else pos_weight
    zero = torch.zeros_like(x)
    sp_pos, sp_neg = torch.logaddexp(zero, x), torch.logaddexp(zero, -x)
    loss = (1 - t) * sp_pos + p * t * sp_neg
    return loss, (1 - t) * torch.sigmoid(x) - p * t * torch.sigmoid(-x), p * sp_neg - sp_pos


def test_bce_extreme_logits_finite_and_exact_against_float64(device):
    x64 = torch.tensor(EXTREME, dtype=torch.float64, device=device).repeat_interleave(3)
    t64 = torch.tensor([0.0, 1.0, 0.3], dtype=torch.float64, device=device).repeat(len(EXTREME))
    pw64 = torch.tensor([2.5], dtype=torch.float64, device=device)
    for pos_weight in (None, pw64):
        exact = _exact_float64(x64, t64, pos_weight)
        want, (wx, wt) = _reference_with_grads(x64, t64, pos_weight)
        x, t = leaf(x64.float()), leaf(t64.float())
        got = bce.binary_cross_entropy_with_logits(
            x, t, None, "none", None if pos_weight is None else pos_weight.float()
        )
        gx, gt = torch.autograd.grad(got.sum(), [x, t])
        for name, g, e, w in (
            ("loss", got, exact[0], want),
            ("d/dinput", gx, exact[1], wx),
            ("d/dtarget", gt, exact[2], wt),
        ):
            assert torch.isfinite(g).all(), f"{name} not finite: {g}"
            # Relative accuracy everywhere, tiny values included (log1p(exp(-20)) = 2e-9 is not 0);
            # atol only absorbs float32 subnormals (exp(-100) = 3.7e-44). rtol leaves room for the
            # GPU's exp(x) = ex2.approx(x * log2(e)), whose rounded argument costs ~|x| * 6e-8.
            torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-40, msg=name)
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-12, msg=f"{name} vs PyTorch")
    # The values that naive formulas get wrong: saturated logits with matching targets are exactly 0.
    sat = bce.binary_cross_entropy_with_logits(
        torch.tensor([1000.0, -1000.0, 100.0], device=device),
        torch.tensor([1.0, 0.0, 1.0], device=device),
        None,
        "none",
        None,
    )
    assert sat.tolist() == [0.0, 0.0, pytest.approx(math.exp(-100), rel=1e-5)]


def _reference_with_grads(x64, t64, pos_weight):
    """PyTorch's float64 elementwise loss and its d/dinput, d/dtarget."""
    x, t = leaf(x64), leaf(t64)
    loss = F.binary_cross_entropy_with_logits(x, t, pos_weight=pos_weight, reduction="none")
    return loss.detach(), torch.autograd.grad(loss.sum(), [x, t])


def test_bce_float64_matches_to_double_precision(device):
    x = leaf(torch.tensor(EXTREME, dtype=torch.float64, device=device).repeat(5))
    t = leaf(torch.rand(x.shape, dtype=torch.float64, device=device))
    w = torch.rand(x.shape, dtype=torch.float64, device=device)
    got = bce.binary_cross_entropy_with_logits(x, t, w, "mean", None)
    x2, t2 = leaf(x), leaf(t)
    want = F.binary_cross_entropy_with_logits(x2, t2, w)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    for g, r in zip(torch.autograd.grad(got, [x, t]), torch.autograd.grad(want, [x2, t2])):
        torch.testing.assert_close(g, r, rtol=1e-13, atol=1e-300)


def test_gan_losses_extreme_logits(device):
    real = leaf(torch.tensor(EXTREME, device=device))
    fake = leaf(torch.tensor(EXTREME[::-1] + [5.0], device=device))
    got = bce.gan_discriminator_loss(real, fake)
    real64, fake64 = leaf(real.double()), leaf(fake.double())
    want = F.softplus(-real64).mean() + F.softplus(fake64).mean()
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    for g, r in zip(torch.autograd.grad(got, [real, fake]), torch.autograd.grad(want, [real64, fake64])):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-40)
    gen = bce.gan_generator_loss(fake)
    torch.testing.assert_close(gen.double(), F.softplus(-fake64).mean(), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- empty inputs
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty_inputs_like_pytorch_without_launching(reduction, device, launches):
    x = torch.empty(0, 3, device=device, requires_grad=True)
    t = torch.empty(0, 3, device=device)
    cases = [
        (
            bce.binary_cross_entropy_with_logits(x, t, None, reduction, torch.ones(3, device=device)),
            F.binary_cross_entropy_with_logits(x, t, reduction=reduction),
        ),
        (mse.mse_loss(x, t, reduction), F.mse_loss(x, t, reduction=reduction)),
        (
            cross_entropy.cross_entropy(x, torch.empty(0, dtype=torch.long, device=device), None, -100, reduction, 0.0),
            F.cross_entropy(x, torch.empty(0, dtype=torch.long, device=device), reduction=reduction),
        ),
    ]
    for got, want in cases:
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, equal_nan=True)
        (g,) = torch.autograd.grad(got.sum(), [x])
        assert g.shape == x.shape
    assert len(launches) == 0


def test_gan_empty_half_is_nan(device):
    real = torch.randn(5, device=device, requires_grad=True)
    loss = bce.gan_discriminator_loss(real, torch.empty(0, device=device))
    assert torch.isnan(loss)
    (g,) = torch.autograd.grad(loss, [real])
    torch.testing.assert_close(g, -torch.sigmoid(-real.detach()) / 5)  # the real half's gradient is intact
    assert torch.isnan(bce.gan_generator_loss(torch.empty(0, device=device)))


# --------------------------------------------------------------------------- broadcasting
@pytest.mark.parametrize(
    "shape,weight_shape,pos_weight_shape",
    [
        ((37, 5), (5,), (5,)),
        ((37, 5), (37, 1), (1, 5)),
        ((37, 5), (), (1,)),
        ((37, 5), (37, 5), None),
        ((4, 3, 6), (3, 1), (6,)),
        ((2, 3, 4, 5), (2, 1, 4, 1), (5,)),  # four coalesced dims: materialized
        ((2, 3, 4, 5), (1, 3, 1, 5), (1, 1, 1, 5)),
    ],
)
def test_bce_weight_and_pos_weight_broadcast(shape, weight_shape, pos_weight_shape, device):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device) * 4
    t = torch.rand(shape, device=device)
    w = torch.rand(weight_shape, device=device) + 0.5
    pw = torch.rand(pos_weight_shape, device=device) * 3 if pos_weight_shape is not None else None
    for reduction in ("none", "mean", "sum"):
        xa, ta, xb, tb = leaf(x), leaf(t), leaf(x), leaf(t)
        got = bce.binary_cross_entropy_with_logits(xa, ta, w, reduction, pw)
        want = F.binary_cross_entropy_with_logits(xb, tb, w, reduction=reduction, pos_weight=pw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        grad_out = torch.randn_like(want)
        for g, r in zip(torch.autograd.grad(got, [xa, ta], grad_out), torch.autograd.grad(want, [xb, tb], grad_out)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_bce_strided_weight_is_read_in_place(device, launches):
    x, t = torch.randn(6, 5, device=device), torch.rand(6, 5, device=device)
    w = torch.rand(5, 6, device=device).t()  # non-contiguous, full shape
    pw = torch.rand(5, 2, device=device)[:, 0]  # stride 2, broadcast along the last dim
    got = bce.binary_cross_entropy_with_logits(x, t, w, "none", pw)
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(x, t, w, reduction="none", pos_weight=pw))
    (call,) = launches.of("_bce_fwd_kernel")
    # a full-shape transposed weight: not per row or per class, so the flat kernel reads both
    # operands through their strides (no copies)
    assert call["W_MODE"] == "strided" and call["PW_MODE"] == "strided"


@pytest.mark.parametrize("shape,w_shape,pw_shape,modes", [
    ((6, 5), (6, 1), (5,), ("row", "col")),
    ((2, 3, 4), (3, 1), (2, 3, 1), ("row", "row")),
    ((9,), (), None, ("col", "absent")),
])
def test_bce_weights_per_row_or_class_take_the_tiled_kernel(shape, w_shape, pw_shape, modes, device, launches):
    """Weights broadcast per row ([N, 1]) or per class ([C], a scalar) run the tiled kernel, which
    loads each weight once per tile row or column (strided views included, no copies)."""
    torch.manual_seed(0)
    x, t = torch.randn(shape, device=device, requires_grad=True), torch.rand(shape, device=device)
    w = torch.rand(*w_shape, 2, device=device)[..., 0] + 0.5  # stride 2: read in place
    pw = torch.rand(pw_shape, device=device) * 3 if pw_shape is not None else None
    for reduction in ("none", "mean"):
        got = bce.binary_cross_entropy_with_logits(x, t, w, reduction, pw)
        want = F.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=pw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        grad_out = torch.randn_like(want)
        torch.testing.assert_close(torch.autograd.grad(got, [x], grad_out)[0],
                                   torch.autograd.grad(want, [x], grad_out)[0], rtol=1e-5, atol=1e-6)
    calls = launches.of("_bce_tiled_kernel")
    assert len(calls) == 2 and not launches.of("_bce_fwd_kernel")
    assert (calls[0]["W_MODE"], calls[0]["PW_MODE"]) == modes


def test_broadcast_errors_name_the_argument(device):
    x, t = torch.randn(4, 3, device=device), torch.rand(4, 3, device=device)
    ones = lambda *shape, **kw: torch.ones(*shape, device=device, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"weight of shape \(2,\) does not broadcast to the input shape \(4, 3\)"):
        ops.binary_cross_entropy_with_logits(x, t, weight=ones(2))
    with pytest.raises(ValueError, match=r"pos_weight of shape \(4,\) does not broadcast to the input shape \(4, 3\)"):
        ops.binary_cross_entropy_with_logits(x, t, pos_weight=ones(4))
    with pytest.raises(ValueError, match=r"weight of shape \(2, 4, 3\) does not broadcast"):
        ops.binary_cross_entropy_with_logits(x, t, weight=ones(2, 4, 3))
    with pytest.raises(ValueError, match=r"not differentiable with respect to pos_weight"):
        bce.binary_cross_entropy_with_logits(x, t, None, "mean", ones(3, requires_grad=True))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        ops.cross_entropy(x, torch.tensor([0, 1, 2, 1], device=device), weight=ones(4))


# --------------------------------------------------------------------------- one launch; backward only scales
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_one_launch_and_backward_scales_saved_grad(reduction, device, launches):
    x = torch.randn(4097, device=device, requires_grad=True)
    t = torch.rand(4097, device=device, requires_grad=True)
    loss = bce.binary_cross_entropy_with_logits(x, t, None, reduction, torch.tensor([2.0], device=device))
    calls = launches.of("_bce_fwd_kernel") + launches.of("_bce_tiled_kernel")  # pos_weight [1]: tiled
    assert len(calls) == 1
    call = calls[0]
    assert call["GRAD_X"] and call["GRAD_T"]
    before = len(launches)
    g1 = torch.autograd.grad(loss, [x, t], torch.ones_like(loss), retain_graph=True)
    g3 = torch.autograd.grad(loss, [x, t], torch.full_like(loss, 3.0))
    assert len(launches) == before, "backward launched a kernel"
    for a, b in zip(g1, g3):
        torch.testing.assert_close(b, 3 * a)
    xr, tr = leaf(x), leaf(t)
    want = F.binary_cross_entropy_with_logits(
        xr, tr, reduction=reduction, pos_weight=torch.tensor([2.0], device=device)
    )
    for g, r in zip(g1, torch.autograd.grad(want, [xr, tr], torch.ones_like(want))):
        torch.testing.assert_close(g, r)


def test_gan_discriminator_is_one_launch_over_both_halves(device, launches):
    real = torch.randn(1000, device=device, requires_grad=True)
    fake = torch.randn(5000, device=device, requires_grad=True)
    loss = bce.gan_discriminator_loss(real, fake)
    assert len(launches.of("_softplus_means_kernel")) == 1
    assert len(launches.of("_sum_partials_kernel")) == 1
    before = len(launches)
    gr, gf = torch.autograd.grad(loss, [real, fake])
    assert len(launches) == before
    torch.testing.assert_close(loss, F.softplus(-real).mean() + F.softplus(fake).mean())
    torch.testing.assert_close(gr, -torch.sigmoid(-real.detach()) / 1000)
    torch.testing.assert_close(gf, torch.sigmoid(fake.detach()) / 5000)


def test_mse_target_grad_is_negated_input_grad(device, launches):
    x = torch.randn(37, 5, device=device, requires_grad=True)
    t = torch.randn(37, 5, device=device, requires_grad=True)
    for reduction in ("none", "mean", "sum"):
        loss = mse.mse_loss(x, t, reduction)
        grad_out = torch.randn_like(loss)
        before = len(launches)
        gx, gt = torch.autograd.grad(loss, [x, t], grad_out)
        assert len(launches) == before
        torch.testing.assert_close(gt, -gx)
        xr = leaf(x)
        torch.testing.assert_close(
            gx, torch.autograd.grad(F.mse_loss(xr, t.detach(), reduction=reduction), [xr], grad_out)[0]
        )
    assert len(launches.of("_mse_fwd_kernel")) == 3


def test_no_gradients_computed_when_not_needed(device, launches):
    x = torch.randn(50, device=device, requires_grad=True)
    t = torch.rand(50, device=device)
    bce.binary_cross_entropy_with_logits(x, t, None, "mean", None)
    with torch.no_grad():
        bce.binary_cross_entropy_with_logits(x, t, None, "mean", None)
        mse.mse_loss(x, t, "sum")
        bce.gan_discriminator_loss(x, x)
        cross_entropy.cross_entropy(
            x.view(10, 5), torch.zeros(10, dtype=torch.long, device=device), None, -100, "mean", 0.0
        )
    first, second = launches.of("_bce_fwd_kernel")
    assert (first["GRAD_X"], first["GRAD_T"]) == (True, False)  # target does not require grad
    assert (second["GRAD_X"], second["GRAD_T"]) == (False, False)
    assert not launches.of("_mse_fwd_kernel")[0]["GRAD"]
    assert not launches.of("_softplus_means_kernel")[0]["GRAD_NEG"]
    assert not launches.of("_ce_fwd_kernel")[0]["GRAD"]


def test_non_contiguous_inputs(device):
    x = torch.randn(5, 37, device=device).t().requires_grad_()
    t = torch.rand(5, 37, device=device).t()
    for got, want in (
        (
            bce.binary_cross_entropy_with_logits(x, t, None, "sum", None),
            F.binary_cross_entropy_with_logits(x, t, reduction="sum"),
        ),
        (mse.mse_loss(x, t, "mean"), F.mse_loss(x, t)),
    ):
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, [x])[0], torch.autograd.grad(want, [x])[0])


def test_losses_are_deterministic(device):
    x, t = torch.randn(3 * 4096 + 5, device=device), torch.rand(3 * 4096 + 5, device=device)
    a = bce.binary_cross_entropy_with_logits(x, t, None, "mean", None)
    b = bce.binary_cross_entropy_with_logits(x, t, None, "mean", None)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- cross entropy
def _ce_both(x, y, **kw):
    xa, xb = leaf(x), leaf(x)
    got = cross_entropy.cross_entropy(
        xa,
        y,
        kw.get("weight"),
        kw.get("ignore_index", -100),
        kw.get("reduction", "mean"),
        kw.get("label_smoothing", 0.0),
    )
    want = F.cross_entropy(xb, y, **kw)
    grad_out = torch.randn_like(want)
    return got, want, torch.autograd.grad(got, [xa], grad_out)[0], torch.autograd.grad(want, [xb], grad_out)[0]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
def test_cross_entropy_weighted_ignore_smoothing(reduction, smoothing, device):
    torch.manual_seed(0)
    x = torch.randn(37, 300, device=device) * 3
    y = torch.randint(0, 300, (37,), device=device)
    y[::4] = 7
    w = torch.rand(300, device=device) + 0.1
    got, want, g, r = _ce_both(x, y, weight=w, ignore_index=7, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert (g[::4] == 0).all(), "ignored rows get zero gradient"


def test_cross_entropy_all_ignored_mean_is_nan_with_zero_grads(device):
    x = torch.randn(6, 4, device=device)
    y = torch.full((6,), -100, device=device)
    got, want, g, r = _ce_both(x, y, label_smoothing=0.1)
    assert torch.isnan(got) and torch.isnan(want)
    assert torch.equal(g, r) and (g == 0).all()


@pytest.mark.parametrize("classes", [9000, 40000])
def test_cross_entropy_masked_logits_and_large_rows(classes, device, launches):
    """-inf logits (masked actions) over a leading part of the row: 9000 classes are one chunk
    (the row read once), 40000 stream in chunks (whole leading chunks of -inf, online lse)."""
    x = torch.randn(3, classes, device=device)
    x[:, :classes // 2] = float("-inf")
    y = torch.tensor([classes // 2, classes - 1, classes * 2 // 3], device=device)
    got, want, g, r = _ce_both(x, y)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, r)
    (call,) = launches.of("_ce_fwd_kernel")[:1]
    assert call["SINGLE_CHUNK"] == (classes <= cross_entropy.block_sizes(classes)[1])


def test_cross_entropy_chunked_rows_with_weight_and_smoothing(device):
    """Rows wider than the widest chunk, with class weights, ignore_index and label smoothing."""
    torch.manual_seed(0)
    classes = 20000
    x = torch.randn(4, classes, device=device) * 3
    y = torch.tensor([3, 19999, -100, 17000], device=device)
    w = torch.rand(classes, device=device) + 0.5
    got, want, g, r = _ce_both(x, y, weight=w, label_smoothing=0.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_cross_entropy_one_row_and_strided_input(device):
    x = torch.randn(10, device=device)
    for reduction in ("none", "mean", "sum"):
        got, want, g, r = _ce_both(x, torch.tensor(3, device=device), reduction=reduction)
        assert got.shape == want.shape == ()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(g, r)
    xt = torch.randn(20, 12, device=device).t()  # [12, 20] with stride 1 along N
    got, want, g, r = _ce_both(xt, torch.randint(0, 20, (12,), device=device), reduction="sum")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, r)


def test_cross_entropy_one_launch_and_backward_only_scales(device, launches):
    x = torch.randn(64, 100, device=device, requires_grad=True)
    y = torch.randint(0, 100, (64,), device=device)
    loss = cross_entropy.cross_entropy(x, y, None, -100, "mean", 0.1)
    assert len(launches.of("_ce_fwd_kernel")) == 1
    before = len(launches)
    (g,) = torch.autograd.grad(loss, [x], torch.tensor(2.5, device=device))
    assert len(launches) == before
    xr = leaf(x)
    (want,) = torch.autograd.grad(F.cross_entropy(xr, y, label_smoothing=0.1), [xr], torch.tensor(2.5, device=device))
    torch.testing.assert_close(g, want, atol=1e-7, rtol=1e-5)


def test_cross_entropy_out_of_range_target(device):
    x = torch.randn(4, 5, device=device)
    y = torch.tensor([0, 5, 1, 2], device=device)
    if device.type == "cpu":
        with pytest.raises(IndexError, match="target 5 is out of bounds for 5 classes"):
            cross_entropy.cross_entropy(x, y, None, -100, "mean", 0.0)
    else:  # no host sync on a GPU: the bad row poisons the loss instead
        assert torch.isnan(cross_entropy.cross_entropy(x, y, None, -100, "mean", 0.0))
        assert torch.isnan(cross_entropy.cross_entropy(x, y, None, -100, "none", 0.0)[1])


def test_cross_entropy_fallbacks_warn_with_reason(device):
    """What the kernel does not take (its spec's `unsupported`) runs on the reference through
    gpudl.ops, with a warning that names the reason and points at the caller's line."""
    x = torch.randn(4, 5, 3, device=device)
    y = torch.randint(0, 5, (4, 3), device=device)
    with gpudl.use_backend("triton"):
        with pytest.warns(UserWarning, match=r"extra dims \[N, C, d...\]") as record:
            got = ops.cross_entropy(x, y)
        assert record[0].filename == __file__
        torch.testing.assert_close(got, F.cross_entropy(x, y))
        probs = torch.softmax(torch.randn(4, 5, device=device), 1)
        with pytest.warns(UserWarning, match="class-probability targets"):
            got = ops.cross_entropy(x[..., 0], probs, reduction="sum")
        torch.testing.assert_close(got, F.cross_entropy(x[..., 0], probs, reduction="sum"))
    with pytest.raises(ValueError, match="not differentiable with respect to weight"):
        cross_entropy.cross_entropy(
            x[..., 0], y[:, 0], torch.ones(5, device=device, requires_grad=True), -100, "mean", 0.0
        )


# --------------------------------------------------------------------------- backend selection
def test_gpudl_ops_dispatch_to_the_kernels(device, launches):
    x = torch.randn(8, 5, device=device, requires_grad=True)
    t = torch.rand(8, 5, device=device)
    y = torch.randint(0, 5, (8,), device=device)
    calls = [
        lambda: ops.binary_cross_entropy_with_logits(x, t, pos_weight=torch.ones(5, device=device)),
        lambda: ops.gan_discriminator_loss(x, t),
        lambda: ops.gan_generator_loss(x),
        lambda: ops.mse_loss(x, t, reduction="sum"),
        lambda: ops.cross_entropy(x, y, label_smoothing=0.1),
    ]
    with gpudl.use_backend("torch"):
        torch_results = [f() for f in calls]
    assert len(launches) == 0
    with gpudl.use_backend("triton"):
        for f, want in zip(calls, torch_results):
            before = len(launches)
            got = f()
            assert len(launches) > before
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(torch.autograd.grad(got, [x])[0], torch.autograd.grad(want, [x])[0])
