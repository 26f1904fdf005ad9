"""Fused binary cross-entropy on logits, and the two GAN losses built from it.

    binary_cross_entropy_with_logits(input, target, weight, reduction, pos_weight)
    gan_discriminator_loss(real_logits, fake_logits)   mean softplus(-real) + mean softplus(fake)
    gan_generator_loss(fake_logits)                     mean softplus(-fake)  (non-saturating)

Kernels in kernels/bce_triton.py; this file holds the launchers, the custom ops with their
fakes and autograd, and the entries. One kernel launch computes the loss (per element, or one
partial sum per program) together with d loss / d input (and d loss / d target when the target
requires grad). The gradients are saved, so backward is a single multiply by grad_output.
Reductions are deterministic: every program writes its partial sum, and a one-program kernel adds
the partials in a fixed order (no atomics).

The loss and gradient formulas, and why they are exact for any logit, are in bce_triton.py's docstring.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import INT32_LIMIT, acc_dtype, empty_reduction, sum_partials, tl_acc
from gpudl.kernels.bce_triton import (
    BLOCK,
    NUM_WARPS,
    TILED_MAX_BLOCK_C,
    _bce_fwd_kernel,
    _bce_tiled_kernel,
    _softplus_means_kernel,
)
from gpudl.kernels.registry import kernel_op, no_tensor


# --------------------------------------------------------------------------- host launchers
def _broadcast_view(t: torch.Tensor | None, shape: torch.Size):
    """How a kernel reads `t` broadcast to the contiguous `shape`: (mode, tensor, sizes, strides).

    The expanded view is coalesced (adjacent dims merged where their strides allow), so common
    cases (full shape, per-class [C], per-row [N, 1], scalar) need no copy. More than three
    coalesced dims is materialized with expand().contiguous()."""
    if t is None:
        return "absent", None, (1, 1), (0, 0, 0)
    dims = []
    for size, stride in zip(shape, t.expand(shape).stride()):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if len(dims) == 1 and dims[0][1] == 1:
        return "same", t, (1, 1), (0, 0, 0)
    if len(dims) > 3:
        return "same", t.expand(shape).contiguous(), (1, 1), (0, 0, 0)
    dims = [(1, 0)] * (3 - len(dims)) + dims
    return "strided", t, (dims[1][0], dims[2][0]), tuple(d[1] for d in dims)


def _tiled_view(t: torch.Tensor | None, shape: torch.Size):
    """How the tiled kernel reads `t` broadcast to the contiguous `shape` seen as [rows, last dim]:
    (mode, tensor, (size1, s0, s1, s_col)), or None when t varies with both the row and the last
    dim other than in the input's own layout (the flat kernel reads it per element then)."""
    if t is None:
        return "absent", None, (1, 0, 0, 0)
    expanded = t.expand(shape)
    s_col = expanded.stride(-1) if shape[-1] > 1 else 0
    lead = []  # the leading dims, coalesced
    for size, stride in zip(shape[:-1], expanded.stride()[:-1]):
        if size == 1:
            continue
        if lead and lead[-1][1] == stride * size:
            lead[-1] = (lead[-1][0] * size, stride)
        else:
            lead.append((size, stride))
    if all(stride == 0 for _, stride in lead):
        return "col", t, (1, 0, 0, s_col)
    if s_col == 0 and len(lead) <= 2:
        (_, s0), (size1, s1) = [(1, 0)] * (2 - len(lead)) + lead
        return "row", t, (size1, s0, s1, 0)
    if expanded.is_contiguous():
        return "same", t, (1, 0, 0, 0)
    return None


