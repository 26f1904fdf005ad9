"""Optimizers whose update runs as one fused kernel per parameter group.

`SGD` has torch.optim.SGD's constructor, maths and state ('momentum_buffer' per parameter), so
state_dicts move between the two both ways. Each `step()` hands every parameter of a group to
`gpudl.ops.sgd_step`, which runs the multi-tensor Triton kernel (kernels/sgd.py: one launch per
device and dtype) or, on the torch backend, torch.optim's own functional SGD (gpudl.reference.sgd_step).
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from gpudl import ops
from gpudl.ops import check_sgd_hyperparameters


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
            # Sharded parameters (FSDP2's DTensors): the update is elementwise, so each process
            # steps its own shards; the momentum state stays a DTensor with the parameter's sharding.
            _, new_buffers = ops.sgd_step(
                [_local(p) for p in params], [_local(g) for g in grads], [_local(b) for b in buffers],
                lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                weight_decay=group["weight_decay"], nesterov=group["nesterov"], maximize=group["maximize"],
            )
            if group["momentum"] != 0:
                for p, old, new in zip(params, buffers, new_buffers):
                    # An existing buffer was updated in place; a first step's new one is wrapped.
                    self.state[p]["momentum_buffer"] = old if old is not None else _like(p, new)
        return loss


def _is_dtensor(t) -> bool:
    if t is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t):
    """A DTensor's local shard (sharing its storage, so in-place updates land in the DTensor)."""
    return t.to_local() if _is_dtensor(t) else t


def _like(param, local):
    """`local` as a DTensor sharded like `param` when param is one, else unchanged."""
    if not _is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())
