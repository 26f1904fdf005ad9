"""Fused linear layer: y = activation(x @ W^T + b), the op layer (kernels in linear_triton.py,
registration data in linear_spec.py).

Shapes (M = product of the input's leading dims, K = in_features, N = out_features):
    input  [..., K]   viewed as x [M, K] (by strides; a copy only if the leading dims cannot be flattened)
    weight [N, K]
    bias   [N] or None
    output [..., N]   viewed as y [M, N]

One GEMM kernel (`linear_triton.matmul`, any strides) serves all three products:
    forward      y  = act(x @ W^T + b)   A = x [M, K],     B = W^T [K, N] (W's strides swapped)
    grad input   dx = dz @ W             A = dz [M, N],    B = W [N, K]
    grad weight  dW = dz^T @ x           A = dz^T [N, M],  B = x [M, K]
where dz = dL/d(pre-activation) = act'(pre) * dy, and the bias gradient is the column sum of dz
(its own small kernel: a row sum of A inside the dW GEMM's loop costs that loop registers).

Activation gradient: relu, leaky_relu, tanh and sigmoid take it from the saved OUTPUT (relu and
leaky_relu: y > 0 exactly when pre > 0 because the slope is positive; tanh: 1 - y^2; sigmoid:
y (1 - y)), as PyTorch's own autograd does. gelu is not invertible (it is not monotonic below
x = -0.75), so the forward writes the pre-activation as a second output when a gradient will be
needed.

dz is formed by an elementwise kernel before the two GEMMs, not in their prologues: each GEMM
reads every dz element about K / BLOCK_N times, so a prologue would redo the activation gradient
(erf/exp for gelu) at each read, inside both K loops. One pass over [M, N] keeps the loops plain
loads feeding tl.dot. Without an activation dz is dy itself and no kernel runs.

fp32 inputs follow torch's TF32 switch (`torch.backends.cuda.matmul.fp32_precision`, which the
legacy `allow_tf32` and `torch.set_float32_matmul_precision` also set; off by default): IEEE
fp32 products unless the user opted into TF32, as F.linear does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import activation_constexpr, fp32_matmul_allows_tf32, tl_acc
from gpudl.kernels.linear_triton import (
    COLUMN_SUM_TILE,
    COLUMN_SUM_WARPS,
    ELEMENTWISE_TILE,
    ELEMENTWISE_WARPS,
    _activation_backward_kernel,
    _column_sum_kernel,
    matmul,
)
from gpudl.kernels.registry import first_order_only, kernel_op, no_tensor


# --------------------------------------------------------------------------- host launchers
def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's TF32 switch so results match F.linear's precision; other dtypes
    # ignore the setting (fp16/bf16 use tensor cores, fp64 is exact).
    return "tf32" if dtype == torch.float32 and fp32_matmul_allows_tf32() else "ieee"


def _gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias=None, activation: str = "none", pre=None):
    """c [M, N] = act(a [M, K] @ b [K, N] + bias [N]); optional pre [M, N] output.
    a, b may be any strided views (transposes included); c and pre share strides."""
    M, K = a.shape
    N = b.shape[1]
    if c.numel() == 0:
        return c
    if K == 0:
        # Empty operands are never read (the K loop runs zero times); a null data pointer may be
        # refused by the launcher, so pass the output's instead.
        a, b = c, c
        stride_a, stride_b = (0, 0), (0, 0)
    else:
        stride_a, stride_b = a.stride(), b.stride()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    wrap_triton(matmul)[grid](
        a, b, c,
        bias.contiguous() if bias is not None else c,  # [N]: a copy only for a strided view, negligible
        pre if pre is not None else c,
        M, N, K,
        stride_a[0], stride_a[1], stride_b[0], stride_b[1], c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None,
        ACTIVATION=activation,
        STORE_PRE=pre is not None,
        ACC_DTYPE=tl_acc(c.dtype),
        INPUT_PRECISION=_input_precision(c.dtype),
    )
    return c


def _activation_backward(dy: torch.Tensor, saved: torch.Tensor, activation: str) -> torch.Tensor:
    """dz [M, N] (new, contiguous) from dy [M, N] and saved [M, N]."""
    M, N = dy.shape
    dz = torch.empty((M, N), dtype=dy.dtype, device=dy.device)
    if dz.numel() == 0:
        return dz
    grid = (triton.cdiv(M, ELEMENTWISE_TILE["BLOCK_M"]), triton.cdiv(N, ELEMENTWISE_TILE["BLOCK_N"]))
    wrap_triton(_activation_backward_kernel)[grid](
        dy, saved, dz, M, N, dy.stride(0), dy.stride(1), saved.stride(0), saved.stride(1),
        ACTIVATION=activation, COMPUTE_DTYPE=tl_acc(dy.dtype), **ELEMENTWISE_TILE, num_warps=ELEMENTWISE_WARPS,
    )
    return dz


def _column_sum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [M, N] -> [N] in `dtype`, accumulated in fp32 (fp64 for float64)."""
    M, N = x.shape
    out = torch.empty(N, dtype=dtype, device=x.device)
    if N == 0:
        return out
    stride = x.stride() if M > 0 else (0, 0)
    grid = (triton.cdiv(N, COLUMN_SUM_TILE["BLOCK_N"]),)
    wrap_triton(_column_sum_kernel)[grid](
        x if M > 0 else out, out, M, N, stride[0], stride[1],
        ACC_DTYPE=tl_acc(x.dtype), **COLUMN_SUM_TILE, num_warps=COLUMN_SUM_WARPS,
    )
    return out


