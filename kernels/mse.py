"""Fused mean-squared error (kernel in kernels/mse_triton.py): the launcher, the custom op with its
fake and autograd, and the entry `mse_loss`.

    mse_loss(input, target, reduction)

One launch writes the loss and the saved gradient; 'mean' and 'sum' add the per-program partial
sums with _common.sum_partials's one-program kernel in a fixed order (no atomics). Backward
multiplies the saved gradient by grad_output; the target's gradient is its negation.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import INT32_LIMIT, acc_dtype, empty_reduction, sum_partials, tl_acc
from gpudl.kernels.mse_triton import BLOCK, NUM_WARPS, _mse_fwd_kernel
from gpudl.kernels.registry import kernel_op, no_tensor


def mse_forward(x, t, reduction: str, grad: bool):
    """x, t contiguous, same shape. Returns (loss, saved d loss / d x or None)."""
    n = x.numel()
    g = torch.empty_like(x) if grad else None
    if n == 0:  # PyTorch: none -> empty, mean -> nan, sum -> 0
        return (torch.empty_like(x) if reduction == "none" else empty_reduction(reduction, x)), g
    programs = triton.cdiv(n, BLOCK)
    if reduction == "none":
        out = torch.empty_like(x)
    else:  # one partial sum per program
        out = torch.empty(programs, dtype=acc_dtype(x.dtype), device=x.device)
    wrap_triton(_mse_fwd_kernel)[(programs,)](
        x, t, out, g if g is not None else x, n, REDUCTION=reduction, GRAD=grad, ACC=tl_acc(x.dtype),
        INDEX_64=n > INT32_LIMIT - BLOCK, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    if reduction == "none":
        return out, g
    return sum_partials(out, x.dtype, n if reduction == "mean" else None), g


# --------------------------------------------------------------------------- custom op
@kernel_op("mse_loss")
def _mse_op(input: Tensor, target: Tensor, reduction: str, grad: bool) -> tuple[Tensor, Tensor]:
    """(loss, saved d loss / d input, or an empty tensor when no gradient will be needed)."""
    x = input.contiguous()
    loss, g = mse_forward(x, target.contiguous(), reduction, grad)
    return loss, (g if g is not None else no_tensor(x))


@_mse_op.register_fake
def _(input, target, reduction, grad):
    return input.new_empty(input.shape if reduction == "none" else ()), input.new_empty(input.shape if grad else 0)


def _setup_mse(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _mse_backward(ctx, grad_loss, _grad_saved):
    (g,) = ctx.saved_tensors
    need_x, need_t = ctx.needs_input_grad[:2]
    if grad_loss is None:
        return None, None, None, None
    # The target's gradient is the input's, negated.
    return (g * grad_loss if need_x else None), (g * -grad_loss if need_t else None), None, None


_mse_op.register_autograd(_mse_backward, setup_context=_setup_mse)


def mse_loss(input, target, reduction):
    """input, target [*] (same shape and dtype); reduction 'none' | 'mean' | 'sum'.
    Returns [*] for 'none', else a 0-d tensor, in input's dtype."""
    grad = torch.is_grad_enabled() and (input.requires_grad or target.requires_grad)
    return torch.ops.gpudl.mse_loss(input, target, reduction, grad)[0]
