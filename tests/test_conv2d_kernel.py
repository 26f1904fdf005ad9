"""Op-specific tests of the conv2d and max_pool2d kernels (the registry harness in
tests/test_kernels.py covers their cases, gradcheck and compilation): layouts, partial gradients,
empty batches, the wgrad split, fallbacks, errors, and dispatch through gpudl.ops / gpudl.nn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import check_against_reference, innermost_function, leaf, on_backend, recording_launches
from torch.utils._python_dispatch import TorchDispatchMode

import gpudl
from gpudl import nn as gnn
from gpudl import ops, reference
from gpudl.kernels import conv2d as conv_kernels
from gpudl.kernels import max_pool2d as pool_kernels
from gpudl.kernels.registry import INTERPRET

CL = torch.channels_last


pytestmark = pytest.mark.usefixtures("on_test_device", "exact_fp32_convolutions")


def _grads(out, inputs, gy):
    return torch.autograd.grad(out, [t for t in inputs if t.requires_grad], gy)


def _reference_conv2d(x, w, b=None, activation=None, **kwargs):
    return reference.activation(F.conv2d(x, w, b, **kwargs), activation)


def _conv_pair(x, w, b=None, activation=None, atol=1e-5, rtol=1e-5, **kwargs):
    """ops.conv2d on the triton backend against F.conv2d and the activation, every operand
    requiring grad (helpers.check_against_reference); returns (out, ref, grads, ref_grads)."""
    operands = [None if t is None else leaf(t) for t in (x, w, b)]
    return check_against_reference(on_backend("triton", ops.conv2d), _reference_conv2d, *operands,
                                   activation=activation, atol=atol, rtol=rtol, **kwargs)


# --------------------------------------------------------------------------- conv2d
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "tanh", "sigmoid", "gelu"])
def test_conv2d_every_activation_through_ops(activation):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 6, 7), torch.randn(4, 3, 3, 3) / 5, torch.randn(4)
    y, r, got, want = _conv_pair(x, w, b, activation, stride=(1, 2), padding=1)
    assert y.grad_fn is not None and "gpudl_conv2d" in type(y.grad_fn).__name__  # the Triton kernel ran


@pytest.mark.parametrize("x_cl,w_cl", [(True, False), (False, True), (True, True)])
def test_conv2d_channels_last_output_follows_input(x_cl, w_cl):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, 7, 6), torch.randn(6, 5, 3, 2) / 5, torch.randn(6)
    if x_cl:
        x = x.to(memory_format=CL)
    if w_cl:
        w = w.to(memory_format=CL)
    y, r, got, want = _conv_pair(x, w, b, "relu", padding=(1, 0))
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
    assert y.stride() == r.stride()
    if x_cl:  # the input gradient keeps the input's layout
        assert got[0].is_contiguous(memory_format=CL)


def test_conv2d_single_channel_image_starts_channels_last():
    """A single-channel image is NCHW and channels_last at once (contiguous(channels_last) keeps its
    strides): the output is channels_last, the convention's layout, so a channels_last model's
    activations and the gradients reaching each backward are too. Values match F.conv2d."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 7, 6).contiguous(memory_format=CL)
    w, b = torch.randn(4, 1, 3, 3) / 3, torch.randn(4)
    y, r, got, want = _conv_pair(x, w, b, "relu", padding=1)
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
    assert got[0].shape == x.shape


def test_cnn_gradients_reach_each_conv_backward_channels_last(monkeypatch):
    """The CNN's convolutions and poolings run channels_last from its single-channel input on; every
    gradient a conv2d backward receives is channels_last, so none is repacked."""
    from gpudl.models.cnn import CNNModule

    seen = []
    backward = conv_kernels._conv2d_backward

    def recording(gy, *args):
        seen.append(gy.is_contiguous(memory_format=CL) and not gy.is_contiguous())
        return backward(gy, *args)

    monkeypatch.setattr(conv_kernels, "_conv2d_backward", recording)
    torch.manual_seed(0)
    model = CNNModule(in_channels=1, image_size=8, channels=(4, 8), hidden=8)
    with gpudl.use_backend("triton"):
        model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert seen == [True, True]


