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

What backward keeps: besides x (for dW) and W (for dx), at most ONE tensor, and never one the
model does not hold anyway.
- relu, leaky_relu, tanh, sigmoid: the OUTPUT y, the tensor the next layer keeps as its input
  (the same storage, no extra memory); the gradient is a function of it (relu and leaky_relu:
  y > 0 exactly when pre > 0 because the slope is positive; tanh: 1 - y^2; sigmoid: y (1 - y)),
  as PyTorch's own autograd does. An elementwise kernel forms dz from dy and y.
- gelu is not invertible from y (not monotonic below x = -0.75), and keeping the pre-activation
  costs one [M, N] tensor per layer (1152 MiB on the GPT config, estimated with fake tensors).
  Backward recomputes it instead, from the saved x, W and b: the forward GEMM runs again with an
  epilogue that writes dz = gelu'(x @ W^T + b) * dy directly. One extra M x N x K GEMM buys the
  memory; no [M, N] tensor is saved.
dz is formed before the two gradient GEMMs, not in their prologues: each GEMM reads every dz
element about K / BLOCK_N times, so a prologue would redo the activation gradient at each read,
inside both K loops. Without an activation dz is dy itself and no kernel runs.

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
    uses_tensor_cores,
)
from gpudl.kernels.registry import first_order_only, kernel_op, no_tensor


# --------------------------------------------------------------------------- host launchers
def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's TF32 switch so results match F.linear's precision; other dtypes
    # ignore the setting (fp16/bf16 use tensor cores, fp64 is exact).
    return "tf32" if dtype == torch.float32 and fp32_matmul_allows_tf32() else "ieee"


# Programs of a persistent GEMM under the interpreter (no SMs to count): a few, so the tests walk
# several tiles per program.
INTERPRETER_PROGRAMS = 4


def _persistent_programs(device: torch.device) -> int:
    """One program per SM: each walks output tiles grid-strided."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def _major(t: torch.Tensor) -> str | None:
    """"row" when t [R, C]'s columns are contiguous, "column" when its rows are, else None."""
    if t.stride(1) == 1 or t.shape[1] == 1:
        return "row"
    if t.stride(0) == 1 or t.shape[0] == 1:
        return "column"
    return None


def _descriptor_ready(t: torch.Tensor, major: str | None) -> bool:
    """Whether a tensor descriptor can address t: a unit stride, a 16-byte aligned base address and
    a 16-byte multiple for the other stride (the TMA's rules, which the interpreter checks too).
    The base is read as the storage offset (PyTorch's allocations are at least 16-byte aligned),
    which fake tensors have too: torch.compile traces the same choice the eager launch makes."""
    if major is None:
        return False
    other = t.stride(0) if major == "row" else t.stride(1)
    size = t.element_size()
    return (t.storage_offset() * size) % 16 == 0 and (other * size) % 16 == 0


