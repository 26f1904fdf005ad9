"""Mixed precision: inside torch.autocast every gpudl.ops function behaves as its
torch.nn.functional twin (the dtype it returns, and the values), on both backends; outside
autocast mismatched dtypes stay an error.

On the CPU the triton backend runs through the interpreter, whose bfloat16 arithmetic is not
faithful, so there the kernels are checked under float16 autocast (the casts and dtype flow are
the same); bfloat16 numerics of the kernels are checked on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gpudl
from gpudl import nn, ops
from gpudl.kernels import REGISTRY


def _f32(*shape, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).requires_grad_()


def _bf16_activation(*shape, device):
    """What autocast hands a loss: the output of a lower-precision op, still part of the graph."""
    x = _f32(*shape, device=device)
    return x, x.to(torch.bfloat16)


# name -> make(device) -> (tensors, gpudl call, twin call); both calls read the same tensors.
OPS = {
    "linear": lambda d: ((x := _f32(4, 7, device=d), w := _f32(5, 7, device=d), b := _f32(5, device=d)),
                         lambda: ops.linear(x, w, b, activation="relu"), lambda: F.relu(F.linear(x, w, b))),
    "conv2d": lambda d: ((x := _f32(2, 3, 6, 6, device=d), w := _f32(4, 3, 3, 3, device=d), b := _f32(4, device=d)),
                         lambda: ops.conv2d(x, w, b, padding=1), lambda: F.conv2d(x, w, b, padding=1)),
    "conv_transpose2d": lambda d: (
        (x := _f32(2, 4, 5, 5, device=d), w := _f32(4, 3, 4, 4, device=d), b := _f32(3, device=d)),
        lambda: ops.conv_transpose2d(x, w, b, stride=2, padding=1),
        lambda: F.conv_transpose2d(x, w, b, stride=2, padding=1)),
    "scaled_dot_product_attention": lambda d: (
        (q := _f32(2, 2, 5, 8, device=d), k := _f32(2, 2, 6, 8, device=d), v := _f32(2, 2, 6, 8, device=d)),
        lambda: ops.scaled_dot_product_attention(q, k, v), lambda: F.scaled_dot_product_attention(q, k, v)),
    "max_pool2d_after_conv2d": lambda d: (
        (x := _f32(2, 3, 6, 6, device=d), w := _f32(4, 3, 3, 3, device=d)),
        lambda: ops.max_pool2d(ops.conv2d(x, w), 2), lambda: F.max_pool2d(F.conv2d(x, w), 2)),
    "layer_norm": lambda d: ((x := _f32(4, 6, device=d), w := _f32(6, device=d), b := _f32(6, device=d),
                              a := _f32(6, 4, device=d)),
                             lambda: ops.layer_norm(ops.linear(x, a.t()), (4,), w[:4], b[:4]),
                             lambda: F.layer_norm(F.linear(x, a.t()), (4,), w[:4], b[:4])),
    "cross_entropy": lambda d: ((x := _f32(6, 5, device=d), w := _f32(5, 5, device=d)),
                                lambda: ops.cross_entropy(ops.linear(x, w), torch.arange(6, device=d) % 5),
                                lambda: F.cross_entropy(F.linear(x, w), torch.arange(6, device=d) % 5)),
    "mse_loss": lambda d: ((x := _f32(6, 5, device=d), w := _f32(5, 5, device=d), t := torch.randn(6, 5, device=d)),
                           lambda: ops.mse_loss(ops.linear(x, w), t), lambda: F.mse_loss(F.linear(x, w), t)),
    "binary_cross_entropy_with_logits": lambda d: (
        (x := _f32(6, 5, device=d), w := _f32(5, 5, device=d), t := torch.rand(6, 5, device=d)),
        lambda: ops.binary_cross_entropy_with_logits(ops.linear(x, w), t),
        lambda: F.binary_cross_entropy_with_logits(F.linear(x, w), t)),
    "gan_losses": lambda d: ((x := _f32(6, 5, device=d), w := _f32(1, 5, device=d)),
                             lambda: ops.gan_discriminator_loss(ops.linear(x, w), ops.linear(-x, w))
                             + ops.gan_generator_loss(ops.linear(x, w)),
                             lambda: F.softplus(-F.linear(x, w)).mean() + F.softplus(F.linear(-x, w)).mean()
                             + F.softplus(-F.linear(x, w)).mean()),
    "rnn": lambda d: ((x := _f32(5, 3, 4, device=d), h := _f32(3, 6, device=d), wi := _f32(6, 4, device=d),
                       wh := _f32(6, 6, device=d, scale=0.3)),
                      lambda: ops.rnn(x, h, wi, wh)[0],
                      lambda: torch._VF.rnn_tanh(x, h.unsqueeze(0), (wi, wh), False, 1, 0.0, False, False, False)[0]),
}


def _run(call, leaves):
    out = call()
    grads = torch.autograd.grad(out.float().sum(), leaves, allow_unused=True)
    return out, grads


# Half-precision results differ from the twin's by a few roundings of the half dtype.
TOLERANCE = {torch.bfloat16: dict(atol=5e-2, rtol=5e-2), torch.float16: dict(atol=5e-3, rtol=5e-3)}


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("backend,dtype", [("torch", torch.bfloat16), ("torch", torch.float16),
                                           ("triton", torch.float16)], ids=["torch-bf16", "torch-fp16", "triton-fp16"])
def test_op_under_autocast_matches_its_torch_twin(name, backend, dtype, device):
    if backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter's bfloat16 arithmetic is not faithful")
    torch.manual_seed(0)
    tensors, ours, twin = OPS[name](device)
    leaves = [t for t in tensors if t.requires_grad]
    with torch.autocast(device.type, dtype=dtype):
        with gpudl.use_backend(backend):
            got, got_grads = _run(ours, leaves)
        want, want_grads = _run(twin, leaves)
    assert got.dtype == want.dtype, f"{name}: returns {got.dtype} under autocast, its twin {want.dtype}"
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    for leaf, g, w in zip(leaves, got_grads, want_grads):
        assert (g is None) == (w is None)
        if w is not None:
            assert g.dtype == leaf.dtype == w.dtype, "gradients come back in each argument's own dtype"
            torch.testing.assert_close(g, w, **TOLERANCE[dtype])


class _CountGpudlOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.namespace == "gpudl"
        return func(*args, **(kwargs or {}))


def test_the_kernels_run_under_autocast(device):
    """Under autocast the triton backend still runs the kernels (on the cast tensors)."""
    torch.manual_seed(0)
    x, w = _f32(4, 8, device=device), _f32(3, 8, device=device)
    with torch.autocast(device.type, dtype=torch.float16), gpudl.use_backend("triton"), _CountGpudlOps() as counter:
        y = ops.linear(x, w)
        loss = ops.cross_entropy(y, torch.tensor([0, 1, 2, 0], device=device))
    assert y.dtype == torch.float16 and loss.dtype == torch.float32
    assert counter.count == 2


def test_modules_and_losses_from_the_issue_work_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(nn.Linear(8, 16), torch.nn.ReLU(), nn.Linear(16, 4))
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mlp(x).dtype == torch.bfloat16
        assert mha(x, x, x)[0].dtype == torch.bfloat16
        logits = nn.Linear(8, 1)(x)
        assert ops.binary_cross_entropy_with_logits(logits, torch.rand(2, 5, 1)).dtype == torch.float32
        assert ops.mse_loss(logits, torch.rand(2, 5, 1)).dtype == torch.float32


def test_mismatched_dtypes_outside_autocast_still_raise(device):
    x = torch.randn(4, 8, device=device, dtype=torch.bfloat16)
    w = torch.randn(3, 8, device=device)
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but input has dtype torch.bfloat16"):
        ops.linear(x, w)
    with pytest.raises(TypeError, match="target has dtype"):
        ops.mse_loss(x, torch.randn(4, 8, device=device))


def test_every_op_declares_an_autocast_class():
    for op in REGISTRY:
        classes = getattr(getattr(ops, op), "autocast_classes", None)
        assert classes is not None, f"gpudl.ops.{op} has no @autocast_class"
        assert set(classes) == {"cuda", "cpu"} and set(classes.values()) <= set(ops.AUTOCAST_CLASSES)