def _bce_tiled(x, t, weight, pos_weight, reduction, gx, gt, grad_x, grad_t):
    """The tiled launch for weights broadcast per row or per class; None when it does not apply."""
    if x.dim() == 0:
        return None
    w_view, pw_view = _tiled_view(weight, x.shape), _tiled_view(pos_weight, x.shape)
    if w_view is None or pw_view is None or {w_view[0], pw_view[0]}.isdisjoint({"row", "col"}):
        return None
    (w_mode, w, w_args), (pw_mode, pw, pw_args) = w_view, pw_view
    n, n_cols = x.numel(), x.shape[-1]
    block_c = min(triton.next_power_of_2(n_cols), TILED_MAX_BLOCK_C)
    block_r = max(1, BLOCK // block_c)
    programs = triton.cdiv(n // n_cols, block_r) * triton.cdiv(n_cols, block_c)
    out = torch.empty_like(x) if reduction == "none" else torch.empty(programs, dtype=acc_dtype(x.dtype),
                                                                      device=x.device)
    wrap_triton(_bce_tiled_kernel)[(programs,)](
        x, t, w if w is not None else x, pw if pw is not None else x, out,
        gx if gx is not None else x, gt if gt is not None else x, n // n_cols, n_cols, n, *w_args, *pw_args,
        W_MODE=w_mode, PW_MODE=pw_mode, REDUCTION=reduction, GRAD_X=grad_x, GRAD_T=grad_t, ACC=tl_acc(x.dtype),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS,
    )
    return out


def bce_forward(x, t, weight, pos_weight, reduction: str, grad_x: bool, grad_t: bool):
    """Launch the fused kernel. x, t contiguous [n...]; returns (loss, saved grad_x or None,
    saved grad_t or None), the saved gradients already scaled by 1/n for 'mean'."""
    n = x.numel()
    gx = torch.empty_like(x) if grad_x else None
    gt = torch.empty_like(t) if grad_t else None
    if n == 0:  # PyTorch: none -> empty, mean -> nan, sum -> 0; nothing to launch
        loss = torch.empty_like(x) if reduction == "none" else empty_reduction(reduction, x)
        return loss, gx, gt
    # Weights broadcast per row or per class: the tiled kernel loads each once per tile row/column.
    out = _bce_tiled(x, t, weight, pos_weight, reduction, gx, gt, grad_x, grad_t)
    if out is not None:
        loss = out if reduction == "none" else sum_partials(out, x.dtype, n if reduction == "mean" else None)
        return loss, gx, gt
    w_mode, w, w_sizes, w_strides = _broadcast_view(weight, x.shape)
    pw_mode, pw, pw_sizes, pw_strides = _broadcast_view(pos_weight, x.shape)
    programs = triton.cdiv(n, BLOCK)
    if reduction == "none":
        out = torch.empty_like(x)
    else:  # one partial sum per program
        out = torch.empty(programs, dtype=acc_dtype(x.dtype), device=x.device)
    wrap_triton(_bce_fwd_kernel)[(programs,)](
        x, t, w if w is not None else x, pw if pw is not None else x, out,
        gx if gx is not None else x, gt if gt is not None else x, n,
        *w_sizes, *w_strides, *pw_sizes, *pw_strides,
        W_MODE=w_mode, PW_MODE=pw_mode, REDUCTION=reduction, GRAD_X=grad_x, GRAD_T=grad_t,
        ACC=tl_acc(x.dtype), INDEX_64=n > INT32_LIMIT - BLOCK, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    loss = out if reduction == "none" else sum_partials(out, x.dtype, n if reduction == "mean" else None)
    return loss, gx, gt


def softplus_means_forward(neg, pos, grad_neg: bool, grad_pos: bool):
    """mean softplus(-neg) + mean softplus(pos) (pos may be None) in one launch, plus saved grads."""
    n_neg, n_pos = neg.numel(), (pos.numel() if pos is not None else 0)
    gneg = torch.empty_like(neg) if grad_neg else None
    gpos = torch.empty_like(pos) if grad_pos else None
    neg_programs, pos_programs = triton.cdiv(n_neg, BLOCK), triton.cdiv(n_pos, BLOCK)
    if neg_programs + pos_programs == 0:
        return empty_reduction("mean", neg), gneg, gpos
    partials = torch.empty(neg_programs + pos_programs, dtype=acc_dtype(neg.dtype), device=neg.device)
    wrap_triton(_softplus_means_kernel)[(neg_programs + pos_programs,)](
        neg, pos if pos is not None else neg, partials,
        gneg if gneg is not None else neg, gpos if gpos is not None else neg,
        n_neg, n_pos, neg_programs, GRAD_NEG=grad_neg, GRAD_POS=grad_pos, ACC=tl_acc(neg.dtype),
        INDEX_64=max(n_neg, n_pos) > INT32_LIMIT - BLOCK, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    loss = sum_partials(partials, neg.dtype)
    if n_neg == 0 or (pos is not None and n_pos == 0):
        loss = loss + math.nan  # the mean of an empty half is nan, as in PyTorch
    return loss, gneg, gpos


# --------------------------------------------------------------------------- custom ops
def _save_grads(ctx, inputs, output):
    """Autograd of a loss op whose outputs are (loss, saved d/d first input, saved d/d second)."""
    loss, g_first, g_second = output
    ctx.save_for_backward(g_first, g_second)
    ctx.mark_non_differentiable(g_first, g_second)
    ctx.set_materialize_grads(False)


def _scale_saved(ctx, grad_loss, _g_first, _g_second):
    g_first, g_second = ctx.saved_tensors
    need_first, need_second = ctx.needs_input_grad[:2]
    if grad_loss is None:
        return (None,) * len(ctx.needs_input_grad)
    # 'none': grad_loss has the input's shape; otherwise it is a 0-d tensor (no host sync).
    return (g_first * grad_loss if need_first else None, g_second * grad_loss if need_second else None,
            *(None,) * (len(ctx.needs_input_grad) - 2))


@kernel_op("binary_cross_entropy_with_logits")
def _bce_op(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor], reduction: str,
            grad_input: bool, grad_target: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, saved d loss / d input, saved d loss / d target): the saved gradients are empty
    tensors unless asked for, and already scaled by 1/n for 'mean'."""
    x, t = input.contiguous(), target.contiguous()
    loss, gx, gt = bce_forward(x, t, weight, pos_weight, reduction, grad_input, grad_target)
    return loss, (gx if gx is not None else no_tensor(x)), (gt if gt is not None else no_tensor(x))


@_bce_op.register_fake
def _(input, target, weight, pos_weight, reduction, grad_input, grad_target):
    loss = input.new_empty(input.shape if reduction == "none" else ())
    return (loss, input.new_empty(input.shape if grad_input else 0),
            target.new_empty(target.shape if grad_target else 0))


_bce_op.register_autograd(_scale_saved, setup_context=_save_grads)


@kernel_op("softplus_means")
def _softplus_means_op(neg: Tensor, pos: Optional[Tensor], grad_neg: bool,
                       grad_pos: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(mean softplus(-neg) + mean softplus(pos) (pos may be None), saved d/d neg, saved d/d pos):
    both GAN losses, each in one launch."""
    neg = neg.contiguous()
    pos = pos.contiguous() if pos is not None else None
    loss, gneg, gpos = softplus_means_forward(neg, pos, grad_neg, grad_pos)
    return loss, (gneg if gneg is not None else no_tensor(neg)), (gpos if gpos is not None else no_tensor(neg))


@_softplus_means_op.register_fake
def _(neg, pos, grad_neg, grad_pos):
    return (neg.new_empty(()), neg.new_empty(neg.shape if grad_neg else 0),
            neg.new_empty(pos.shape if grad_pos else 0))


_softplus_means_op.register_autograd(_scale_saved, setup_context=_save_grads)


def _needs_grad(t: torch.Tensor | None) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


# --------------------------------------------------------------------------- public entries
def binary_cross_entropy_with_logits(input, target, weight, reduction, pos_weight):
    """input, target [*] (same shape and dtype); weight broadcastable to [*]; pos_weight
    broadcastable to [*] (one value per class along the last dim); reduction 'none' | 'mean' |
    'sum'. Returns [*] for 'none', else a 0-d tensor, in input's dtype."""
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is not None and t.requires_grad:
            raise ValueError(f"binary_cross_entropy_with_logits is not differentiable with respect to {name} "
                             f"(as in PyTorch), but {name} requires grad; pass {name}.detach()")
    return torch.ops.gpudl.binary_cross_entropy_with_logits(
        input, target, weight, pos_weight, reduction, _needs_grad(input), _needs_grad(target))[0]


def gan_discriminator_loss(real_logits, fake_logits):
    """real_logits [*], fake_logits [**] (any shapes, same dtype). Returns a 0-d tensor:
    mean softplus(-real) + mean softplus(fake), both halves in one launch."""
    needs = _needs_grad(real_logits), _needs_grad(fake_logits)
    return torch.ops.gpudl.softplus_means(real_logits, fake_logits, *needs)[0]


def gan_generator_loss(fake_logits):
    """fake_logits [*]. Returns a 0-d tensor: mean softplus(-fake)."""
    return torch.ops.gpudl.softplus_means(fake_logits, None, _needs_grad(fake_logits), False)[0]