def _descriptor_workspace(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for descriptors made on the device (tl.make_tensor_descriptor)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _install_descriptor_allocator() -> None:
    """Device-side tensor descriptors need a workspace allocator (triton.set_allocator); set ours
    unless the caller set one. A context variable: cheap to read at each launch."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_descriptor_workspace)


def _load_path(a: torch.Tensor, b: torch.Tensor, a_major, b_major, precision: str, on_gpu: bool) -> str:
    """"descriptor" or "pointer": the GEMM's LOADS for operands a [M, K], b [K, N].

    Operand tiles come through tensor descriptors where the TMA can address both operands and the
    products run on tensor cores. IEEE fp32 and fp64 products run on the FMA units, which read
    each operand element from shared memory on their own: the TMA's swizzled tiles buy them
    nothing and cost registers (on sm_90 every descriptor-loaded IEEE tile with K steps of 32
    spilled, and tiles with K steps of 8 took 235-254 registers in the forward and wgrad with
    descriptors, 130-167 with pointers; see the audit), so they take the pointer loads on a GPU.
    The interpreter (no TMA, no FMA units) takes the descriptors wherever they can address the
    operands, so the tests run that path in fp32."""
    if a.shape[1] == 0 or not (_descriptor_ready(a, a_major) and _descriptor_ready(b, b_major)):
        return "pointer"
    if on_gpu and not uses_tensor_cores(a.element_size(), precision):
        return "pointer"
    return "descriptor"


def _gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias=None, activation: str = "none", dy=None):
    """c [M, N] = act(a [M, K] @ b [K, N] + bias [N]), or, given dy [M, N] (c's strides),
    c = act'(a @ b + bias) * dy. a, b may be any strided views (transposes included)."""
    M, K = a.shape
    N = b.shape[1]
    if c.numel() == 0:
        return c
    a_major, b_major = _major(a), _major(b)
    precision = _input_precision(c.dtype)
    loads = _load_path(a, b, a_major, b_major, precision, on_gpu=c.device.type == "cuda")
    if K == 0:
        # Empty operands are never read (the K loop runs zero times); a null data pointer may be
        # refused by the launcher, so pass the output's instead.
        a, b = c, c
        stride_a, stride_b = (0, 0), (0, 0)
    else:
        stride_a, stride_b = a.stride(), b.stride()
    if loads == "descriptor" and c.device.type == "cuda":
        _install_descriptor_allocator()
    programs = _persistent_programs(c.device)
    grid = lambda meta: (min(programs, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)  # noqa: E731
    wrap_triton(matmul)[grid](
        a, b, c,
        bias.contiguous() if bias is not None else c,  # [N]: a copy only for a strided view, negligible
        dy if dy is not None else c,
        M, N, K,
        stride_a[0], stride_a[1], stride_b[0], stride_b[1], c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None,
        ACTIVATION=activation,
        EPILOGUE="activation" if dy is None else "activation_grad",
        LOADS=loads,
        # The layout also names the pointer-load compilations (one per layout, as the audit compiles them).
        A_MAJOR=a_major or "neither",
        B_MAJOR=b_major or "neither",
        ACC_DTYPE=tl_acc(c.dtype),
        INPUT_PRECISION=precision,
    )
    return c


def _activation_backward(dy: torch.Tensor, y: torch.Tensor, activation: str) -> torch.Tensor:
    """dz [M, N] (new, contiguous) from dy [M, N] and the saved output y [M, N]."""
    M, N = dy.shape
    dz = torch.empty((M, N), dtype=dy.dtype, device=dy.device)
    if dz.numel() == 0:
        return dz
    grid = (triton.cdiv(M, ELEMENTWISE_TILE["BLOCK_M"]), triton.cdiv(N, ELEMENTWISE_TILE["BLOCK_N"]))
    wrap_triton(_activation_backward_kernel)[grid](
        dy, y, dz, M, N, dy.stride(0), dy.stride(1), y.stride(0), y.stride(1),
        ACTIVATION=activation, COMPUTE_DTYPE=tl_acc(dy.dtype), **ELEMENTWISE_TILE, num_warps=ELEMENTWISE_WARPS,
    )
    return dz


def _recomputed_activation_backward(dy, x, weight, bias, activation: str) -> torch.Tensor:
    """dz [M, N] (new, contiguous) = act'(x @ W^T + b) * dy: the forward GEMM again, its epilogue
    turning the recomputed pre-activation into dz (gelu, whose forward keeps no [M, N] tensor)."""
    M, N = dy.shape
    dz = torch.empty((M, N), dtype=dy.dtype, device=dy.device)
    return _gemm(x, weight.t(), dz, bias=bias, activation=activation, dy=dy.contiguous())


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


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., F] as [M, F]: a view whenever the leading dims flatten (strides do the rest)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


# --------------------------------------------------------------------------- custom ops
# Which [M, N] tensor backward reads per activation: the output, or nothing (recomputed).
_SAVES_OUTPUT = ("relu", "leaky_relu", "tanh", "sigmoid")
_RECOMPUTES = ("gelu",)


@kernel_op("linear")
def _linear_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str]) -> Tensor:
    """y [..., N] = act(input @ weight^T + bias)."""
    N = weight.shape[0]
    y = torch.empty((*input.shape[:-1], N), dtype=input.dtype, device=input.device)
    _gemm(_rows(input), weight.t(), _rows(y), bias=bias, activation=activation_constexpr(activation))
    return y


