"""The Elman RNN layer's op layer (kernels in kernels/rnn_triton.py): launchers, the custom ops
rnn_recurrence and rnn_recurrence_backward with their fakes and autograd, and the entry `rnn`.

    output, h_n = recurrence(x)   one persistent launch (_rnn_forward_kernel), the input
                                  projection x_t W_ih^T computed inside each step
Backward: BPTT over windows of time steps (_rnn_backward_kernel, one launch per window; the next
launch restarts from the window's first dz), each window's dz = d loss / d z_t [steps, N, H] turned
into its share of grad W_hh = sum_t dz_t^T h_{t-1}, grad W_ih = sum_t dz_t^T x_t,
grad b = sum_t dz_t (b_ih's and b_hh's) by GEMMs and sums into fp32 accumulators; dx_t = dz_t W_ih
comes out of the BPTT kernel itself. Only one window's dz is ever allocated: no [L, N, H]
intermediate exists, forward or backward, besides the output itself. (Why not per-program
weight-gradient partials inside the kernel: docs/kernels/rnn.md#memory.)
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import acc_dtype, tl_acc
from gpudl.kernels.registry import first_order_only, kernel_op, no_tensor
from gpudl.kernels.rnn_triton import (
    BLOCK_N,
    MAX_HIDDEN,
    _rnn_backward_kernel,
    _rnn_forward_kernel,
    backward_stages,
    backward_warps,
    forward_stages,
    input_config,
    launch_config,
    window_steps,
)


# --------------------------------------------------------------------------- host launchers
def _time_major(t: Tensor, batch_first: bool) -> Tensor:
    """A view of t [N, L, ...] or [L, N, ...] as [L, N, ...]."""
    return t.transpose(0, 1) if batch_first else t


def _forward(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_first):
    """x [L, N, H_in] ([N, L, H_in] if batch_first, any strides); h0 [N, H]; returns (output
    [L, N, H] ([N, L, H]) contiguous, h_n [N, H])."""
    h0, wi_t, w_t = h0.contiguous(), w_ih.t().contiguous(), w_hh.t().contiguous()
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()  # the kernel reads each step's rows as contiguous vectors
    biases = [b for b in (b_ih, b_hh) if b is not None]
    acc = acc_dtype(x.dtype)
    bias = sum(b.to(acc) for b in biases) if biases else None  # [H]: b_ih + b_hh, added once a step
    n, hidden = h0.shape
    xt = _time_major(x, batch_first)
    length, input_size = xt.shape[0], xt.shape[2]
    out = torch.empty(x.shape[:-1] + (hidden,), dtype=x.dtype, device=x.device)
    hn = torch.empty(n, hidden, dtype=x.dtype, device=x.device)
    if n == 0:
        return out, hn
    ot = _time_major(out, batch_first)
    cfg = launch_config(hidden, x.dtype)
    inputs = input_config(input_size, cfg, x.dtype)
    wrap_triton(_rnn_forward_kernel)[(triton.cdiv(n, BLOCK_N),)](
        x, h0, wi_t, w_t, bias if bias is not None else w_t, out, hn,
        length, n, hidden, input_size, xt.stride(0), xt.stride(1), ot.stride(0), ot.stride(1),
        HAS_BIAS=bias is not None, ACTIVATION=nonlinearity, ACC_DTYPE=tl_acc(x.dtype), **cfg,
        **inputs, num_stages=forward_stages(cfg, inputs, x.dtype),
    )
    return out, hn


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32/fp64) += a @ b in place with the accumulator's precision: a half-precision GEMM
    accumulates into fp32 directly on CUDA (addmm's out_dtype, no temporary); elsewhere (the
    interpreter's CPU runs) it upcasts."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _backward(dy, dhn, x, out, h0, w_ih, w_hh, nonlinearity, batch_first, need_x, need_h0, need_wih, need_whh,
              need_b):
    """BPTT. dy like out or None (zeros), dhn [N, H] (any strides, zero strides included), x the forward's input
    (None unless need_wih), h0 (None unless need_whh), w_ih (None unless need_x). Returns (dx like
    out with H_in features or None, dh0 [N, H] or None, grad W_ih [H, H_in] fp32 or None, grad W_hh
    [H, H] fp32 or None, grad b [H] fp32 or None).

    The host walks windows of window_steps steps from the end: one launch writes the window's dz
    [steps, N, H] (slot s: step t0 + s) and its dx; the next launch starts from slot 0 (dz_{t0});
    meanwhile each step's dz meets the state before it (h0 for t = 0) and its input in GEMMs into
    fp32 accumulators, reading the output and the input in place (per-step [N, H] views)."""
    n, hidden = dhn.shape
    has_dy = dy is not None
    dy = dy if has_dy else out  # a dummy: the kernel reads no dy
    ot, dyt = _time_major(out, batch_first), _time_major(dy, batch_first)
    length = ot.shape[0]
    acc = acc_dtype(out.dtype)
    input_size = (w_ih if w_ih is not None else x).shape[-1] if need_x or need_wih else 0
    dx = torch.empty(out.shape[:-1] + (input_size,), dtype=out.dtype, device=out.device) if need_x else None
    grad_wih = torch.zeros(hidden, input_size, dtype=acc, device=out.device) if need_wih else None
    grad_whh = torch.zeros(hidden, hidden, dtype=acc, device=out.device) if need_whh else None
    grad_b = torch.zeros(hidden, dtype=acc, device=out.device) if need_b else None
    if n == 0 or length == 0:
        return dx, (dhn.clone() if need_h0 else None), grad_wih, grad_whh, grad_b
    xt = _time_major(x, batch_first) if need_wih else None
    w_hh = w_hh.contiguous()
    w_ih = w_ih.contiguous() if need_x else w_hh  # a dummy without dx
    steps = window_steps(length, out.dtype)
    dz = torch.empty(steps, n, hidden, dtype=out.dtype, device=out.device)
    dxt = _time_major(dx, batch_first) if need_x else dz  # dx contiguous in its shape: unit feature stride
    cfg = launch_config(hidden, out.dtype)
    cfg["num_warps"] = backward_warps(cfg, out.dtype)
    for t1 in range(length, 0, -steps):
        t0 = max(0, t1 - steps)
        window = t1 - t0
        wrap_triton(_rnn_backward_kernel)[(triton.cdiv(n, BLOCK_N),)](
            dy, dhn, out, w_hh, dz, w_ih, dxt,
            window, n, hidden, input_size, int(t1 < length),
            dyt.stride(0), dyt.stride(1), dyt.stride(2), dhn.stride(0), dhn.stride(1), ot.stride(0), ot.stride(1),
            dz.stride(0), dxt.stride(0), dxt.stride(1),
            (t1 - 1) * dyt.stride(0), (t1 - 1) * ot.stride(0), (window - 1) * dz.stride(0), (t1 - 1) * dxt.stride(0),
            ACTIVATION=nonlinearity, ACC_DTYPE=tl_acc(out.dtype), **cfg,
            **input_config(input_size, cfg, out.dtype), HAS_DX=need_x, HAS_DY=has_dy,
            num_stages=backward_stages(out.dtype),
        )
        if need_b:
            grad_b += dz[:window].sum((0, 1), dtype=acc)
        for t in range(t0, t1):
            if need_whh:
                _accumulate_mm(grad_whh, dz[t - t0].t(), ot[t - 1] if t > 0 else h0)
            if need_wih:
                _accumulate_mm(grad_wih, dz[t - t0].t(), xt[t])
    # dh0 = dz_0 @ W_hh: the product the kernel would make after step 0 (slot 0 holds dz_0)
    dh0 = torch.mm(dz[0], w_hh) if need_h0 else None
    return dx, dh0, grad_wih, grad_whh, grad_b


# --------------------------------------------------------------------------- custom ops
@kernel_op("rnn_recurrence")
def _rnn_recurrence_op(input: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                       bias_hh: Optional[Tensor], nonlinearity: str, batch_first: bool) -> tuple[Tensor, Tensor]:
    """The layer over the whole sequence: input [L, N, H_in] ([N, L, H_in] if batch_first) ->
    (output [L, N, H] ([N, L, H]) contiguous, h_n [N, H])."""
    return _forward(input, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, batch_first)


@_rnn_recurrence_op.register_fake
def _(input, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, batch_first):
    return input.new_empty(input.shape[:-1] + (weight_hh.shape[0],)), input.new_empty(h0.shape)


def _setup_rnn_recurrence(ctx, inputs, output):
    input, h0, weight_ih, weight_hh, _, _, nonlinearity, batch_first = inputs
    out, _ = output
    need_x, _, need_wih, need_whh = ctx.needs_input_grad[:4]
    # BPTT reads the outputs (act' from h_t) and W_hh; grad W_hh also h0 (the state before step 0),
    # grad W_ih the input, dx W_ih. Nothing else of the forward is kept.
    ctx.save_for_backward(out, h0 if need_whh else None, weight_hh, input if need_wih else None,
                          weight_ih if need_x else None)
    ctx.nonlinearity, ctx.batch_first = nonlinearity, batch_first
    ctx.set_materialize_grads(False)


def _rnn_recurrence_backward(ctx, grad_output, grad_h_n):
    out, h0, weight_hh, input, weight_ih = ctx.saved_tensors
    need_x, need_h0, need_wih, need_whh, need_bih, need_bhh = ctx.needs_input_grad[:6]
    if grad_output is None and grad_h_n is None:
        return (None,) * 8
    dx, dh0, dwih, dwhh, db = torch.ops.gpudl.rnn_recurrence_backward(
        grad_output, grad_h_n, out, h0, weight_hh, input, weight_ih, ctx.nonlinearity, ctx.batch_first,
        need_x, need_h0, need_wih, need_whh, need_bih or need_bhh)
    # b_ih and b_hh get the same gradient: two tensors, as each may become a parameter's .grad
    db_ih = db if need_bih else None
    db_hh = (db.clone() if need_bih else db) if need_bhh else None
    return (dx if need_x else None), (dh0 if need_h0 else None), (dwih if need_wih else None), \
        (dwhh if need_whh else None), db_ih, db_hh, None, None


_rnn_recurrence_op.register_autograd(_rnn_recurrence_backward, setup_context=_setup_rnn_recurrence)


@kernel_op("rnn_recurrence_backward")
def _rnn_recurrence_backward_op(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], output: Tensor,
                                h0: Optional[Tensor], weight_hh: Tensor, input: Optional[Tensor],
                                weight_ih: Optional[Tensor], nonlinearity: str, batch_first: bool, need_input: bool,
                                need_h0: bool, need_weight_ih: bool, need_weight_hh: bool,
                                need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d input like input, dh0 [N, H], dweight_ih [H, H_in], dweight_hh [H, H], dbias [H] (b_ih's
    and b_hh's)), each an empty tensor when not asked for; a missing grad_output or grad_h_n counts
    as zeros. h0 is needed only for dweight_hh, input only for dweight_ih, weight_ih only for d input."""
    n, hidden = output.shape[0 if batch_first else 1], weight_hh.shape[0]
    # Zeros for a missing h_n gradient, read through zero strides: nothing is materialized (a
    # missing output gradient is not read at all).
    dhn = grad_h_n if grad_h_n is not None else output.new_zeros(()).expand(n, hidden)
    dx, dh0, gwih, gwhh, gb = _backward(grad_output, dhn, input, output, h0, weight_ih, weight_hh, nonlinearity,
                                        batch_first, need_input, need_h0, need_weight_ih, need_weight_hh, need_bias)
    return (dx if need_input else no_tensor(output)), (dh0 if need_h0 else no_tensor(output)), \
        (gwih.to(output.dtype) if need_weight_ih else no_tensor(output)), \
        (gwhh.to(output.dtype) if need_weight_hh else no_tensor(output)), \
        (gb.to(output.dtype) if need_bias else no_tensor(output))


first_order_only(_rnn_recurrence_backward_op)


@_rnn_recurrence_backward_op.register_fake
def _(grad_output, grad_h_n, output, h0, weight_hh, input, weight_ih, nonlinearity, batch_first, need_input,
      need_h0, need_weight_ih, need_weight_hh, need_bias):
    n, hidden = output.shape[0 if batch_first else 1], weight_hh.shape[0]
    input_size = (input if input is not None else weight_ih).shape[-1] if need_weight_ih or need_input else 0
    return (output.new_empty(output.shape[:-1] + (input_size,) if need_input else 0),
            output.new_empty((n, hidden) if need_h0 else 0),
            output.new_empty((hidden, input_size) if need_weight_ih else 0),
            output.new_empty((hidden, hidden) if need_weight_hh else 0),
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
    output, h_n = torch.ops.gpudl.rnn_recurrence(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity,
                                                 bool(batch_first))
    return output, h_n
