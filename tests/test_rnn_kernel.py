"""gpudl.ops.rnn's Triton path beyond the registry harness: the drop-in gpudl.nn.RNN against
torch.nn.RNN, layouts, empty shapes, the fallback, backend selection.

On the CPU the kernels run through the Triton interpreter (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_all_close, leaf

import gpudl
from gpudl import nn as gnn
from gpudl import ops, reference
from gpudl.kernels import rnn as rnn_kernel
from gpudl.kernels import rnn_triton


@pytest.mark.parametrize("nonlinearity,batch_first", [("tanh", False), ("relu", True)])
def test_gpudl_nn_rnn_loads_torch_state_dict_and_matches(nonlinearity, batch_first, device):
    """2 layers, bidirectional: every layer and direction is one ops.rnn call (the reverse
    direction sees a flipped input, and the layer's output is a concatenation, so the BPTT kernel
    also gets strided output gradients)."""
    torch.manual_seed(0)
    kwargs = dict(input_size=6, hidden_size=20, num_layers=2, nonlinearity=nonlinearity, bidirectional=True,
                  batch_first=batch_first)
    ref = torch.nn.RNN(**kwargs).to(device)
    ours = gnn.RNN(**kwargs).to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn((3, 7, 6) if batch_first else (7, 3, 6), device=device)
    hx = torch.randn(4, 3, 20, device=device)
    xa, ha, xb, hb = leaf(x), leaf(hx), leaf(x), leaf(hx)
    with gpudl.use_backend("triton"):
        out, h_n = ours(xa, ha)
    assert out.grad_fn is not None
    want_out, want_h = ref(xb, hb)
    assert_all_close([out, h_n], [want_out, want_h])
    g_out, g_h = torch.randn_like(want_out), torch.randn_like(want_h)
    (out * g_out).sum().add_((h_n * g_h).sum()).backward()
    (want_out * g_out).sum().add_((want_h * g_h).sum()).backward()
    assert_all_close([xa.grad, ha.grad] + [p.grad for p in ours.parameters()],
             [xb.grad, hb.grad] + [p.grad for p in ref.parameters()])


def test_triton_backend_runs_the_kernel_and_torch_backend_does_not(device):
    torch.manual_seed(0)
    args = [torch.randn(4, 2, 5, device=device), torch.randn(2, 16, device=device),
            torch.randn(16, 5, device=device), torch.randn(16, 16, device=device)]
    args = [leaf(a) for a in args]
    with gpudl.use_backend("triton"):
        out, _ = ops.rnn(*args)
    assert "gpudl_rnn_recurrence" in out.grad_fn.name()
    # the input projection runs inside the recurrence's op: it takes the input and W_ih themselves
    input_fn, _, weight_ih_fn, _ = [fn for fn, _ in out.grad_fn.next_functions]
    assert "AccumulateGrad" in input_fn.name() and "AccumulateGrad" in weight_ih_fn.name()
    with gpudl.use_backend("torch"):
        out_ref, _ = ops.rnn(*args)
    assert "gpudl_rnn_recurrence" not in out_ref.grad_fn.name()
    assert_all_close([out], [out_ref])


def test_relu_chunked_path_with_default_init(device):
    """H=100 (BLOCK_H 128: W_hh streamed in chunks) with torch.nn.RNN's own init, fp32, every grad."""
    torch.manual_seed(1)
    layer = torch.nn.RNN(9, 100, nonlinearity="relu").to(device)
    x, hx = torch.randn(6, 20, 9, device=device), torch.randn(20, 100, device=device)
    params = [layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0]
    ours = [leaf(t) for t in [x, hx] + params]
    theirs = [leaf(t) for t in [x, hx] + params]
    with gpudl.use_backend("triton"):
        out, h_n = ops.rnn(*ours, nonlinearity="relu")
    want_out, want_h = reference.rnn(*theirs, "relu", False)
    assert_all_close([out, h_n], [want_out, want_h])
    g = torch.randn_like(want_out)
    torch.autograd.backward([out, h_n], [g, torch.ones_like(h_n)])
    torch.autograd.backward([want_out, want_h], [g, torch.ones_like(want_h)])
    assert_all_close([t.grad for t in ours], [t.grad for t in theirs])