def _forward(input, weight, bias, activation: str, store_pre: bool):
    """Returns (output [..., N], pre-activation [..., N] or None, input as x [M, K])."""
    N, K = weight.shape
    lead = input.shape[:-1]
    x = input.reshape(math.prod(lead), K)  # a view whenever the leading dims flatten; strides do the rest
    y = torch.empty((*lead, N), dtype=input.dtype, device=input.device)
    pre = torch.empty_like(y) if store_pre else None
    M = x.shape[0]
    _gemm(x, weight.t(), y.view(M, N), bias=bias, activation=activation, pre=None if pre is None else pre.view(M, N))
    return y, pre, x


# --------------------------------------------------------------------------- custom ops
@kernel_op("linear")
def _linear_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str],
               store_pre: bool) -> tuple[Tensor, Tensor]:
    """(y [..., N], pre-activation [..., N] when store_pre else an empty tensor)."""
    y, pre, _ = _forward(input, weight, bias, activation_constexpr(activation), store_pre)
    return y, (pre if pre is not None else no_tensor(y))


@_linear_op.register_fake
def _(input, weight, bias, activation, store_pre):
    y = input.new_empty((*input.shape[:-1], weight.shape[0]))
    return y, (torch.empty_like(y) if store_pre else y.new_empty(0))


def _setup_linear(ctx, inputs, output):
    input, weight, _, activation, _ = inputs
    y, pre = output
    code = activation_constexpr(activation)
    need_x, need_w, _ = ctx.needs_input_grad[:3]
    # dx needs only W, dW only x: keep alive only what a requested gradient reads.
    saved = None if code == "none" else (pre if code == "gelu" else y)
    ctx.save_for_backward(input if need_w else None, weight if need_x else None, saved)
    ctx.activation, ctx.input_shape = activation, input.shape
    ctx.mark_non_differentiable(pre)
    ctx.set_materialize_grads(False)


def _linear_backward(ctx, grad_output, _grad_pre):
    input, weight, saved = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_output is None:
        return None, None, None, None, None
    dx, dw, db = torch.ops.gpudl.linear_backward(
        grad_output, input, weight, saved, ctx.activation, list(ctx.input_shape), need_x, need_w, need_b)
    return (dx if need_x else None), (dw if need_w else None), (db if need_b else None), None, None


_linear_op.register_autograd(_linear_backward, setup_context=_setup_linear)


@kernel_op("linear_backward")
def _linear_backward_op(grad_output: Tensor, input: Optional[Tensor], weight: Optional[Tensor],
                        saved: Optional[Tensor], activation: Optional[str], input_shape: list[int],
                        need_input: bool, need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dinput, dweight, dbias); each an empty tensor when not asked for. `saved` is the output
    (relu, leaky_relu, tanh, sigmoid) or the pre-activation (gelu); None without an activation."""
    code = activation_constexpr(activation)
    N = grad_output.shape[-1]
    M = math.prod(grad_output.shape[:-1])
    dy = grad_output.reshape(M, N)
    dz = dy if code == "none" else _activation_backward(dy, saved.reshape(M, N), code)
    grad_input, grad_weight, grad_bias = no_tensor(dy), no_tensor(dy), no_tensor(dy)  # distinct: outputs never alias
    if need_input:
        grad_input = torch.empty((M, weight.shape[1]), dtype=weight.dtype, device=dz.device)
        _gemm(dz, weight, grad_input)
        grad_input = grad_input.view(input_shape)
    if need_weight:
        x = input.reshape(M, input.shape[-1])  # a view whenever the leading dims flatten
        grad_weight = torch.empty((N, x.shape[1]), dtype=x.dtype, device=dz.device)
        _gemm(dz.t(), x, grad_weight)
    if need_bias:
        grad_bias = _column_sum(dz, dz.dtype)
    return grad_input, grad_weight, grad_bias


first_order_only(_linear_backward_op)


@_linear_backward_op.register_fake
def _(grad_output, input, weight, saved, activation, input_shape, need_input, need_weight, need_bias):
    N = grad_output.shape[-1]
    return (grad_output.new_empty(input_shape if need_input else 0),
            grad_output.new_empty((N, input.shape[-1]) if need_weight else 0),
            grad_output.new_empty(N if need_bias else 0))


def linear(input, weight, bias, activation_name):
    """activation(input @ weight^T + bias): input [..., K]; weight [N, K]; bias [N] or None;
    activation_name one of gpudl.reference.ACTIVATIONS. Returns [..., N] in input's dtype.
    Same normalized signature as `gpudl.reference.linear`; gpudl.ops.linear validates first."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    # gelu's derivative needs the pre-activation: write it only when a backward will read it.
    store_pre = needs_grad and activation_constexpr(activation_name) == "gelu"
    return torch.ops.gpudl.linear(input, weight, bias, activation_name, store_pre)[0]
