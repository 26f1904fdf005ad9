"""scaled_dot_product_attention on flash-attention kernels (kernels/attention_triton.py): the
launch path, the custom ops, their fakes and autograd, and the entry gpudl.ops calls.

Semantics of torch.nn.functional.scaled_dot_product_attention: causal masks are TOP-LEFT
aligned (query i sees keys j <= i, also when Lq != Lk); a bool mask keeps True entries; a float
mask is added to the scores; a query row whose every key is masked out gives a zero output row
and zero gradients, as PyTorch (2.5 and later) does for both bool and -inf float masks.

Shapes: query [B, H, Lq, D], key [B, H, Lk, D], value [B, H, Lk, D] (Dv == D), attn_mask None,
bool or float, expanded (zero strides allowed) to [B, H, Lq, Lk]; output [B, H, Lq, D].
Any strides are accepted for every tensor (e.g. q/k/v transposed from [B, L, H, D]).
`unsupported` names what the kernel does not run: dropout_p > 0, Dv != D, D > 128 and a float
mask that requires grad (gpudl.ops runs the PyTorch reference for those, warning once).

Custom ops: torch.ops.gpudl.scaled_dot_product_attention (q, k, v, mask, is_causal, scale) ->
(out, lse), and its backward op ..._backward -> (dq, dk, dv), computing only the gradients asked
for.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import acc_dtype, fp32_matmul_allows_tf32
from gpudl.kernels.attention_triton import (
    LOG2E,
    PRE_BLOCK_M,
    PRE_WARPS,
    _attn_bwd_preprocess,
    attn_bwd_dkdv_tuned,
    attn_bwd_dq_tuned,
    attn_fwd_tuned,
    block_d,
)
from gpudl.kernels.registry import first_order_only, kernel_op, no_tensor

OP = "scaled_dot_product_attention"
MAX_HEAD_DIM = 128


# --------------------------------------------------------------------------- output layouts
def empty_blhd(batch: int, heads: int, length: int, head_dim: int, like: Tensor) -> Tensor:
    """An empty [B, H, L, D] tensor stored as [B, L, H, D] (the layout PyTorch's flash backend
    returns): multi-head attention's out.transpose(1, 2).reshape(B, L, H * D) is then a view, so
    the output is neither copied nor saved twice (once by this op, once by the next linear)."""
    return like.new_empty((batch, length, heads, head_dim)).transpose(1, 2)


def is_blhd(t: Tensor) -> bool:
    """Whether the [B, H, L, D] tensor `t` is stored as [B, L, H, D] (a transposed view of heads
    split from a projection), with unit stride along D."""
    return t.stride(-1) == 1 and t.stride(1) < t.stride(2)


def grad_buffer(t: Tensor) -> Tensor:
    """The gradient buffer of q, k or v: stored as [B, L, H, D] when the input is (the gradient
    then flows back to the projection's [B, L, H * D] output through views, no copy), else
    contiguous."""
    batch, heads, length, head_dim = t.shape
    return empty_blhd(batch, heads, length, head_dim, t) if is_blhd(t) else t.new_empty(t.shape)


# --------------------------------------------------------------------------- launchers
def _precision(dtype: torch.dtype) -> str:
    # float32 follows torch's own TF32 switch for matmuls (off by default: IEEE products, never
    # silently TF32); float64 is IEEE; half-precision inputs use the tensor cores whatever this says.
    if dtype == torch.float32:
        return "tf32" if fp32_matmul_allows_tf32() else "ieee"
    return "ieee" if dtype == torch.float64 else "tf32"


def _mask_args(mask, like):
    """(pointer, strides, kind) of the optional [B, H, Lq, Lk] mask; its zero strides are kept."""
    if mask is None:
        return like, (0, 0, 0, 0), "none"
    return mask, mask.stride(), "bool" if mask.dtype == torch.bool else "float"


def _common_meta(q, mask_kind, is_causal):
    head_dim = q.shape[-1]
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), MASK_KIND=mask_kind, IS_CAUSAL=bool(is_causal),
                PRECISION=_precision(q.dtype))


def _tune_lengths(lq: int, lk: int) -> tuple[int, int]:
    # Autotune per power-of-two length bucket, not per exact length (variable-length batches).
    return triton.next_power_of_2(max(lq, 1)), triton.next_power_of_2(max(lk, 1))


def attention_forward(q, k, v, mask, is_causal: bool, scale: float):
    """q [B, H, Lq, D], k and v [B, H, Lk, D], mask None or [B, H, Lq, Lk] (any strides).
    Returns out [B, H, Lq, D] (q's dtype) stored as [B, Lq, H, D] (`empty_blhd`), and lse
    [B*H, Lq] (base-2 log-sum-exp of the scaled scores, +inf on rows with no visible key)."""
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    out = empty_blhd(batch, heads, lq, head_dim, q)
    lse = torch.empty((batch * heads, lq), dtype=acc_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse
    mask_ptr, mask_strides, mask_kind = _mask_args(mask, q)
    grid = lambda meta: (batch * heads * triton.cdiv(lq, meta["BLOCK_M"]),)  # noqa: E731
    wrap_triton(attn_fwd_tuned)[grid](
        q, k, v, mask_ptr, out, lse, *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        heads, lq, lk, scale * LOG2E, *_tune_lengths(lq, lk), **_common_meta(q, mask_kind, is_causal))
    return out, lse


def attention_backward(do, q, k, v, out, lse, mask, is_causal: bool, scale: float, needs=(True, True, True)):
    """Gradients (dq, dk, dv) for dO [B, H, Lq, D] (any strides, zero strides included: the
    output's own [B, Lq, H, D] layout is read as it is), each laid out as `grad_buffer` says; an
    empty tensor for each input that `needs` leaves out."""
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    need_q, need_k, need_v = needs
    dq = grad_buffer(q) if need_q else no_tensor(q)
    dk = grad_buffer(k) if need_k else no_tensor(k)
    dv = grad_buffer(v) if need_v else no_tensor(v)
    if batch * heads == 0 or head_dim == 0:
        return dq, dk, dv
    if lq == 0:  # no query: nothing flows back
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty((batch * heads, lq), dtype=lse.dtype, device=q.device)
    mask_ptr, mask_strides, mask_kind = _mask_args(mask, q)
    meta = _common_meta(q, mask_kind, is_causal)
    wrap_triton(_attn_bwd_preprocess)[(batch * heads * triton.cdiv(lq, PRE_BLOCK_M),)](
        out, do, delta, *out.stride(), *do.stride(), heads, lq,
        HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=PRE_BLOCK_M, num_warps=PRE_WARPS)
    inputs = (*q.stride(), *k.stride(), *v.stride(), *mask_strides, *do.stride())
    sizes = (heads, lq, lk, scale * LOG2E, scale, *_tune_lengths(lq, lk))
    if (need_k or need_v) and lk > 0:
        grid = lambda m: (batch * heads * triton.cdiv(lk, m["BLOCK_N"]),)  # noqa: E731
        # An output that is not wanted is never written; pass the other buffer as a placeholder.
        dk_buf, dv_buf = (dk if need_k else dv), (dv if need_v else dk)
        wrap_triton(attn_bwd_dkdv_tuned)[grid](
            q, k, v, mask_ptr, do, lse, delta, dk_buf, dv_buf, *inputs, *dk_buf.stride()[:3], *dv_buf.stride()[:3],
            *sizes, COMPUTE_DK=need_k, COMPUTE_DV=need_v, **meta)
    if need_q:
        grid = lambda m: (batch * heads * triton.cdiv(lq, m["BLOCK_M"]),)  # noqa: E731
        wrap_triton(attn_bwd_dq_tuned)[grid](q, k, v, mask_ptr, do, lse, delta, dq, *inputs, *dq.stride()[:3],
                                             *sizes, **meta)
    return dq, dk, dv


# --------------------------------------------------------------------------- custom ops
@kernel_op(OP)
def _attention_op(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                  scale: float) -> tuple[Tensor, Tensor]:
    """(out [B, H, Lq, D] stored as [B, Lq, H, D], lse [B*H, Lq] in the accumulator dtype, saved
    for backward)."""
    return attention_forward(query, key, value, attn_mask, is_causal, scale)


@_attention_op.register_fake
def _(query, key, value, attn_mask, is_causal, scale):
    batch, heads, lq, head_dim = query.shape
    return (empty_blhd(batch, heads, lq, head_dim, query),
            query.new_empty((batch * heads, lq), dtype=acc_dtype(query.dtype)))


def _setup_attention(ctx, inputs, output):
    query, key, value, attn_mask, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, attn_mask)  # every gradient recomputes P from q, k (and v)
    ctx.is_causal, ctx.scale = is_causal, scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, grad_out, _grad_lse):
    query, key, value, out, lse, attn_mask = ctx.saved_tensors
    need_q, need_k, need_v, need_mask = ctx.needs_input_grad[:4]
    if need_mask:
        raise RuntimeError(f"torch.ops.gpudl.{OP} gives no gradient for attn_mask; gpudl.ops.{OP} runs the "
                           "PyTorch reference for a float mask that requires grad")
    if grad_out is None:
        return None, None, None, None, None, None
    dq, dk, dv = torch.ops.gpudl.scaled_dot_product_attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, ctx.is_causal, ctx.scale, need_q, need_k, need_v)
    return (dq if need_q else None), (dk if need_k else None), (dv if need_v else None), None, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_setup_attention)


@kernel_op(OP + "_backward")
def _attention_backward_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                           attn_mask: Optional[Tensor], is_causal: bool, scale: float, need_query: bool,
                           need_key: bool, need_value: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dquery, dkey, dvalue), each laid out by `grad_buffer`; an empty tensor for each one not
    asked for."""
    return attention_backward(grad_out, query, key, value, out, lse, attn_mask, is_causal, scale,
                              (need_query, need_key, need_value))


first_order_only(_attention_backward_op)


@_attention_backward_op.register_fake
def _(grad_out, query, key, value, out, lse, attn_mask, is_causal, scale, need_query, need_key, need_value):
    return (grad_buffer(query) if need_query else no_tensor(query), grad_buffer(key) if need_key else no_tensor(key),
            grad_buffer(value) if need_value else no_tensor(value))


# --------------------------------------------------------------------------- public entry
def unsupported(query, key, value, attn_mask, dropout_p, is_causal, scale) -> str | None:
    """What the kernel does not run (gpudl.ops runs the reference instead, warning once)."""
    if dropout_p > 0.0:
        return "dropout_p > 0 is not implemented in the Triton kernel"
    if value.shape[-1] != query.shape[-1]:
        return "the value head dim Dv differs from the query/key head dim D"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head dims above {MAX_HEAD_DIM} are not supported by the Triton kernel"
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad and torch.is_grad_enabled():
        return "attn_mask requires grad; the Triton kernel gives no gradient for the mask"
    return None


def scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale):
    """Normalized signature of gpudl.reference.scaled_dot_product_attention.

    query [B, H, Lq, D]; key [B, H, Lk, D]; value [B, H, Lk, Dv]; attn_mask None, bool (True =
    attend) or float (added), expanded to [B, H, Lq, Lk] (zero strides welcome); dropout_p a
    float; is_causal a bool (top-left aligned); scale a float. Returns [B, H, Lq, Dv].
    Arguments `unsupported` names are an error here; gpudl.ops sends them to the reference.
    """
    if attn_mask is not None and is_causal:
        raise ValueError("pass either attn_mask or is_causal=True, not both (as in torch.nn.functional)")
    reason = unsupported(query, key, value, attn_mask, dropout_p, is_causal, scale)
    if reason is not None:
        raise ValueError(f"the Triton kernel cannot run this call ({reason}); gpudl.ops.{OP} runs the reference")
    return torch.ops.gpudl.scaled_dot_product_attention(query, key, value, attn_mask, bool(is_causal), float(scale))[0]

