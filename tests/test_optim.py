"""gpudl.optim.SGD against torch.optim.SGD: training trajectories, state_dicts, validation.

On the CPU the Triton path runs through the interpreter (tests/conftest.py), under
gpudl.use_backend("triton"); on a GPU the same tests run the compiled kernel.
"""

from __future__ import annotations

import pytest
import torch

import gpudl
from gpudl import ops
from gpudl.optim import SGD


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def _mlp(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).to(device)


def _train(model, opt, data, steps, start=0):
    x, y = (t.to(next(model.parameters()).device) for t in data)
    for s in range(start, start + steps):
        i = (s * 128) % (len(x) - 128)  # fixed mini-batch order: both runs see the same batches
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[i : i + 128]), y[i : i + 128])
        loss.backward()
        opt.step()
    return loss.item()


def _max_rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(a.parameters(), b.parameters()))


SETTINGS = {
    "plain": dict(lr=0.1),
    "momentum-dampening-wd": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    "nesterov-wd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "maximize-momentum": dict(lr=0.01, momentum=0.5, maximize=True),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_200_steps_match_torch_sgd(name, digits, device):
    kwargs = SETTINGS[name]
    ours, ref = _mlp(device), _mlp(device)
    with gpudl.use_backend("triton"):
        loss = _train(ours, SGD(ours.parameters(), **kwargs), digits, 200)
    ref_loss = _train(ref, torch.optim.SGD(ref.parameters(), **kwargs), digits, 200)
    assert _max_rel_diff(ours, ref) < 1e-6
    assert loss == pytest.approx(ref_loss, rel=1e-5)


def test_torch_backend_is_torch_sgd_exactly(digits, device):
    kwargs = SETTINGS["nesterov-wd"]
    ours, ref = _mlp(device), _mlp(device)
    with gpudl.use_backend("torch"):
        _train(ours, SGD(ours.parameters(), **kwargs), digits, 20)
    _train(ref, torch.optim.SGD(ref.parameters(), **kwargs), digits, 20)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_state_dict_round_trip_with_torch_sgd(digits, device):
    """Ours -> torch and torch -> ours mid-training, both equal to an uninterrupted torch run."""
    kwargs = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)
    full = _mlp(device)
    full_opt = torch.optim.SGD(full.parameters(), **kwargs)
    _train(full, full_opt, digits, 60)

    a = _mlp(device)
    a_opt = SGD(a.parameters(), **kwargs)
    with gpudl.use_backend("triton"):
        _train(a, a_opt, digits, 30)
    state = a_opt.state_dict()
    assert set(state["state"]) == {0, 1, 2, 3} and all(set(s) == {"momentum_buffer"} for s in state["state"].values())
    a_torch = torch.optim.SGD(a.parameters(), **kwargs)
    a_torch.load_state_dict(state)
    _train(a, a_torch, digits, 30, start=30)
    assert _max_rel_diff(a, full) < 1e-6

    b = _mlp(device)
    b_torch = torch.optim.SGD(b.parameters(), **kwargs)
    _train(b, b_torch, digits, 30)
    b_opt = SGD(b.parameters(), **kwargs)
    b_opt.load_state_dict(b_torch.state_dict())
    with gpudl.use_backend("triton"):
        _train(b, b_opt, digits, 30, start=30)
    assert _max_rel_diff(b, full) < 1e-6
    for key in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"):
        assert b_opt.param_groups[0][key] == b_torch.param_groups[0][key]


def test_params_without_grad_are_skipped_and_late_buffers_start_fresh(device):
    """A parameter with no grad is untouched; when it first gets one, its buffer starts at that
    grad while the others continue theirs, in the same launch, exactly as torch does."""
    torch.manual_seed(0)
    base = [torch.randn(7, 5, device=device), torch.randn(300, device=device)]
    ours = [p.clone().requires_grad_() for p in base]
    ref = [p.clone().requires_grad_() for p in base]
    opt, ref_opt = SGD(ours, lr=0.1, momentum=0.9), torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    grads = [
        [torch.randn(7, 5, device=device), None],
        [torch.randn(7, 5, device=device), torch.randn(300, device=device)],
    ]
    with gpudl.use_backend("triton"):
        for step_grads in grads:
            for params, o in ((ours, opt), (ref, ref_opt)):
                for p, g in zip(params, step_grads):
                    p.grad = None if g is None else g.clone()
                o.step()
            if step_grads[1] is None:
                assert torch.equal(ours[1], base[1]) and ours[1] not in opt.state
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(
            opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"], rtol=1e-6, atol=1e-6
        )