def test_non_contiguous_inputs_and_unbatched(device):
    torch.manual_seed(0)
    big_h = torch.randn(3, 40, device=device)
    x = torch.randn(5, 3, 8, device=device).transpose(0, 1).contiguous().transpose(0, 1)  # strided time-major view
    hx = big_h[:, ::2]  # [3, 20], row stride 40, column stride 2
    w_ih = torch.randn(8, 20, device=device).t()  # [20, 8], transposed storage
    w_hh = 0.2 * torch.randn(20, 20, device=device).t()
    b = torch.randn(20, device=device)
    ours = [leaf(t) for t in (x, hx, w_ih, w_hh, b, b)]
    theirs = [leaf(t) for t in (x, hx, w_ih, w_hh, b, b)]
    with gpudl.use_backend("triton"):
        out, h_n = ops.rnn(*ours)
    want_out, want_h = reference.rnn(*theirs, "tanh", False)
    assert_all_close([out, h_n], [want_out, want_h])
    out[:, :, ::3].sum().backward()  # a strided output gradient
    want_out[:, :, ::3].sum().backward()
    assert_all_close([t.grad for t in ours], [t.grad for t in theirs])

    with gpudl.use_backend("triton"):
        out1, h1 = ops.rnn(x[:, 0], hx[0], w_ih, w_hh, b, b)  # unbatched: [L, H_in], hx [H]
    assert out1.shape == (5, 20) and h1.shape == (20,)
    assert_all_close([out1, h1], [want_out[:, 0], want_h[0]])


def test_only_h_n_used_and_partial_grads(device):
    """The output's gradient arrives as zeros; only W_hh and hx require grad."""
    torch.manual_seed(0)
    x, w_ih = torch.randn(6, 2, 4, device=device), torch.randn(16, 4, device=device)
    hx, w_hh = leaf(torch.randn(2, 16, device=device)), leaf(0.3 * torch.randn(16, 16, device=device))
    hx2, w_hh2 = leaf(hx), leaf(w_hh)
    with gpudl.use_backend("triton"):
        _, h_n = ops.rnn(x, hx, w_ih, w_hh, None, None)
    _, want = reference.rnn(x, hx2, w_ih, w_hh2, None, None, "tanh", False)
    h_n.sum().backward()
    want.sum().backward()
    assert_all_close([h_n, hx.grad, w_hh.grad], [want, hx2.grad, w_hh2.grad])


def test_empty_batch_and_empty_sequence(device):
    torch.manual_seed(0)
    w_ih, w_hh = leaf(torch.randn(16, 3, device=device)), leaf(torch.randn(16, 16, device=device))
    with gpudl.use_backend("triton"):
        out, h_n = ops.rnn(torch.randn(4, 0, 3, device=device), None, w_ih, w_hh)
        assert out.shape == (4, 0, 16) and h_n.shape == (0, 16)
        out.sum().backward()
        assert w_hh.grad is not None and torch.equal(w_hh.grad, torch.zeros_like(w_hh))

        hx = leaf(torch.randn(2, 16, device=device))
        out, h_n = ops.rnn(torch.randn(2, 0, 3, device=device), hx, w_ih, w_hh, batch_first=True)
        assert out.shape == (2, 0, 16)
        torch.testing.assert_close(h_n, hx)
        h_n.sum().backward()
        torch.testing.assert_close(hx.grad, torch.ones_like(hx))


def test_hidden_size_beyond_the_kernel_falls_back_with_a_warning(device):
    torch.manual_seed(0)
    hidden = 513
    args = (torch.randn(2, 1, 3, device=device), torch.zeros(1, hidden, device=device),
            0.05 * torch.randn(hidden, 3, device=device), 0.05 * torch.randn(hidden, hidden, device=device))
    with gpudl.use_backend("triton"), pytest.warns(UserWarning, match="hidden size 513 > 512"):
        out, h_n = ops.rnn(*args)
    want_out, want_h = reference.rnn(*args, None, None, "tanh", False)
    assert_all_close([out, h_n], [want_out, want_h])
    with pytest.raises(ValueError, match="hidden size 513 > 512"):  # the kernel's own entry refuses it
        rnn_kernel.rnn(*args, None, None, "tanh", False)


