"""Fused softmax cross-entropy (kernels in kernels/cross_entropy_triton.py): the launcher, the
custom op with its fake and autograd, and the entry `cross_entropy`.

    cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)

One launch writes the loss and the saved gradient of the unreduced losses; backward multiplies
the saved gradient by grad_output (and by 1 / sum of weights for 'mean', PyTorch's weighted mean;
nan when every row is ignored, with zero gradients); it never recomputes the softmax. A target
outside [0, C) that is not ignore_index raises IndexError for CPU tensors (as PyTorch); on a GPU
its row's loss and gradient are NaN. Class-probability targets and inputs with extra dims
[N, C, d...] are `unsupported` (gpudl.ops runs the PyTorch reference, warning once).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import REDUCE_BLOCK, acc_dtype, tl_acc
from gpudl.kernels.cross_entropy_triton import _ce_finalize_kernel, _ce_fwd_kernel, block_sizes
from gpudl.kernels.registry import kernel_op, no_tensor


# --------------------------------------------------------------------------- host launcher
def cross_entropy_forward(x, y, weight, ignore_index: int, reduction: str, smoothing: float, grad: bool):
    """x [N, C] (unit stride along C), y [N] int64. Returns (loss, saved gradient [N, C] or None,
    scale for backward: a 0-d tensor for 'mean' (1 / sum of weights), else None)."""
    n_rows, n_classes = x.shape
    g = torch.empty((n_rows, n_classes), dtype=x.dtype, device=x.device) if grad else None
    if n_rows == 0:  # PyTorch: none -> empty, mean -> nan, sum -> 0; nothing to launch
        loss = x.new_empty(0) if reduction == "none" else x.new_full((), math.nan if reduction == "mean" else 0.0)
        return loss, g, (x.new_zeros((), dtype=acc_dtype(x.dtype)) if reduction == "mean" else None)
    block_n, block_c, num_warps = block_sizes(n_classes)
    programs = triton.cdiv(n_rows, block_n)
    if reduction == "none":
        out = x.new_empty(n_rows)
    else:  # per program: its loss partial sum, and its weight partial sum after all of them
        out = torch.empty(2 * programs, dtype=acc_dtype(x.dtype), device=x.device)
    wrap_triton(_ce_fwd_kernel)[(programs,)](
        x, y, weight if weight is not None else x, out, g if g is not None else x,
        n_rows, n_classes, x.stride(0), ignore_index, smoothing,
        HAS_WEIGHT=weight is not None, SMOOTHING=smoothing > 0.0, REDUCTION=reduction, GRAD=grad,
        ACC=tl_acc(x.dtype), BLOCK_N=block_n, BLOCK_C=block_c, SINGLE_CHUNK=n_classes <= block_c, num_warps=num_warps,
    )
    if reduction == "none":
        return out, g, None
    loss = torch.empty((), dtype=x.dtype, device=x.device)
    scale = torch.empty((), dtype=acc_dtype(x.dtype), device=x.device)
    wrap_triton(_ce_finalize_kernel)[(1,)](out, loss, scale, programs, MEAN=reduction == "mean", BLOCK=REDUCE_BLOCK,
                                           num_warps=4)
    return loss, g, (scale if reduction == "mean" else None)


# --------------------------------------------------------------------------- custom op
@kernel_op("cross_entropy")
def _cross_entropy_op(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                      label_smoothing: float, grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """input [N, C], target [N] int64. Returns (loss, saved gradient [N, C] of the unreduced
    losses, 1 / sum of weights for 'mean' as a 0-d tensor); the last two empty when not needed."""
    if input.device.type == "cpu":  # free to check here; on a GPU it would cost a sync (the kernel writes NaN)
        out_of_range = (target != ignore_index) & ((target < 0) | (target >= input.shape[1]))
        if out_of_range.any():
            raise IndexError(f"cross_entropy: target {target[out_of_range][0].item()} is out of bounds for "
                             f"{input.shape[1]} classes")
    x = input if input.stride(1) == 1 else input.contiguous()
    loss, g, scale = cross_entropy_forward(x, target.contiguous(), weight.contiguous() if weight is not None else None,
                                           ignore_index, reduction, label_smoothing, grad)
    return loss, (g if g is not None else no_tensor(x)), (scale if scale is not None else no_tensor(x))


@_cross_entropy_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, grad):
    n_rows, n_classes = input.shape
    loss = input.new_empty(n_rows if reduction == "none" else ())
    scale = input.new_empty((), dtype=acc_dtype(input.dtype)) if reduction == "mean" else input.new_empty(0)
    return loss, input.new_empty((n_rows, n_classes) if grad else 0), scale


def _setup_cross_entropy(ctx, inputs, output):
    _, g, scale = output
    ctx.save_for_backward(g, scale)
    ctx.reduction = inputs[4]
    ctx.mark_non_differentiable(g, scale)
    ctx.set_materialize_grads(False)


def _cross_entropy_backward(ctx, grad_loss, _grad_g, _grad_scale):
    g, scale = ctx.saved_tensors
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None,) * 7
    if ctx.reduction == "none":
        grad = g * grad_loss[:, None]
    elif ctx.reduction == "mean":
        grad = g * (grad_loss * scale).to(g.dtype)
    else:
        grad = g * grad_loss
    return (grad,) + (None,) * 6


_cross_entropy_op.register_autograd(_cross_entropy_backward, setup_context=_setup_cross_entropy)


def unsupported(input, target, weight, ignore_index, reduction, label_smoothing):
    if target.is_floating_point():
        return "class-probability targets have no Triton kernel (int64 class indices do)"
    if input.dim() > 2:
        return f"inputs with extra dims [N, C, d...] (got {input.dim()}-D) have no Triton kernel"
    if input.shape[-1] == 0:
        return "zero classes"
    return None


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing):
    """input [N, C] or [C] logits; target [N] or [] int64 class indices; weight [C] or None;
    ignore_index int; reduction 'none' | 'mean' | 'sum'; label_smoothing float in [0, 1].
    Returns [N] ([] for 1-D input) for 'none', else a 0-d tensor, in input's dtype."""
    if weight is not None and weight.requires_grad:
        raise ValueError("cross_entropy is not differentiable with respect to weight (as in PyTorch), "
                         "but weight requires grad; pass weight.detach()")
    one_row = input.dim() == 1
    x = input.unsqueeze(0) if one_row else input
    y = target.reshape(1) if one_row else target
    grad = torch.is_grad_enabled() and input.requires_grad
    loss = torch.ops.gpudl.cross_entropy(x, y, weight, int(ignore_index), reduction, float(label_smoothing), grad)[0]
    return loss.reshape(()) if one_row and reduction == "none" else loss