@_linear_op.register_fake
def _(input, weight, bias, activation):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _setup_linear(ctx, inputs, output):
    input, weight, bias, activation = inputs
    code = activation_constexpr(activation)
    need_x, need_w, _ = ctx.needs_input_grad[:3]
    recompute = code in _RECOMPUTES
    # dx reads only W, dW only x; a recomputed pre-activation reads x, W and b.
    ctx.save_for_backward(input if (need_w or recompute) else None,
                          weight if (need_x or recompute) else None,
                          bias if recompute else None,
                          output if code in _SAVES_OUTPUT else None)
    ctx.activation, ctx.input_shape = activation, input.shape
    ctx.set_materialize_grads(False)


def _linear_backward(ctx, grad_output):
    input, weight, bias, output = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_output is None:
        return None, None, None, None
    dx, dw, db = torch.ops.gpudl.linear_backward(
        grad_output, input, weight, bias, output, ctx.activation, list(ctx.input_shape), need_x, need_w, need_b)
    return (dx if need_x else None), (dw if need_w else None), (db if need_b else None), None


_linear_op.register_autograd(_linear_backward, setup_context=_setup_linear)


@kernel_op("linear_backward")
def _linear_backward_op(grad_output: Tensor, input: Optional[Tensor], weight: Optional[Tensor],
                        bias: Optional[Tensor], output: Optional[Tensor], activation: Optional[str],
                        input_shape: list[int], need_input: bool, need_weight: bool,
                        need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dinput, dweight, dbias); each an empty tensor when not asked for. `output` is the forward's
    output for relu, leaky_relu, tanh and sigmoid, None otherwise; gelu recomputes its
    pre-activation from input, weight and bias."""
    code = activation_constexpr(activation)
    N = grad_output.shape[-1]
    M = math.prod(grad_output.shape[:-1])
    dy = grad_output.reshape(M, N)
    if code in _RECOMPUTES:
        dz = _recomputed_activation_backward(dy, _rows(input), weight, bias, code)
    elif code in _SAVES_OUTPUT:
        dz = _activation_backward(dy, output.reshape(M, N), code)
    else:
        dz = dy
    grad_input, grad_weight, grad_bias = no_tensor(dy), no_tensor(dy), no_tensor(dy)  # distinct: outputs never alias
    if need_input:
        grad_input = torch.empty((M, weight.shape[1]), dtype=weight.dtype, device=dz.device)
        _gemm(dz, weight, grad_input)
        grad_input = grad_input.view(input_shape)
    if need_weight:
        x = _rows(input)
        grad_weight = torch.empty((N, x.shape[1]), dtype=x.dtype, device=dz.device)
        _gemm(dz.t(), x, grad_weight)
    if need_bias:
        grad_bias = _column_sum(dz, dz.dtype)
    return grad_input, grad_weight, grad_bias


first_order_only(_linear_backward_op)


@_linear_backward_op.register_fake
def _(grad_output, input, weight, bias, output, activation, input_shape, need_input, need_weight, need_bias):
    N = grad_output.shape[-1]
    return (grad_output.new_empty(input_shape if need_input else 0),
            grad_output.new_empty((N, input.shape[-1]) if need_weight else 0),
            grad_output.new_empty(N if need_bias else 0))


def linear(input, weight, bias, activation_name):
    """activation(input @ weight^T + bias): input [..., K]; weight [N, K]; bias [N] or None;
    activation_name one of gpudl.reference.ACTIVATIONS. Returns [..., N] in input's dtype.
    Same normalized signature as `gpudl.reference.linear`; gpudl.ops.linear validates first."""
    return torch.ops.gpudl.linear(input, weight, bias, activation_name)