def test_double_backward_raises(device):
    x = leaf(torch.randn(3, 2, 4, device=device))
    with gpudl.use_backend("triton"):
        out, _ = ops.rnn(x, None, torch.randn(16, 4, device=device), torch.randn(16, 16, device=device))
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


# --------------------------------------------------------------------------- memory of the backward
class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op name, numel) of every tensor an aten op run inside it returns in new memory
    (views of its inputs are left out)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.calls.append((str(func), t.numel()))
        return out


def _saved_by(fn):
    """(result of fn(), the tensors autograd saved while it ran)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, saved


def _storages(tensors):
    return sorted(t.untyped_storage().data_ptr() for t in tensors)


@pytest.mark.parametrize("batch_first", [False, True])
def test_saved_tensors_are_the_output_and_the_operands(batch_first, device):
    """The triton path keeps for backward the output and the operands the gradients asked for need,
    nothing else: no input projection (it is computed inside the recurrence kernel) and no other
    sequence-sized tensor."""
    torch.manual_seed(0)
    length, batch, h_in, hidden = 5, 3, 4, 16
    x = leaf(torch.randn((batch, length, h_in) if batch_first else (length, batch, h_in), device=device))
    hx, w_ih, w_hh, b_ih, b_hh = (leaf(torch.randn(*shape, device=device)) for shape in
                                  ((batch, hidden), (hidden, h_in), (hidden, hidden), (hidden,), (hidden,)))
    with gpudl.use_backend("triton"):
        (out, _), saved = _saved_by(lambda: ops.rnn(x, hx, w_ih, w_hh, b_ih, b_hh, batch_first=batch_first))
    assert _storages(saved) == _storages([out, hx, w_hh, x, w_ih])
    # only W_hh needs a gradient: the output (act'), h0 (the state before step 0) and W_hh
    w_hh_only = leaf(w_hh)
    with gpudl.use_backend("triton"):
        (out, _), saved = _saved_by(lambda: ops.rnn(x.detach(), hx.detach(), w_ih.detach(), w_hh_only,
                                                    batch_first=batch_first))
    assert _storages(saved) == _storages([out, hx, w_hh_only])


@pytest.mark.parametrize("batch_first,window", [(False, 3), (True, 3), (True, None)])
def test_backward_allocates_no_sequence_sized_gradient(batch_first, window, device, monkeypatch):
    """BPTT runs in windows of window_steps steps: no tensor of the backward is [L, N, H], and the
    gradients match the reference across window boundaries (L = 17: windows of 3, the first of 2,
    as a longer window than fp32's own of 1 step; and fp32's). The dispatch mode sees the custom
    op's results (the host code's scratch, the window's dz, is counted by
    tests/test_estimate_memory.py)."""
    if window is not None:
        monkeypatch.setattr(rnn_kernel, "window_steps", lambda length, dtype: window)
    torch.manual_seed(0)
    length, batch, h_in, hidden = 17, 4, 3, 24
    shape = (batch, length, h_in) if batch_first else (length, batch, h_in)
    args = [torch.randn(shape, device=device), torch.randn(batch, hidden, device=device),
            0.3 * torch.randn(hidden, h_in, device=device), 0.2 * torch.randn(hidden, hidden, device=device),
            torch.randn(hidden, device=device), torch.randn(hidden, device=device)]
    ours, theirs = [leaf(a) for a in args], [leaf(a) for a in args]
    with gpudl.use_backend("triton"):
        out, h_n = ops.rnn(*ours, batch_first=batch_first)
    want_out, want_h = reference.rnn(*theirs, "tanh", batch_first)
    g = torch.randn_like(want_out)
    with _Allocations() as allocations:
        torch.autograd.backward([out, h_n], [g, torch.ones_like(h_n)])
    torch.autograd.backward([want_out, want_h], [g, torch.ones_like(want_h)])
    assert_all_close([t.grad for t in ours], [t.grad for t in theirs])
    largest = max(length * batch * h_in, hidden * hidden)  # dx, grad W_hh
    big = [call for call in allocations.calls if call[1] > largest]
    assert not big, f"sequence-sized tensors in the backward: {big}"
    assert rnn_triton.window_steps(length, torch.float32) == 1
    assert rnn_triton.window_steps(length, torch.bfloat16) == 2 and rnn_triton.window_steps(1, torch.bfloat16) == 1
