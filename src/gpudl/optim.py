"""Optimizers whose update runs as one fused kernel per parameter group.

`SGD` has torch.optim.SGD's constructor, maths and state ('momentum_buffer' per parameter), so
state_dicts move between the two both ways. Each `step()` hands every parameter of a group to
`gpudl.ops.sgd_step`, which runs the multi-tensor Triton kernel (kernels/sgd.py: one launch per
device and dtype) or, on the torch backend, torch.optim's own functional SGD.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _functional_sgd

from gpudl import ops


def sgd_step_reference(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, inplace):
    """The PyTorch path of `gpudl.ops.sgd_step` (and the oracle of the kernel): torch.optim's
    functional SGD. Same normalized arguments as the kernel entry; returns (params, buffers)."""
    params, grads = list(params), list(grads)
    buffers = list(momentum_buffers) if momentum != 0 else [None] * len(params)
    if not inplace:
        params = [p.detach().clone() for p in params]
        buffers = [None if b is None else b.clone() for b in buffers]
    # foreach=False when not in place: torch's foreach nesterov path adds into the grads themselves.
    _functional_sgd(
        params, grads, buffers, weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=dampening,
        nesterov=nesterov, maximize=maximize, foreach=None if inplace else False,
    )
    return params, buffers


def check_sgd_hyperparameters(lr, momentum, dampening, weight_decay, nesterov) -> None:
    """torch.optim.SGD's checks and messages, shared by SGD and gpudl.ops.sgd_step."""
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


class SGD(Optimizer):
    """Stochastic gradient descent (optionally with momentum, dampening, weight decay, Nesterov
    momentum, maximize), exactly torch.optim.SGD's update and arguments:

        g = -grad if maximize else grad;  g += weight_decay * p
        b = g on the first step, else momentum * b + (1 - dampening) * g
        g = g + momentum * b if nesterov else b
        p -= lr * g

    Every parameter of a group with a gradient is updated by one fused launch (per device and
    dtype) when the backend is Triton. Parameters without .grad are skipped; sparse gradients
    raise TypeError. lr may be a float or a 1-element tensor (read once per step).
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *, maximize=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        check_sgd_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(
                        f"gpudl.optim.SGD does not support sparse gradients (parameter of shape {tuple(p.shape)} "
                        "has a sparse .grad); use torch.optim.SGD or a dense embedding"
                    )
                params.append(p)
                grads.append(p.grad)
                # Like torch, state is only touched with momentum (so state_dicts stay identical).
                buffers.append(self.state[p].get("momentum_buffer") if group["momentum"] != 0 else None)
            if not params:
                continue
            _, new_buffers = ops.sgd_step(
                params, grads, buffers, lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                weight_decay=group["weight_decay"], nesterov=group["nesterov"], maximize=group["maximize"],
            )
            if group["momentum"] != 0:
                for p, b in zip(params, new_buffers):
                    self.state[p]["momentum_buffer"] = b
        return loss
