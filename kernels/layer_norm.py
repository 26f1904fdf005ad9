"""Fused LayerNorm over the last dimension, the op layer: launchers, custom ops, autograd and the
entry gpudl.ops calls (the kernels and the algorithm are described in layer_norm_triton.py).

Custom ops: torch.ops.gpudl.layer_norm (input, weight, bias, eps, store_stats) -> (y, mean, rstd),
the statistics only when store_stats (a backward will read them), and its backward op
layer_norm_backward -> (dx, dweight, dbias), computing only the gradients asked for.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels import layer_norm_triton as kernels
from gpudl.kernels._common import acc_dtype, tl_acc
from gpudl.kernels.layer_norm_triton import (
    DWDB_BLOCK_N,
    DWDB_WARPS,
    MAX_N,
    REDUCE_BLOCK_N,
    REDUCE_BLOCK_P,
    REDUCE_WARPS,
    _dwdb_block_m,
    _ln_bwd_dwdb_kernel,
    _ln_bwd_kernel,
    _ln_fwd_kernel,
    _ln_reduce_partials_kernel,
    launch_config,
)
from gpudl.kernels.registry import first_order_only, kernel_op, no_tensor

# --------------------------------------------------------------------------- host launchers
# Programs per SM. Forward: up to a full SM of 8-warp programs, each walking a run of row tiles with
# the weight and bias loaded once. Backward: one dweight/dbias partial row per program, about two per
# SM keep every SM busy while the partials [P, N] stay few (their write and re-read are P / M of
# the backward's traffic).
FORWARD_PROGRAMS_PER_SM = 8
PARTIALS_PER_SM = 2
# Programs under the interpreter (no SMs to count): a few, so the tests walk several tiles each.
INTERPRETER_PROGRAMS = 4


def _programs(num_tiles: int, device: torch.device, per_sm: int) -> int:
    """per_sm programs per SM (INTERPRETER_PROGRAMS when interpreting), at most one per tile."""
    if device.type == "cuda":
        target = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = INTERPRETER_PROGRAMS
    return max(1, min(num_tiles, target))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] as [M, N] contiguous (a view when it already is; explicit M: reshape(-1, 0) is ambiguous)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1]).contiguous()


def layer_norm_forward(input: torch.Tensor, weight, bias, eps: float, store_stats: bool):
    """input [..., N] (any strides); weight, bias [N] or None.
    Returns (y [..., N] contiguous, mean [M], rstd [M]) (mean, rstd empty unless store_stats)."""
    x = _rows(input)
    m, n = x.shape
    y = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    stats_shape = m if store_stats else 0
    mean = torch.empty(stats_shape, dtype=acc_dtype(x.dtype), device=x.device)
    rstd = torch.empty(stats_shape, dtype=acc_dtype(x.dtype), device=x.device)
    if m == 0 or n == 0:
        if store_stats:  # N == 0: torch gives an empty output; stats are unused
            mean.zero_(), rstd.zero_()
        return y, mean, rstd
    block_n, rows, num_warps = launch_config(n, m)
    num_tiles = triton.cdiv(m, rows)
    tiles_per_program = triton.cdiv(num_tiles, _programs(num_tiles, x.device, FORWARD_PROGRAMS_PER_SM))
    wrap_triton(_ln_fwd_kernel)[(triton.cdiv(num_tiles, tiles_per_program),)](
        x, weight.contiguous() if weight is not None else x, bias.contiguous() if bias is not None else x, y,
        mean if store_stats else y, rstd if store_stats else y,
        m, n, eps, tiles_per_program,
        HAS_W=weight is not None, HAS_B=bias is not None, STORE_STATS=store_stats, ACC=tl_acc(x.dtype),
        ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y, mean, rstd


def layer_norm_backward(dy, input, weight, mean, rstd, need_dx: bool, need_dw: bool, need_db: bool):
    """dy, input [..., N] (any strides); weight [N] or None; mean, rstd [M].
    Returns (dx [..., N] contiguous, dweight [N], dbias [N]), each empty when not asked for."""
    x, dy = _rows(input), _rows(dy)
    m, n = x.shape
    param_dtype = weight.dtype if weight is not None else x.dtype
    dx = torch.empty(input.shape, dtype=input.dtype, device=x.device) if need_dx else no_tensor(x)
    # No rows: the parameter gradients are exactly zero, as in torch.
    dw = torch.zeros(n, dtype=param_dtype, device=x.device) if need_dw else no_tensor(x)
    db = torch.zeros(n, dtype=param_dtype, device=x.device) if need_db else no_tensor(x)
    if m == 0 or n == 0 or not (need_dx or need_dw or need_db):
        return dx, dw, db
    block_n, rows, num_warps = launch_config(n, m)
    acc = acc_dtype(x.dtype)
    num_tiles = triton.cdiv(m, rows)
    programs = _programs(num_tiles, x.device, PARTIALS_PER_SM)
    tiles_per_program = triton.cdiv(num_tiles, programs)
    programs = triton.cdiv(num_tiles, tiles_per_program)  # no program left without tiles
    dw_part = torch.empty(programs, n, dtype=acc, device=x.device) if need_dw else None
    db_part = torch.empty(programs, n, dtype=acc, device=x.device) if need_db else None
    split = block_n >= kernels.SPLIT_DWDB_BLOCK_N
    fused_dw, fused_db = need_dw and not split, need_db and not split
    if need_dx or fused_dw or fused_db:
        wrap_triton(_ln_bwd_kernel)[(programs,)](
            x, dy, weight.contiguous() if weight is not None else x, mean, rstd,
            dx if need_dx else x, dw_part if fused_dw else mean, db_part if fused_db else mean,
            m, n, tiles_per_program,
            HAS_W=weight is not None, DX=need_dx, DW=fused_dw, DB=fused_db, ACC=tl_acc(x.dtype),
            ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
        )
    if split and (need_dw or need_db):
        wrap_triton(_ln_bwd_dwdb_kernel)[(programs, triton.cdiv(n, DWDB_BLOCK_N))](
            x, dy, mean, rstd, dw_part if need_dw else mean, db_part if need_db else mean,
            m, n, tiles_per_program * rows,
            DW=need_dw, DB=need_db, ACC=tl_acc(x.dtype), BLOCK_M=_dwdb_block_m(x.dtype), BLOCK_N=DWDB_BLOCK_N,
            num_warps=DWDB_WARPS,
        )
    if need_dw or need_db:
        wrap_triton(_ln_reduce_partials_kernel)[(triton.cdiv(n, REDUCE_BLOCK_N),)](
            dw_part if need_dw else db_part, db_part if need_db else dw_part,
            dw if need_dw else db, db if need_db else dw,
            programs, n, DW=need_dw, DB=need_db,
            BLOCK_P=REDUCE_BLOCK_P, BLOCK_N=REDUCE_BLOCK_N, num_warps=REDUCE_WARPS,
        )
    return dx, dw, db


# --------------------------------------------------------------------------- custom ops
@kernel_op("layer_norm")
def _layer_norm_op(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   store_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y [..., N] contiguous, mean [M], rstd [M]); mean and rstd (accumulator dtype) only when
    store_stats (a backward will read them), else empty tensors."""
    return layer_norm_forward(input, weight, bias, eps, store_stats)


