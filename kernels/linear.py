"""Fused linear layer: y = activation(x @ W^T + b), forward and backward in Triton.

Shapes (M = product of the input's leading dims, K = in_features, N = out_features):
    input  [..., K]   viewed as x [M, K] (by strides; a copy only if the leading dims cannot be flattened)
    weight [N, K]
    bias   [N] or None
    output [..., N]   viewed as y [M, N]

One tiled GEMM kernel (`_matmul_kernel`, C = epilogue(A @ B) with arbitrary strides, grouped
program order for L2 reuse as in Triton's matmul tutorial) serves all three products:
    forward      y  = act(x @ W^T + b)   A = x [M, K],     B = W^T [K, N] (W's strides swapped)
    grad input   dx = dz @ W             A = dz [M, N],    B = W [N, K]
    grad weight  dW = dz^T @ x           A = dz^T [N, M],  B = x [M, K]
and the bias gradient, the column sums of dz, by a small reduction kernel. (It was once the row
sum of A accumulated in the dW GEMM's loop: that reduction of the operand tile cost registers,
and the audit found the dW GEMM spilling on sm_80; one more read of dz costs far less.)
where dz = dL/d(pre-activation) = act'(pre) * dy.

Activation gradient: relu, leaky_relu, tanh and sigmoid take it from the saved OUTPUT (relu and
leaky_relu: y > 0 exactly when pre > 0 because the slope is positive; tanh: 1 - y^2; sigmoid:
y (1 - y)), as PyTorch's own autograd does: the output exists anyway, so backward keeps no extra
[M, N] buffer. gelu is not invertible (it is not monotonic below x = -0.75), so the forward writes
the pre-activation as a second output, only when a gradient will be needed.

dz is formed by a small elementwise kernel before the two GEMMs rather than in their prologues:
both GEMMs read every dz element many times (once per column block of their output, about
K / BLOCK_N times each), so a prologue fusion would re-read dy AND the saved tensor and redo
the erf/exp of gelu's derivative at each of those reads, inside both GEMMs' inner loops. One
extra pass over [M, N] (read dy and saved, write dz) costs less, and leaves the GEMM loops
plain loads feeding tl.dot. Without an activation dz is dy itself and no kernel runs.

Accumulation in fp32 (fp64 for float64 inputs, so the float64 gradcheck is exact enough). fp32
inputs follow torch's TF32 switch (`torch.backends.cuda.matmul.fp32_precision`, which the
legacy `allow_tf32` and `torch.set_float32_matmul_precision` also set; off by default): IEEE
fp32 products unless the user opted into TF32, as F.linear does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import (
    SHARED_MEMORY_LIMIT,
    activation_constexpr,
    activation_grad_from_saved,
    apply_activation,
    fp32_matmul_allows_tf32,
    tl_acc,
    triton_dtype,
    tuning_configs,
)
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, first_order_only, kernel_op, no_tensor, register

# --------------------------------------------------------------------------- autotune configs
# Audited (gpudl.kernels.audit: no spills on sm_80/sm_90, tensor cores, pipelined loads). The first
# config is the one the interpreter runs: the largest tile, so tests launch few programs.
# Half precision: 2-byte tiles, up to 128x256x64 (Triton's matmul tutorial sizes).
_HALF_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
]
# float32 (IEEE on FMA units, or TF32 tensor cores): twice the bytes per element and, on FMA units,
# operands held in registers: at most 64 accumulators per thread, and 128x128 with a 16-deep K
# step (at 32 it spilled on sm_80 under the gelu epilogue).
_FP32_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
]
_GEMM_CONFIGS = _HALF_CONFIGS + _FP32_CONFIGS


def _configs_for(configs, element_size: int):
    """The candidates of `configs` audited for the element size: the half-precision ones for 2-byte
    types, the float32 ones otherwise (float64 too); all of `configs` if none is (the interpreter's one)."""
    pool = _HALF_CONFIGS if element_size == 2 else _FP32_CONFIGS
    return [c for c in configs if any(c is p for p in pool)] or list(configs)


def _estimated_shared_memory(config: triton.Config, element_size: int) -> int:
    """Bytes of the software pipeline's A and B tile buffers (what dominates the kernel's use)."""
    kw = config.kwargs
    return config.num_stages * (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * element_size


def _shared_memory_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    return limit or SHARED_MEMORY_LIMIT.get(props.major * 10, min(SHARED_MEMORY_LIMIT.values()))


def _configs_that_fit(configs, element_size: int, limit: int):
    fitting = [c for c in configs if _estimated_shared_memory(c, element_size) <= limit]
    # Never prune to nothing: the smallest tile is the best chance (the autotuner skips a config
    # that then runs out of resources).
    return fitting or [min(configs, key=lambda c: _estimated_shared_memory(c, element_size))]


def _prune_configs(configs, named_args, **kwargs):
    a = named_args["a_ptr"]
    size = a.element_size()
    return _configs_that_fit(_configs_for(configs, size), size, _shared_memory_limit(a.device))


# --------------------------------------------------------------------------- kernels
@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, pre_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    STORE_PRE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C [M, N] = activation(A [M, K] @ B [K, N] + bias [N]), any strides.

    STORE_PRE: also write A @ B + bias to pre [M, N] (strides of C)."""
    TRANSCENDENTAL: tl.constexpr = ACTIVATION == "tanh" or ACTIVATION == "sigmoid" or ACTIVATION == "gelu"
    SPLIT_EPILOGUE: tl.constexpr = 4 if TRANSCENDENTAL and BLOCK_N >= 64 else 1
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks sweep the column blocks together, so the B tiles they
    # share stay in L2 instead of being re-read from HBM by every row block.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    # int64 row/column offsets: M * stride can pass 2**31 on large activations.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K  # the last block is partial when K is not a multiple of BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if SPLIT_EPILOGUE == 4:
        # An erf/exp epilogue over the whole tile at once needs more registers than there are
        # (the audit found spills): finish the tile in four column quarters instead.
        # [m, a, b, j] = acc[m, a * BLOCK_N / 2 + b * BLOCK_N / 4 + j]; split b, then a.
        q = tl.permute(tl.reshape(acc, (BLOCK_M, 2, 2, BLOCK_N // 4)), (0, 3, 1, 2))
        b0, b1 = tl.split(q)
        q00, q10 = tl.split(b0)
        q01, q11 = tl.split(b1)
        offs_q = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N // 4)
        _epilogue(q00, offs_m, offs_q, M, N, bias_ptr, pre_ptr, c_ptr, stride_cm, stride_cn,
                  HAS_BIAS, ACTIVATION, STORE_PRE, ACC_DTYPE)
        _epilogue(q01, offs_m, offs_q + BLOCK_N // 4, M, N, bias_ptr, pre_ptr, c_ptr, stride_cm, stride_cn,
                  HAS_BIAS, ACTIVATION, STORE_PRE, ACC_DTYPE)
        _epilogue(q10, offs_m, offs_q + BLOCK_N // 2, M, N, bias_ptr, pre_ptr, c_ptr, stride_cm, stride_cn,
                  HAS_BIAS, ACTIVATION, STORE_PRE, ACC_DTYPE)
        _epilogue(q11, offs_m, offs_q + 3 * (BLOCK_N // 4), M, N, bias_ptr, pre_ptr, c_ptr, stride_cm, stride_cn,
                  HAS_BIAS, ACTIVATION, STORE_PRE, ACC_DTYPE)
    else:
        _epilogue(acc, offs_m, offs_n, M, N, bias_ptr, pre_ptr, c_ptr, stride_cm, stride_cn,
                  HAS_BIAS, ACTIVATION, STORE_PRE, ACC_DTYPE)


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, bias_ptr, pre_ptr, c_ptr, stride_cm, stride_cn,
              HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Bias, pre-activation store, activation and store of one [rows, columns] piece of C."""
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    c_offs = offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + c_offs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
    out = apply_activation(acc, ACTIVATION)
    tl.store(c_ptr + c_offs, out.to(c_ptr.dtype.element_ty), mask=mask)


_matmul = triton.autotune(
    configs=tuning_configs(_GEMM_CONFIGS),
    # Strides are in the key because forward, grad-input and grad-weight of one layer share M, N,
    # K permutations but not layouts (dW reads dz transposed), and want their own tiles.
    key=["M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "ACTIVATION"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_matmul_kernel)


@triton.jit
def _activation_backward_kernel(
    dy_ptr, saved_ptr, dz_ptr,
    M, N,
    stride_dym, stride_dyn, stride_sm, stride_sn,
    ACTIVATION: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dz [M, N] (contiguous) = act'(.) * dy [M, N] from saved [M, N] (y or pre-activation)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=mask, other=0.0)
    saved = tl.load(saved_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
    dz = activation_grad_from_saved(saved.to(COMPUTE_DTYPE), dy.to(COMPUTE_DTYPE), ACTIVATION)
    tl.store(dz_ptr + offs_m[:, None] * N + offs_n[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _column_sum_kernel(
    x_ptr, out_ptr,
    M, N,
    stride_m, stride_n,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out [N] = x [M, N].sum(0): the bias gradient (x = dz)."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # A 2-D accumulator, reduced once at the end: fewer cross-thread reductions in the loop.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (offs_m < M)[:, None] & mask_n[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n, mask=mask, other=0.0)
        acc += x.to(ACC_DTYPE)
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n)


_ELEMENTWISE_BLOCK = {"BLOCK_M": 32, "BLOCK_N": 128}
_ELEMENTWISE_WARPS = 4
_COLUMN_SUM_BLOCK = {"BLOCK_M": 32, "BLOCK_N": 128}  # 64 rows spilled on sm_80 (the audit)
_COLUMN_SUM_WARPS = 4


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
    wrap_triton(_matmul)[grid](
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


def _activation_backward(dy: torch.Tensor, saved: torch.Tensor, activation: int) -> torch.Tensor:
    """dz [M, N] (new, contiguous) from dy [M, N] and saved [M, N]."""
    M, N = dy.shape
    dz = torch.empty((M, N), dtype=dy.dtype, device=dy.device)
    if dz.numel() == 0:
        return dz
    grid = (triton.cdiv(M, _ELEMENTWISE_BLOCK["BLOCK_M"]), triton.cdiv(N, _ELEMENTWISE_BLOCK["BLOCK_N"]))
    wrap_triton(_activation_backward_kernel)[grid](
        dy, saved, dz, M, N, dy.stride(0), dy.stride(1), saved.stride(0), saved.stride(1),
        ACTIVATION=activation, COMPUTE_DTYPE=tl_acc(dy.dtype), **_ELEMENTWISE_BLOCK, num_warps=_ELEMENTWISE_WARPS,
    )
    return dz


def _column_sum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [M, N] -> [N] in `dtype`, accumulated in fp32 (fp64 for float64)."""
    M, N = x.shape
    out = torch.empty(N, dtype=dtype, device=x.device)
    if N == 0:
        return out
    stride = x.stride() if M > 0 else (0, 0)
    grid = (triton.cdiv(N, _COLUMN_SUM_BLOCK["BLOCK_N"]),)
    wrap_triton(_column_sum_kernel)[grid](
        x if M > 0 else out, out, M, N, stride[0], stride[1],
        ACC_DTYPE=tl_acc(x.dtype), **_COLUMN_SUM_BLOCK, num_warps=_COLUMN_SUM_WARPS,
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


# --------------------------------------------------------------------------- registration
def _case(lead, in_features, out_features, has_bias, activation_name):
    def make(dtype, device):
        x = torch.randn(*lead, in_features, dtype=dtype, device=device, requires_grad=True)
        w = torch.randn(out_features, in_features, dtype=dtype, device=device) / math.sqrt(max(in_features, 1))
        w.requires_grad_()
        b = torch.randn(out_features, dtype=dtype, device=device, requires_grad=True) if has_bias else None
        return x, w, b, activation_name

    return make


_CASES = [
    Case("regular-4x32x16-bias", _case((4,), 32, 16, True, None)),
    Case("regular-4x32x16-nobias-relu", _case((4,), 32, 16, False, "relu")),
    *[Case(f"ragged-3x5x37x23-{act}", _case((3, 5), 37, 23, True, act))
      for act in ("relu", "leaky_relu", "tanh", "sigmoid", "gelu")],
    Case("ragged-3x5x37x23-nobias-gelu", _case((3, 5), 37, 23, False, "gelu")),
]

_BENCH_CASES = [
    Case("M4096-K4096-N4096", _case((4096,), 4096, 4096, True, None)),
    Case("M8192-K4096-N11008-gelu", _case((8192,), 4096, 11008, True, "gelu")),
    Case("M16384-K1024-N4096-relu", _case((16384,), 1024, 4096, True, "relu")),
]


def _flops(args) -> float:
    x, w = args[0], args[1]
    return 2.0 * (x.numel() // x.shape[-1]) * w.shape[0] * w.shape[1]


def _bytes_moved(args) -> float:
    x, w, b = args[0], args[1], args[2]
    y = (x.numel() // x.shape[-1]) * w.shape[0]
    return float((x.numel() + w.numel() + (0 if b is None else b.numel()) + y) * x.element_size())


# The GEMM's epilogues, each compiled on its own (a launch specializes them): the forward's with
# bias, gelu (the heaviest activation) and the stored pre-activation; the plain one of the grad
# input and grad weight GEMMs (compiled in the layouts of both launches).
_GEMM_MODES = {
    "fwd-bias-gelu-pre": {"HAS_BIAS": True, "ACTIVATION": "gelu", "STORE_PRE": True},
    "plain": {"HAS_BIAS": False, "ACTIVATION": "none", "STORE_PRE": False},
}


def _compile_variants() -> list[CompileVariant]:
    """Every autotune config the GEMM may pick for the dtype (those that fit sm_80, the smaller
    device; sm_90 keeps the same set), with each epilogue, in fp32 (IEEE, torch's
    default, and TF32, opt-in) and bf16; and the two elementwise kernels in fp32 and bf16."""
    variants = []
    gemm_sig = {name: "i32" for name in ("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn",
                                         "stride_cm", "stride_cn")}
    limit = min(SHARED_MEMORY_LIMIT.values())
    for dtype, precision in ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "ieee")):
        ptr = triton_dtype(dtype)
        size = torch.empty((), dtype=dtype).element_size()
        for config in _configs_that_fit(_configs_for(_GEMM_CONFIGS, size), size, limit):
            kw = config.kwargs
            for mode, switches in _GEMM_MODES.items():
                variants.append(CompileVariant(
                    name=f"matmul-{mode}-{ptr[1:]}-{precision}-{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}"
                         f"-w{config.num_warps}-s{config.num_stages}",
                    kernel=_matmul_kernel,
                    signature={"a_ptr": ptr, "b_ptr": ptr, "c_ptr": ptr, "bias_ptr": ptr, "pre_ptr": ptr,
                               **gemm_sig},
                    constexprs={**switches, "ACC_DTYPE": tl.float32, "INPUT_PRECISION": precision, **kw},
                    num_warps=config.num_warps,
                    num_stages=config.num_stages,
                ))
    for dtype in (torch.float32, torch.bfloat16):
        ptr = triton_dtype(dtype)
        variants.append(CompileVariant(
            name=f"activation_backward-{ptr[1:]}-gelu",
            kernel=_activation_backward_kernel,
            signature={"dy_ptr": ptr, "saved_ptr": ptr, "dz_ptr": ptr,
                       **{n: "i32" for n in ("M", "N", "stride_dym", "stride_dyn", "stride_sm", "stride_sn")}},
            constexprs={"ACTIVATION": "gelu", "COMPUTE_DTYPE": tl.float32, **_ELEMENTWISE_BLOCK},
            num_warps=_ELEMENTWISE_WARPS,
        ))
        variants.append(CompileVariant(
            name=f"column_sum-{ptr[1:]}",
            kernel=_column_sum_kernel,
            signature={"x_ptr": ptr, "out_ptr": ptr, **{n: "i32" for n in ("M", "N", "stride_m", "stride_n")}},
            constexprs={"ACC_DTYPE": tl.float32, **_COLUMN_SUM_BLOCK},
            num_warps=_COLUMN_SUM_WARPS,
        ))
    return variants


SPEC = register(KernelSpec(
    op="linear",
    triton=linear,
    cases=_CASES,
    gradcheck_case=Case("gradcheck-2x3x5x4-gelu", _case((2, 3), 5, 4, True, "gelu")),
    # fp32 products are IEEE unless the user opts into TF32 (the cases need 6e-7).
    tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)},
    compile_variants=_compile_variants,
    # M = 1100 rows: more than GROUP_M (8) row blocks under every config, so the grouped program
    # order has a full and a partial group; several column blocks and K steps in all three GEMMs;
    # gelu stores the pre-activation, and the bias gradient comes from the column-sum kernel.
    tuning_cases=[Case("tuning-1100x72x260-gelu", _case((1100,), 72, 260, True, "gelu"))],
    bench_cases=_BENCH_CASES,
    flops=_flops,
    bytes_moved=_bytes_moved,
    description="tiled GEMM with bias and activation epilogue; Triton backward (dz kernel, dx and dW GEMMs, "
                "bias grad by a column sum)",
))
