"""Fused mean-squared error: the loss and its gradient in one pass.

    mse_loss(input, target, reduction)

One kernel launch reads input and target once, writes the loss (per element, or one partial sum
per program, added by _common.sum_partials's one-program kernel in a fixed order: no atomics) and the saved
gradient d loss / d input = 2 (input - target) (/ n for 'mean'). Backward multiplies the saved
gradient by grad_output; the target's gradient is its negation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import (
    INT32_LIMIT,
    REDUCTION_CODES,
    acc_dtype,
    empty_reduction,
    sum_partials,
    sum_partials_variants,
    tl_acc,
    triton_dtype,
)
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, kernel_op, no_tensor, register

# One config for every launch, as for the BCE kernels: 4096 elements per program at 8 warps.
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _mse_fwd_kernel(
    x_ptr, t_ptr,  # input, target [n], contiguous
    out_ptr,  # [n] elementwise loss (REDUCTION 0) or [num_programs] partial sums
    g_ptr,  # [n] saved d loss / d input (1/n included for mean)
    n,
    REDUCTION: tl.constexpr,  # 0 none, 1 mean, 2 sum
    GRAD: tl.constexpr,
    ACC: tl.constexpr,  # fp32, or fp64 for float64 inputs
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INDEX_64:
        idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    diff = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC) - tl.load(t_ptr + idx, mask=mask, other=0.0).to(ACC)
    loss = diff * diff  # masked lanes are 0 - 0: nothing to mask before the sum
    if REDUCTION == 0:
        tl.store(out_ptr + idx, loss.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid, tl.sum(loss, axis=0))
    if GRAD:
        g = 2.0 * diff
        if REDUCTION == 1:
            g = g / n
        tl.store(g_ptr + idx, g.to(g_ptr.dtype.element_ty), mask=mask)


def mse_forward(x, t, reduction: str, grad: bool):
    """x, t contiguous, same shape. Returns (loss, saved d loss / d x or None)."""
    n = x.numel()
    g = torch.empty_like(x) if grad else None
    if n == 0:  # PyTorch: none -> empty, mean -> nan, sum -> 0
        return (torch.empty_like(x) if reduction == "none" else empty_reduction(reduction, x)), g
    programs = triton.cdiv(n, BLOCK)
    code = REDUCTION_CODES[reduction]
    out = torch.empty_like(x) if code == 0 else torch.empty(programs, dtype=acc_dtype(x.dtype), device=x.device)
    wrap_triton(_mse_fwd_kernel)[(programs,)](
        x, t, out, g if g is not None else x, n, REDUCTION=code, GRAD=grad, ACC=tl_acc(x.dtype),
        INDEX_64=n > INT32_LIMIT - BLOCK, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return (out if code == 0 else sum_partials(out, x.dtype, n if code == 1 else None)), g


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


# --------------------------------------------------------------------------- registration
def _case(name, shape, reduction, target_grad=False):
    def make(dtype, device):
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        t = torch.randn(shape, device=device, dtype=dtype).requires_grad_(target_grad)
        return x, t, reduction

    return Case(name, make)


def _bench(n, reduction="mean"):
    def make(dtype, device):
        return (torch.randn(n, device=device, dtype=dtype, requires_grad=True),
                torch.randn(n, device=device, dtype=dtype), reduction)

    return Case(f"n={n} {reduction}", make)


def _bytes(args):
    x, t, reduction = args
    # read input and target; write the loss ('none') and the saved gradient (if any grad is needed)
    writes = (reduction == "none") + (x.requires_grad or t.requires_grad)
    return x.numel() * x.element_size() * (2 + writes)


def _variants():
    variants = []
    for dtype in (torch.float32, torch.bfloat16):
        ptr = triton_dtype(dtype)
        for reduction, index_64 in ((1, False), (0, False), (2, True)):
            variants.append(CompileVariant(
                f"mse-{str(dtype)[6:]}-red{reduction}-i{64 if index_64 else 32}-B{BLOCK}", _mse_fwd_kernel,
                {"x_ptr": ptr, "t_ptr": ptr, "out_ptr": ptr if reduction == 0 else "*fp32", "g_ptr": ptr,
                 "n": "i64" if index_64 else "i32", "REDUCTION": "constexpr", "GRAD": "constexpr",
                 "ACC": "constexpr", "INDEX_64": "constexpr", "BLOCK": "constexpr"},
                {"REDUCTION": reduction, "GRAD": True, "ACC": tl.float32, "INDEX_64": index_64, "BLOCK": BLOCK},
                num_warps=NUM_WARPS,
            ))
    return variants + sum_partials_variants()


SPEC = register(KernelSpec(
    op="mse_loss",
    triton=mse_loss,
    cases=[
        _case("n=1000 mean", (1000,), "mean", target_grad=True),
        _case("n=4097 sum", (4097,), "sum"),
        _case("[37,5] none", (37, 5), "none", target_grad=True),
        _case("[3,7,11] mean", (3, 7, 11), "mean"),
    ],
    gradcheck_case=_case("[6,5] mean", (6, 5), "mean", target_grad=True),
    tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)},
    compile_variants=_variants,
    bench_cases=[_bench(2**24), _bench(2**26), _bench(2**24, "none")],
    flops=lambda args: 3 * args[0].numel(),  # subtract, square, add
    bytes_moved=_bytes,
    description="MSE: loss and d/dinput in one launch; backward is one multiply (target: its negation)",
))