def test_conv2d_non_contiguous_views_and_stride0_grad():
    torch.manual_seed(0)
    big = torch.randn(2, 8, 11, 13)
    x = big[:, 1:7:2, ::2, 1:]  # [2, 3, 6, 12], every stride unusual, not dense
    w = torch.randn(5, 3, 4, 3).transpose(2, 3)  # [5, 3, 3, 4], non-contiguous
    assert not x.is_contiguous() and not w.is_contiguous()
    rx, rw = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    kx, kw_ = x.requires_grad_(), w.requires_grad_()  # the views themselves reach gpudl.ops
    with gpudl.use_backend("triton"):
        y = ops.conv2d(kx, kw_, None, padding=(2, 1), dilation=(1, 2), activation="tanh")
    r = torch.tanh(F.conv2d(rx, rw, None, padding=(2, 1), dilation=(1, 2)))
    torch.testing.assert_close(y, r, atol=1e-5, rtol=1e-5)
    # sum() hands backward an expanded gradient with stride 0 everywhere
    y.sum().backward()
    r.sum().backward()
    torch.testing.assert_close(kx.grad, rx.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kw_.grad, rw.grad, atol=1e-5, rtol=1e-5)


def test_conv2d_same_padding_even_kernel_and_unbatched():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 6), torch.randn(4, 3, 2, 4) / 5, torch.randn(4)
    with gpudl.use_backend("triton"):
        y = ops.conv2d(x, w, b, padding="same", dilation=(2, 1), activation="sigmoid")
    r = torch.sigmoid(F.conv2d(x, w, b, padding="same", dilation=(2, 1)))
    assert y.shape == r.shape == (4, 5, 6)
    torch.testing.assert_close(y, r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("which", ["input", "weight", "bias", "weight+bias"])
def test_conv2d_only_requested_gradients(which):
    """Each subset of inputs that requires grad gets exactly its gradients (the wgrad kernel runs
    without its GEMM when only the bias needs one)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3) / 4, torch.randn(6)
    kx, kw_, kb = x.clone(), w.clone(), b.clone()
    rx, rw, rb = x.clone(), w.clone(), b.clone()
    names = which.split("+")
    for name, k, r in (("input", kx, rx), ("weight", kw_, rw), ("bias", kb, rb)):
        if name in names:
            k.requires_grad_()
            r.requires_grad_()
    with gpudl.use_backend("triton"):
        y = ops.conv2d(kx, kw_, kb, stride=2, padding=1, groups=2, activation="gelu")
    ref = F.gelu(F.conv2d(rx, rw, rb, stride=2, padding=1, groups=2))
    gy = torch.randn_like(ref)
    got = _grads(y, [kx, kw_, kb], gy)
    want = _grads(ref, [rx, rw, rb], gy)
    assert len(got) == len(names)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_conv2d_no_grad_stores_nothing_and_matches():
    torch.manual_seed(0)
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with torch.no_grad(), gpudl.use_backend("triton"):
        y = ops.conv2d(x.requires_grad_(), w, None, activation="gelu")
    assert y.grad_fn is None
    torch.testing.assert_close(y, F.gelu(F.conv2d(x, w)), atol=1e-5, rtol=1e-5)


def test_conv2d_wgrad_split_reduction(monkeypatch):
    """On GPUs the wgrad reduction is split over programs; force three uneven splits here."""
    monkeypatch.setattr(conv_kernels, "_wgrad_splits", lambda m, tiles, groups, device: 3)
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 3, 7, 5), torch.randn(4, 3, 3, 3) / 5, torch.randn(4)
    y, r, got, want = _conv_pair(x, w, b, "leaky_relu", padding=1)  # M = 3 * 7 * 5 = 105 rows


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_conv2d_nchw_operands(activation):
    """NCHW operands are repacked channels innermost for the GEMMs (conv2d.channels_inner);
    outputs and gradients keep their NCHW layouts and match the reference."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 6, 7, 5), torch.randn(4, 3, 3, 2) / 5, torch.randn(4)
    y, r, got, want = _conv_pair(x, w, b, activation, stride=(2, 1), padding=1, groups=2)
    assert y.is_contiguous() and got[0].is_contiguous() and got[1].is_contiguous()


def test_conv2d_zero_size_batch_and_channels():
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, 3, 3).requires_grad_(), torch.randn(4).requires_grad_()
    x = torch.randn(0, 3, 5, 5).requires_grad_()
    with gpudl.use_backend("triton"):
        y = ops.conv2d(x, w, b, padding=1, activation="relu")
    assert y.shape == (0, 4, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    with gpudl.use_backend("triton"):
        y = ops.conv2d(torch.randn(2, 3, 5, 5), torch.randn(0, 3, 3, 3))
        assert y.shape == (2, 0, 3, 3)
        with pytest.raises(ValueError, match=r"weight \(3, 0, 3, 3\) has no input channels"):
            ops.conv2d(torch.randn(2, 0, 5, 5), torch.randn(3, 0, 3, 3))


def test_conv2d_float64_matches_reference():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 6, 5, dtype=torch.float64), torch.randn(5, 3, 2, 3, dtype=torch.float64), None
    y, r, got, want = _conv_pair(x, w, b, "sigmoid", stride=(2, 1), dilation=(2, 1), atol=1e-12, rtol=1e-12)
    assert y.dtype == torch.float64