@_layer_norm_op.register_fake
def _(input, weight, bias, eps, store_stats):
    stats_shape = math.prod(input.shape[:-1]) if store_stats else 0
    return (input.new_empty(input.shape), input.new_empty(stats_shape, dtype=acc_dtype(input.dtype)),
            input.new_empty(stats_shape, dtype=acc_dtype(input.dtype)))


def _setup_layer_norm(ctx, inputs, output):
    input, weight, _, _, store_stats = inputs
    _, mean, rstd = output
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    # The backward kernel reads x and the statistics for every gradient; the weight only for dx.
    ctx.save_for_backward(input, weight if need_x else None, mean, rstd)
    ctx.store_stats = store_stats
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _layer_norm_backward(ctx, grad_output, _grad_mean, _grad_rstd):
    input, weight, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_output is None:
        return None, None, None, None, None
    if not ctx.store_stats:
        raise RuntimeError("torch.ops.gpudl.layer_norm was called with store_stats=False, so it has no statistics "
                           "for a backward pass; pass store_stats=True when a gradient will be needed")
    dx, dw, db = torch.ops.gpudl.layer_norm_backward(grad_output, input, weight, mean, rstd, need_x, need_w, need_b)
    return (dx if need_x else None), (dw if need_w else None), (db if need_b else None), None, None


_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_setup_layer_norm)


@kernel_op("layer_norm_backward")
def _layer_norm_backward_op(grad_output: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                            need_input: bool, need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dinput [..., N] contiguous, dweight [N], dbias [N]); each an empty tensor when not asked
    for. `weight` is needed only for dinput."""
    return layer_norm_backward(grad_output, input, weight, mean, rstd, need_input, need_weight, need_bias)


first_order_only(_layer_norm_backward_op)


@_layer_norm_backward_op.register_fake
def _(grad_output, input, weight, mean, rstd, need_input, need_weight, need_bias):
    n = input.shape[-1]
    param_dtype = weight.dtype if weight is not None else input.dtype
    return (input.new_empty(input.shape if need_input else 0),
            input.new_empty(n if need_weight else 0, dtype=param_dtype if need_weight else input.dtype),
            input.new_empty(n if need_bias else 0, dtype=param_dtype if need_bias else input.dtype))


# --------------------------------------------------------------------------- public entry
def unsupported(input, weight, bias, eps) -> str | None:
    """What the kernel does not run (gpudl.ops runs the reference instead, warning once)."""
    n = input.shape[-1]
    if n > MAX_N:
        return f"rows longer than {MAX_N} elements (got N={n}) do not fit in registers"
    return None


def layer_norm(input, weight, bias, eps):
    """input [..., N]; weight, bias [N] or None (input's dtype and device); eps a float.
    Returns [..., N]: each row normalized to zero mean and unit variance, scaled and shifted.
    Arguments `unsupported` names are an error here; gpudl.ops sends them to the reference."""
    reason = unsupported(input, weight, bias, eps)
    if reason is not None:
        raise ValueError(f"the Triton kernel cannot run this call ({reason}); gpudl.ops.layer_norm runs the reference")
    # Statistics are written only when a backward will read them.
    store_stats = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    # A strided input is copied once here (autograd keeps the copy for backward), not in both ops.
    return torch.ops.gpudl.layer_norm(input.contiguous(), weight, bias, float(eps), store_stats)[0]
