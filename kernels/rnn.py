"""The Elman RNN layer's op layer (kernels in kernels/rnn_triton.py): launchers, the custom ops
rnn_recurrence and rnn_recurrence_backward with their fakes and autograd, and the entry `rnn`.

    xproj = x @ W_ih^T + b_ih         one GEMM over all time steps (gpudl::linear)
    output, h_n = recurrence(xproj)   one persistent launch (_rnn_forward_kernel)
Backward: BPTT in one launch (_rnn_backward_kernel) gives dz = d loss / d xproj for every step and
dh0; then grad W_hh = sum_t dz_t^T h_{t-1} and grad b_hh = sum_t dz_t as plain GEMMs and sums over
views of dz and the saved output (no copy of either), and autograd carries dz back through the
linear op to x, W_ih and b_ih.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels import linear as linear_kernel
from gpudl.kernels._common import acc_dtype, tl_acc
from gpudl.kernels.registry import first_order_only, kernel_op, no_tensor
from gpudl.kernels.rnn_triton import (
    BLOCK_N,
    MAX_HIDDEN,
    _rnn_backward_kernel,
    _rnn_forward_kernel,
    forward_stages,
    launch_config,
)


# --------------------------------------------------------------------------- host launchers
def _time_batch_strides(t: torch.Tensor, batch_first: bool) -> tuple[int, int]:
    return (t.stride(1), t.stride(0)) if batch_first else (t.stride(0), t.stride(1))


def _forward(xp, h0, w_hh, b_hh, nonlinearity, batch_first):
    """xp [L, N, H] ([N, L, H] if batch_first, any strides); h0 [N, H]; returns (output [L, N, H]
    ([N, L, H]) contiguous, h_n [N, H])."""
    h0, w_t = h0.contiguous(), w_hh.t().contiguous()
    b_hh = b_hh.contiguous() if b_hh is not None else None
    n, hidden = h0.shape
    length = xp.shape[1] if batch_first else xp.shape[0]
    out = torch.empty(xp.shape, dtype=xp.dtype, device=xp.device)
    hn = torch.empty(n, hidden, dtype=xp.dtype, device=xp.device)
    if n == 0:
        return out, hn
    s_xt, s_xn = _time_batch_strides(xp, batch_first)
    s_ot, s_on = _time_batch_strides(out, batch_first)
    cfg = launch_config(hidden, xp.dtype)
    wrap_triton(_rnn_forward_kernel)[(triton.cdiv(n, BLOCK_N),)](
        xp, h0, w_t, b_hh if b_hh is not None else w_t, out, hn,
        length, n, hidden, s_xt, s_xn, xp.stride(2), s_ot, s_on,
        HAS_BIAS=b_hh is not None, ACTIVATION=nonlinearity, ACC_DTYPE=tl_acc(xp.dtype), **cfg,
        num_stages=forward_stages(cfg),
    )
    return out, hn


def _backward(dy, dhn, out, w_hh, nonlinearity, batch_first):
    """BPTT. dy like out, dhn [N, H] (any strides, zero strides included); returns (dz shaped and
    laid out like out: the gradient of the pre-activation, i.e. of xp; dh0 [N, H])."""
    w_hh = w_hh.contiguous()
    n, hidden = dhn.shape
    length = out.shape[1] if batch_first else out.shape[0]
    dz = torch.empty_like(out)
    dh0 = torch.empty(n, hidden, dtype=out.dtype, device=out.device)
    if n == 0:
        return dz, dh0
    s_dyt, s_dyn = _time_batch_strides(dy, batch_first)
    s_ot, s_on = _time_batch_strides(out, batch_first)
    cfg = launch_config(hidden, out.dtype)
    wrap_triton(_rnn_backward_kernel)[(triton.cdiv(n, BLOCK_N),)](
        dy, dhn, out, w_hh, dz, dh0,
        length, n, hidden, s_dyt, s_dyn, dy.stride(2), dhn.stride(0), dhn.stride(1), s_ot, s_on,
        (length - 1) * s_dyt, (length - 1) * s_ot,
        ACTIVATION=nonlinearity, ACC_DTYPE=tl_acc(out.dtype), **cfg,
    )
    return dz, dh0


def weight_hh_grad(dz: Tensor, output: Tensor, h0: Tensor, batch_first: bool) -> Tensor:
    """grad W_hh = sum over steps t and rows n of dz[t, n]^T h[t - 1, n] (h[-1] = h0), as GEMMs over
    views of dz and output (contiguous buffers of this op): no full-size copy, no concatenation.

    dz, output [L, N, H] ([N, L, H] if batch_first); h0 [N, H]. Returns [H, H]."""
    hidden = dz.shape[-1]
    flat_dz, flat_out = dz.reshape(-1, hidden), output.reshape(-1, hidden)
    if not batch_first:
        # Row t * N + n: steps 1.. of dz against steps ..L-2 of the output are two contiguous
        # views, offset by N rows; step 0 pairs with h0.
        batch = dz.shape[1]
        return torch.addmm(dz[0].t().mm(h0), flat_dz[batch:].t(), flat_out[:-batch])
    # Row n * L + t: row f of dz against row f - 1 of the output is h_{t-1} everywhere except at
    # t = 0, where row f - 1 is the previous sequence's last state (or nothing, for n = 0). The
    # step-0 term therefore pairs dz[n, 0] with h0[n] - output[n - 1, L - 1] (h0[0] for n = 0),
    # an [N, H] correction.
    first = h0.clone()
    first[1:] -= output[:-1, -1]
    return torch.addmm(dz[:, 0].t().mm(first), flat_dz[1:].t(), flat_out[:-1])


# --------------------------------------------------------------------------- custom ops
@kernel_op("rnn_recurrence")
def _rnn_recurrence_op(input_projection: Tensor, h0: Tensor, weight_hh: Tensor, bias_hh: Optional[Tensor],
                       nonlinearity: str, batch_first: bool) -> tuple[Tensor, Tensor]:
    """The recurrence given the input projection xp = x @ W_ih^T + b_ih [L, N, H] ([N, L, H] if
    batch_first): (output, contiguous in xp's shape, h_n [N, H])."""
    return _forward(input_projection, h0, weight_hh, bias_hh, nonlinearity, batch_first)


@_rnn_recurrence_op.register_fake
def _(input_projection, h0, weight_hh, bias_hh, nonlinearity, batch_first):
    return input_projection.new_empty(input_projection.shape), input_projection.new_empty(h0.shape)


def _setup_rnn_recurrence(ctx, inputs, output):
    _, h0, weight_hh, _, nonlinearity, batch_first = inputs
    out, _ = output
    need_w = ctx.needs_input_grad[2]
    # BPTT reads the outputs (act' from h_t) and W_hh; grad W_hh also the states before each step.
    ctx.save_for_backward(out, h0 if need_w else None, weight_hh)
    ctx.nonlinearity, ctx.batch_first = nonlinearity, batch_first
    ctx.set_materialize_grads(False)


def _rnn_recurrence_backward(ctx, grad_output, grad_h_n):
    out, h0, weight_hh = ctx.saved_tensors
    need_xp, need_h0, need_w, need_b = ctx.needs_input_grad[:4]
    if grad_output is None and grad_h_n is None:
        return None, None, None, None, None, None
    dxp, dh0, dw, db = torch.ops.gpudl.rnn_recurrence_backward(
        grad_output, grad_h_n, out, h0, weight_hh, ctx.nonlinearity, ctx.batch_first, need_xp, need_h0, need_w, need_b)
    return (dxp if need_xp else None), (dh0 if need_h0 else None), (dw if need_w else None), \
        (db if need_b else None), None, None


_rnn_recurrence_op.register_autograd(_rnn_recurrence_backward, setup_context=_setup_rnn_recurrence)


@kernel_op("rnn_recurrence_backward")
def _rnn_recurrence_backward_op(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], output: Tensor,
                                h0: Optional[Tensor], weight_hh: Tensor, nonlinearity: str, batch_first: bool,
                                need_input_projection: bool, need_h0: bool, need_weight: bool,
                                need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d input_projection like output, dh0 [N, H], dweight_hh [H, H], dbias_hh [H]), each an
    empty tensor when not asked for; a missing grad_output or grad_h_n counts as zeros. h0 is
    needed only for dweight_hh."""
    n, hidden = output.shape[0 if batch_first else 1], weight_hh.shape[0]
    # Zeros for a missing gradient, read through zero strides: nothing is materialized.
    dy = grad_output if grad_output is not None else output.new_zeros(()).expand(output.shape)
    dhn = grad_h_n if grad_h_n is not None else output.new_zeros(()).expand(n, hidden)
    dz, dh0 = _backward(dy, dhn, output, weight_hh, nonlinearity, batch_first)
    grad_w = weight_hh_grad(dz, output, h0, batch_first) if need_weight else no_tensor(dz)
    grad_b = dz.reshape(-1, hidden).sum(0, dtype=acc_dtype(dz.dtype)).to(dz.dtype) if need_bias else no_tensor(dz)
    return (dz if need_input_projection else no_tensor(dz)), (dh0 if need_h0 else no_tensor(dz)), grad_w, grad_b


first_order_only(_rnn_recurrence_backward_op)


@_rnn_recurrence_backward_op.register_fake
def _(grad_output, grad_h_n, output, h0, weight_hh, nonlinearity, batch_first, need_input_projection, need_h0,
      need_weight, need_bias):
    n, hidden = output.shape[0 if batch_first else 1], weight_hh.shape[0]
    return (output.new_empty(output.shape if need_input_projection else 0),
            output.new_empty((n, hidden) if need_h0 else 0),
            output.new_empty((hidden, hidden) if need_weight else 0),
            output.new_empty(hidden if need_bias else 0))


# --------------------------------------------------------------------------- public entry
def unsupported(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, batch_first) -> str | None:
    """What the kernel does not run (gpudl.ops runs the reference instead, warning once)."""
    hidden = weight_hh.shape[0]
    if hidden > MAX_HIDDEN:
        return f"hidden size {hidden} > {MAX_HIDDEN} (the kernel keeps a [16, H] fp32 state per program)"
    return None


def rnn(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, batch_first):
    """One Elman RNN layer over a whole sequence (normalized arguments, see gpudl.reference.rnn).

    input [L, N, H_in] ([N, L, H_in] if batch_first); hx [N, H]; weight_ih [H, H_in];
    weight_hh [H, H]; bias_ih, bias_hh [H] or None; nonlinearity 'tanh' or 'relu'.
    Returns (output [L, N, H] ([N, L, H] if batch_first), h_n [N, H]).
    Arguments `unsupported` names are an error here; gpudl.ops sends them to the reference.
    """
    reason = unsupported(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, batch_first)
    if reason is not None:
        raise ValueError(f"the Triton kernel cannot run this call ({reason}); gpudl.ops.rnn runs the reference")
    hidden = weight_hh.shape[0]
    length = input.shape[1] if batch_first else input.shape[0]
    if length == 0:
        # Nothing to run: an empty output and h_n = hx (a copy, so it can be modified safely).
        shape = (input.shape[0], 0, hidden) if batch_first else (0, input.shape[1], hidden)
        return input.new_empty(shape), hx.clone()
    # All time steps' input projection as one GEMM, on the linear kernel itself (gpudl::linear).
    xp = linear_kernel.linear(input, weight_ih, bias_ih, None)
    output, h_n = torch.ops.gpudl.rnn_recurrence(xp, hx, weight_hh, bias_hh, nonlinearity, bool(batch_first))
    return output, h_n