def test_conv2d_double_backward_is_refused():
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    with gpudl.use_backend("triton"):
        y = ops.conv2d(x, w, None, activation="tanh")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice|once_differentiable|does not require grad"):
        torch.autograd.grad(gx.sum(), w)


def test_conv2d_groups_beyond_grid_limit_falls_back(monkeypatch):
    monkeypatch.setattr(conv_kernels, "MAX_GRID_Z", 2)  # the real limit is 65535 groups
    torch.manual_seed(0)
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3)
    match = r"conv2d: running the PyTorch reference.*groups x stride_h x stride_w = 4 > 2"
    with gpudl.use_backend("triton"), pytest.warns(UserWarning, match=match):
        y = ops.conv2d(x, w, None, padding=1, groups=4, activation="relu")
    assert y.grad_fn is None or "gpudl_conv2d" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, F.relu(F.conv2d(x, w, None, padding=1, groups=4)))


def test_conv2d_backend_torch_does_not_run_the_kernel():
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    w = torch.randn(3, 2, 3, 3)
    with gpudl.use_backend("torch"):
        y = ops.conv2d(x, w, activation="relu")
    assert "gpudl_conv2d" not in type(y.grad_fn).__name__


def test_nn_conv2d_under_triton_backend():
    torch.manual_seed(0)
    ours = gnn.Conv2d(3, 6, kernel_size=(3, 2), stride=(1, 2), padding="valid", dilation=(2, 1), groups=3,
                      activation="relu")
    twin = torch.nn.Conv2d(3, 6, kernel_size=(3, 2), stride=(1, 2), padding="valid", dilation=(2, 1), groups=3)
    twin.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 9, 8).to(memory_format=CL)
    with gpudl.use_backend("triton"):
        y = ours(x)
    assert "gpudl_conv2d" in type(y.grad_fn).__name__
    r = F.relu(twin(x))
    torch.testing.assert_close(y, r, atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(r)
    y.backward(gy)
    r.backward(gy)
    torch.testing.assert_close(ours.weight.grad, twin.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.bias.grad, twin.bias.grad, atol=1e-5, rtol=1e-5)
    same = gnn.Conv2d(2, 2, 4, padding="same", bias=False)  # even kernel: asymmetric padding
    xs = torch.randn(1, 2, 5, 6)
    with gpudl.use_backend("triton"):
        torch.testing.assert_close(same(xs), F.conv2d(xs, same.weight, padding="same"), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- max_pool2d
def _pool_pair(x, *args, **kwargs):
    """ops.max_pool2d on the triton backend against F.max_pool2d, output and input gradient
    bit for bit (helpers.check_against_reference); returns (out, ref, grads, ref_grads)."""
    return check_against_reference(on_backend("triton", ops.max_pool2d), F.max_pool2d, leaf(x), *args,
                                   atol=0, rtol=0, **kwargs)


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool2d_through_ops(ceil_mode):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 10)
    y, r, got, want = _pool_pair(x, (3, 2), (2, 3), (1, 1), (1, 2), ceil_mode)
    assert "gpudl_max_pool2d" in type(y.grad_fn).__name__  # the Triton kernel ran
    assert y.shape == r.shape


def test_max_pool2d_argmax_equals_torch_indices_with_ties():
    torch.manual_seed(0)
    x = torch.randint(0, 2, (2, 3, 9, 9)).float().to(memory_format=CL)
    y, idx = pool_kernels._max_pool2d_forward(x, (3, 3), (2, 2), (1, 1), (1, 1), True, True)
    r, ridx = F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    assert torch.equal(y, r) and torch.equal(idx.long(), ridx)
    assert y.is_contiguous(memory_format=CL) and y.stride() == r.stride()


def test_max_pool2d_layouts_nan_and_padding_only_windows():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9)[:, ::2, 1:, ::2]  # non-contiguous, and not dense
    x[0, 0, 2, 2] = float("nan")
    kx = x.requires_grad_()
    with gpudl.use_backend("triton"):
        y = ops.max_pool2d(kx, 2, 2, 1)
    rx = x.detach().clone().requires_grad_()
    r = F.max_pool2d(rx, 2, 2, 1)
    torch.testing.assert_close(y, r, equal_nan=True)
    assert torch.isnan(y[0, 0, 1, 1])
    gy = torch.randn_like(r)
    (got,) = torch.autograd.grad(y, kx, gy)
    (want,) = torch.autograd.grad(r, rx, gy)
    torch.testing.assert_close(got, want)
    # kernel 2, padding 1, dilation 4 on 3x3: the window's two taps both land in the padding.
    # Its output is -inf and its gradient goes nowhere. (Not compared with torch's backward: on the
    # CPU torch stores index 12 for this window, past the 9-element plane, and its backward writes
    # the gradient there, outside the gradient buffer, corrupting the heap.)
    x = torch.arange(9.0).reshape(1, 1, 3, 3).requires_grad_()
    with gpudl.use_backend("triton"):
        y = ops.max_pool2d(x, 2, 1, 1, 4)
    assert torch.equal(y.detach(), F.max_pool2d(x.detach(), 2, 1, 1, 4)) and y.item() == float("-inf")
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_max_pool2d_empty_unbatched_and_errors():
    with gpudl.use_backend("triton"):
        x = torch.randn(0, 3, 6, 6, requires_grad=True)
        y = ops.max_pool2d(x, 2)
        assert y.shape == (0, 3, 3, 3)
        y.sum().backward()
        assert x.grad.shape == x.shape
        u = torch.randn(3, 6, 5)
        torch.testing.assert_close(ops.max_pool2d(u, 3, 1, 1), F.max_pool2d(u, 3, 1, 1))
        with pytest.raises(ValueError, match=r"gives output size \(0, 0\)"):
            ops.max_pool2d(torch.randn(1, 1, 2, 2), 3, 1, 1, 2)
    with gpudl.use_backend("torch"), pytest.raises(ValueError, match=r"gives output size"):
        ops.max_pool2d(torch.randn(1, 1, 2, 2), 3, 1, 1, 2)