def test_mixed_dtypes_layouts_and_empty_tensors(device):
    """float32 and float64 parameters in one group (one launch each), a channels_last weight
    (dense, not contiguous), an empty tensor, and a transposed grad (torch path, warned)."""
    torch.manual_seed(0)
    shapes = [((4, 3, 5, 5), torch.float32), ((9,), torch.float64), ((0, 4), torch.float32), ((6, 8), torch.float32)]
    params = [torch.randn(s, dtype=d, device=device) for s, d in shapes]
    params[0] = params[0].to(memory_format=torch.channels_last)
    grads = [torch.randn_like(p) for p in params]
    grads[3] = torch.randn(8, 6, device=device).t()  # same shape as params[3], other strides
    buffers = [torch.randn_like(p) for p in params]
    from gpudl.reference import sgd_step as sgd_step_reference

    want_p, want_b = sgd_step_reference(params, grads, buffers, 0.1, 0.9, 0.0, 1e-2, True, False, False)
    with gpudl.use_backend("triton"), pytest.warns(UserWarning, match="other strides"):
        got_p, got_b = ops.sgd_step(params, grads, buffers, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    for i, (gp, wp, gb, wb) in enumerate(zip(got_p, want_p, got_b, want_b)):
        assert gp is params[i] and gb is buffers[i], "inplace=True must update the given tensors"
        tol = 1e-12 if gp.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(gp, wp, rtol=tol, atol=tol)
        torch.testing.assert_close(gb, wb, rtol=tol, atol=tol)
    assert params[0].is_contiguous(memory_format=torch.channels_last)


def test_sgd_step_not_inplace_leaves_inputs(device):
    params = [torch.randn(10, device=device)]
    grads = [torch.randn(10, device=device)]
    before = params[0].clone()
    with gpudl.use_backend("triton"):
        (new,), (buf,) = ops.sgd_step(params, grads, None, lr=0.5, momentum=0.9, inplace=False)
    assert torch.equal(params[0], before)
    torch.testing.assert_close(new, before - 0.5 * grads[0])
    torch.testing.assert_close(buf, grads[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-0.1),
        dict(lr=0.1, momentum=-0.5),
        dict(lr=0.1, weight_decay=-1e-4),
        dict(lr=0.1, nesterov=True),
        dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
        dict(lr=torch.tensor([0.1, 0.2])),
    ],
    ids=["lr", "momentum", "weight_decay", "nesterov-no-momentum", "nesterov-dampening", "tensor-lr"],
)
def test_constructor_validation_matches_torch(kwargs):
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError) as want:
        torch.optim.SGD(params, **kwargs)
    with pytest.raises(ValueError) as got:
        SGD(params, **kwargs)
    assert str(got.value) == str(want.value)


def test_constructor_rejects_torch_only_keywords():
    with pytest.raises(TypeError):
        SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, fused=True)


def test_sparse_grad_raises(device):
    emb = torch.nn.Embedding(10, 3, sparse=True).to(device)
    emb(torch.tensor([1, 2], device=device)).sum().backward()
    opt = SGD(emb.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()


def test_sgd_step_validation(device):
    p = [torch.zeros(3, device=device)]
    with pytest.raises(ValueError, match="one tensor per parameter"):
        ops.sgd_step(p, [], lr=0.1)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(4,\) but params\[0\] has shape \(3,\)"):
        ops.sgd_step(p, [torch.zeros(4, device=device)], lr=0.1)
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype torch.float64"):
        ops.sgd_step(p, [torch.zeros(3, dtype=torch.float64, device=device)], lr=0.1)
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\] has shape"):
        ops.sgd_step(p, [torch.zeros(3, device=device)], [torch.zeros(2, device=device)], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        ops.sgd_step(p, [torch.zeros(3, device=device)], lr=-1.0)
    with pytest.raises(TypeError, match="params and grads must be lists"):
        ops.sgd_step(p[0], p[0], lr=0.1)
    assert ops.sgd_step([], [], lr=0.1) == ([], [])


def test_closure_and_tensor_lr(device):
    p = torch.nn.Parameter(torch.ones(4, device=device))
    opt = SGD([p], lr=torch.tensor(0.25))

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    with gpudl.use_backend("triton"):
        loss = opt.step(closure)
    assert loss.item() == 4.0
    torch.testing.assert_close(p.detach(), torch.full((4,), 0.5, device=device))