def test_max_pool2d_float64():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 7, 7, dtype=torch.float64)
    y, r, got, want = _pool_pair(x, 3, 2, 1)
    assert y.dtype == torch.float64


# --------------------------------------------------------------------------- memory
class _Allocations(TorchDispatchMode):
    """Every tensor an aten op returns fresh (allocations and copies), as (op, shape, channels_last)."""

    COPIES = ("aten.clone", "aten._to_copy", "aten.copy_", "aten.contiguous")

    def __init__(self):
        super().__init__()
        self.made, self.copies = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name.startswith(self.COPIES):
            self.copies.append(name)
        elif "empty" in name or "zeros" in name:
            self.made.append((name, tuple(out.shape), out.dim() == 4 and out.is_contiguous(memory_format=CL)))
        return out


class _NoLaunch:
    """Stands in for wrap_triton: records the kernels a launcher would run, runs none (the
    interpreter's own host copies are not the op's)."""

    def __init__(self):
        self.kernels = []

    def __call__(self, kernel):
        def launch(grid):
            return lambda *args, **kwargs: self.kernels.append(innermost_function(kernel).__name__)

        return type("Launcher", (), {"__getitem__": lambda _, grid: launch(grid)})()


@pytest.mark.parametrize("activation", [None, "relu"])
def test_conv2d_channels_last_allocates_no_copies(monkeypatch, activation):
    """A channels_last forward + backward allocates its outputs and gradients (channels_last where
    they are images) and, with an activation, the one dz buffer the GEMMs read; it copies nothing."""
    launcher = _NoLaunch()
    monkeypatch.setattr(conv_kernels, "wrap_triton", launcher)
    x = torch.randn(2, 8, 10, 10).to(memory_format=CL)
    w = torch.randn(16, 8, 3, 3).to(memory_format=CL)
    b = torch.randn(16)
    act = "none" if activation is None else activation
    conf = ((1, 1), (1, 1, 1, 1), (1, 1), 1, act)
    with _Allocations() as forward:
        y, z = conv_kernels._conv2d_forward(x, w, b, *conf, False)
    gy = torch.randn_like(y)
    saved = y if activation else None
    with _Allocations() as backward:
        dx, dw, db = conv_kernels._conv2d_backward(gy, x, w, saved, list(x.shape), list(x.stride()), list(w.shape),
                                                   *conf, True, True, True)
    assert forward.copies == [] and backward.copies == []
    assert [shape for _, shape, _ in forward.made] == [(2, 16, 10, 10)] and forward.made[0][2]
    images = [(shape, cl) for _, shape, cl in backward.made if len(shape) == 4 and shape[0] == 2]
    expected = [((2, 16, 10, 10), True)] if activation else []  # dz = dy * act'(y)
    assert images == expected + [((2, 8, 10, 10), True)]  # + dx
    others = sorted(shape for _, shape, _ in backward.made if shape not in [s for s, _ in images])
    assert others == [(16,), (16, 8, 3, 3)]  # db, dw: no partial buffers with one split
    assert y.is_contiguous(memory_format=CL) and dx.is_contiguous(memory_format=CL)
    assert "_conv2d_dgrad_kernel" in launcher.kernels and "_conv2d_wgrad_kernel" in launcher.kernels


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_conv2d_backward_in_batch_chunks(monkeypatch, activation):
    """Past DZ_CHUNK_BYTES the backward makes dz one batch chunk at a time (uneven chunks here: a
    batch of 5 in chunks of 2, 2, 1, the wgrad split too); dx, dw and db match the reference."""
    monkeypatch.setattr(conv_kernels, "DZ_CHUNK_BYTES", 4 * 4 * 6 * 5 * 2)  # two images of dz
    monkeypatch.setattr(conv_kernels, "_wgrad_splits", lambda m, tiles, groups, device: 2)
    calls = []
    chunked = conv_kernels._conv2d_backward_chunked
    monkeypatch.setattr(conv_kernels, "_conv2d_backward_chunked",
                        lambda *args: calls.append(args[-1]) or chunked(*args))
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 3, 6, 5).to(memory_format=CL), torch.randn(4, 3, 3, 3) / 5, torch.randn(4)
    _conv_pair(x, w, b, activation, padding=1)
    assert calls == [3]


@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_depthwise_input_gradient(stride):
    """C_in / groups = 1, multiplier 1 (MobileNet's depthwise layer), channels_last: dx comes from
    the depthwise dgrad kernel (CUDA cores, no GEMM), not the implicit GEMM."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 6).to(memory_format=CL)
    w, b = torch.randn(5, 1, 3, 3) / 3, torch.randn(5)
    with recording_launches() as launches:
        _conv_pair(x, w, b, "relu", stride=stride, padding=1, groups=5)
    assert "_conv2d_dgrad_depthwise_kernel" in launches.kernels() and "_conv2d_dgrad_kernel" not in launches.kernels()


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's own wgrad tile; a GPU autotunes over WGRAD_TILES")
def test_weight_gradient_runs_the_interpreter_tile_and_keeps_the_gpu_candidates():
    """Under the interpreter wgrad runs WGRAD_INTERPRETER_TILE (channels by a long K step), not the
    GPU's first tile; the autotuner's candidates are still WGRAD_TILES, each checked by the tuning cases."""
    from gpudl.kernels import conv2d_triton
    from gpudl.kernels._common import tuning_candidates

    x, w = torch.randn(2, 4, 9, 9), torch.randn(8, 4, 3, 3)
    with recording_launches() as launches:
        _conv_pair(x, w, None, "relu", padding=1)
    (run,) = launches.of("_conv2d_wgrad_kernel")
    tile = conv2d_triton.WGRAD_INTERPRETER_TILE.kwargs
    assert {k: run[k] for k in tile} == tile
    assert tuning_candidates(conv2d_triton._conv2d_wgrad_kernel) == conv2d_triton.WGRAD_TILES
    assert conv2d_triton.WGRAD_INTERPRETER_TILE not in conv2d_triton.WGRAD_TILES
