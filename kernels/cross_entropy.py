"""Fused softmax cross-entropy for logits [N, C] and int64 class indices [N].

    cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)

One kernel launch handles BLOCK_N rows per program: pass 1 streams the row in BLOCK_C chunks with
an online log-sum-exp (running max m and sum s of exp(x - m)); pass 2 streams it again (from L2
for big rows) to write the gradient of the row's unnormalized loss and, with label smoothing, to
add the smoothing term. Backward multiplies the saved gradient by grad_output (and by
1 / sum of weights for 'mean'); it never recomputes the softmax.

Per row i with target y, weights w (1 without weight), W = sum_c w_c, eps = label_smoothing:
    loss_i = (1 - eps) w_y (lse - x_y) + eps / C * sum_c w_c (lse - x_c)
    d loss_i / d x_c = p_c ((1 - eps) w_y + eps W / C) - (1 - eps) w_y [c == y] - eps w_c / C
Rows whose target is ignore_index contribute 0. 'mean' divides by sum_i w_{y_i} over the rows
not ignored (PyTorch's weighted mean; nan when every row is ignored, with zero gradients).
Reductions are deterministic: per-program partial sums, then a one-program kernel (no atomics).
A target outside [0, C) that is not ignore_index raises IndexError for CPU tensors (as PyTorch);
on a GPU, where checking would cost a host sync, its row's loss and gradient are NaN.

Other forms fall back to the PyTorch reference with a warning: class-probability targets and
inputs with extra dims [N, C, d...].
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import REDUCE_BLOCK, REDUCTION_CODES, acc_dtype, tl_acc, triton_dtype
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, kernel_op, no_tensor, register

TILE = 2048  # elements per program per step, BLOCK_N * BLOCK_C (4096 at BLOCK_C = 4096), on 4 warps:
# at 4096 on 8 warps ptxas spilled a few row values in some variants (gpudl.kernels.audit)


@triton.jit
def _ce_fwd_kernel(
    x_ptr,  # [N, C] logits, unit stride along C
    y_ptr,  # [N] int64 targets
    w_ptr,  # [C] class weights (when HAS_WEIGHT)
    out_ptr,  # [N] row losses (REDUCTION 0), else [2, num_programs]: loss partials, then weight partials
    g_ptr,  # [N, C] contiguous: saved d loss_i / d x (unnormalized for 'mean')
    n_rows, n_classes, stride_xn, ignore_index, smoothing,
    HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
    REDUCTION: tl.constexpr,  # 0 none, 1 mean, 2 sum
    GRAD: tl.constexpr,
    ACC: tl.constexpr,  # fp32, or fp64 for float64 logits
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index)
    active = row_mask & (y != ignore_index)
    in_range = (y >= 0) & (y < n_classes)
    ok = active & in_range
    bad = active & (in_range == 0)  # out-of-range target: NaN, never a silently wrong number
    y_safe = tl.where(ok, y, 0).to(tl.int32)  # in [0, C): int32 keeps pass 2's compare narrow
    x_rows = x_ptr + rows * stride_xn
    x_y = tl.load(x_rows + y_safe, mask=ok, other=0.0).to(ACC)
    if HAS_WEIGHT:
        w_y = tl.load(w_ptr + y_safe, mask=ok, other=0.0).to(ACC)
    else:
        w_y = tl.where(ok, 1.0, 0.0).to(ACC)
    w_y = tl.where(bad, float("nan"), w_y)

    # Pass 1: online log-sum-exp. m starts finite so a chunk of -inf logits (masked classes)
    # gives exp(-inf) = 0 instead of exp(-inf - -inf) = nan.
    m = tl.full([BLOCK_N], -1e30, ACC)
    s = tl.zeros([BLOCK_N], ACC)
    w_total = tl.zeros([BLOCK_C], ACC)  # sum of class weights, needed by the smoothing gradient
    for c0 in range(0, n_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < n_classes
        xb = tl.load(x_rows[:, None] + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                     other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(xb, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(xb - m_new[:, None]), axis=1)
        m = m_new
        if SMOOTHING and HAS_WEIGHT:
            w_total += tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    # Rows past N: no log(0), no exp(inf). m and log(s) stay apart for the gradient: rounding their
    # sum to fp32 costs up to half an ulp of |lse| (3e-5 at logits of 500), a relative error of
    # softmax - 1 that grows as the target's probability nears 1.
    m = tl.where(row_mask, m, 0.0)
    log_s = tl.where(row_mask, tl.log(tl.where(row_mask, s, 1.0)), 0.0)
    lse = m + log_s
    loss = w_y * (lse - x_y)

    # Pass 2: gradient (and the smoothing term, which needs lse).
    if GRAD or SMOOTHING:
        eps_c = smoothing / n_classes
        if HAS_WEIGHT:
            weight_sum = tl.sum(w_total, axis=0)
        else:
            weight_sum = n_classes
        hard = (1.0 - smoothing) * w_y  # weight of the one-hot part
        coef = hard + eps_c * weight_sum  # every class's softmax is scaled by this
        smooth = tl.zeros([BLOCK_N], ACC)
        for c0 in range(0, n_classes, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_mask = cols < n_classes
            mask2 = row_mask[:, None] & col_mask[None, :]
            xb = tl.load(x_rows[:, None] + cols[None, :], mask=mask2, other=0.0).to(ACC)
            if SMOOTHING:
                if HAS_WEIGHT:
                    wc = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC)
                else:
                    wc = tl.where(col_mask, 1.0, 0.0).to(ACC)
                smooth += tl.sum(tl.where(mask2, wc[None, :] * (lse[:, None] - xb), 0.0), axis=1)
            if GRAD:
                g = tl.exp((xb - m[:, None]) - log_s[:, None]) * coef[:, None]
                g = g - tl.where(cols[None, :] == y_safe[:, None], hard[:, None], 0.0)  # other rows: zeroed or NaN
                if SMOOTHING:
                    g = g - eps_c * wc[None, :]
                g = tl.where(active[:, None], g, 0.0)
                tl.store(g_ptr + rows[:, None] * n_classes + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=mask2)
        if SMOOTHING:
            loss = (1.0 - smoothing) * loss + eps_c * smooth
    loss = tl.where(active, loss, 0.0)
    loss = tl.where(bad, float("nan"), loss)

    if REDUCTION == 0:
        tl.store(out_ptr + rows, loss.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        tl.store(out_ptr + pid, tl.sum(loss, axis=0))
        tl.store(out_ptr + tl.num_programs(0) + pid, tl.sum(w_y, axis=0))


@triton.jit
def _ce_finalize_kernel(partial_ptr, out_ptr, scale_ptr, num_partials, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum(loss partials); for MEAN, out /= sum(weight partials) and scale = the factor
    backward applies to the saved gradients (0 when every row is ignored: PyTorch's zero grads)."""
    offs = tl.arange(0, BLOCK)
    loss_acc = tl.zeros([BLOCK], partial_ptr.dtype.element_ty)
    weight_acc = tl.zeros([BLOCK], partial_ptr.dtype.element_ty)
    for start in range(0, num_partials, BLOCK):
        mask = start + offs < num_partials
        loss_acc += tl.load(partial_ptr + start + offs, mask=mask, other=0.0)
        weight_acc += tl.load(partial_ptr + num_partials + start + offs, mask=mask, other=0.0)
    total = tl.sum(loss_acc, axis=0)
    if MEAN:
        weight_total = tl.sum(weight_acc, axis=0)
        none_left = weight_total == 0.0  # every row ignored
        scale = tl.where(none_left, 0.0, 1.0 / tl.where(none_left, 1.0, weight_total))
        total = tl.where(none_left, float("nan"), total * scale)
        tl.store(scale_ptr, scale.to(scale_ptr.dtype.element_ty))
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


# --------------------------------------------------------------------------- host launchers
# Chunk widths along C: powers of 4, so few variants need compiling; whole small rows, many per
# program (BLOCK_N = TILE // BLOCK_C), and big rows one per program in chunks of 4096.
BLOCK_C_CHOICES = (16, 64, 256, 1024, 4096)


def block_sizes(n_classes: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) for rows of n_classes logits."""
    block_c = next((b for b in BLOCK_C_CHOICES if b >= n_classes), BLOCK_C_CHOICES[-1])
    return max(1, TILE // block_c), block_c, 4


def cross_entropy_forward(x, y, weight, ignore_index: int, reduction: str, smoothing: float, grad: bool):
    """x [N, C] (unit stride along C), y [N] int64. Returns (loss, saved gradient [N, C] or None,
    scale for backward: a 0-d tensor for 'mean' (1 / sum of weights), else None)."""
    n_rows, n_classes = x.shape
    g = torch.empty((n_rows, n_classes), dtype=x.dtype, device=x.device) if grad else None
    code = REDUCTION_CODES[reduction]
    if n_rows == 0:  # PyTorch: none -> empty, mean -> nan, sum -> 0; nothing to launch
        loss = x.new_empty(0) if code == 0 else x.new_full((), math.nan if code == 1 else 0.0)
        return loss, g, (x.new_zeros((), dtype=acc_dtype(x.dtype)) if code == 1 else None)
    block_n, block_c, num_warps = block_sizes(n_classes)
    programs = triton.cdiv(n_rows, block_n)
    out = x.new_empty(n_rows) if code == 0 else torch.empty(2 * programs, dtype=acc_dtype(x.dtype), device=x.device)
    wrap_triton(_ce_fwd_kernel)[(programs,)](
        x, y, weight if weight is not None else x, out, g if g is not None else x,
        n_rows, n_classes, x.stride(0), ignore_index, smoothing,
        HAS_WEIGHT=weight is not None, SMOOTHING=smoothing > 0.0, REDUCTION=code, GRAD=grad,
        ACC=tl_acc(x.dtype), BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps,
    )
    if code == 0:
        return out, g, None
    loss = torch.empty((), dtype=x.dtype, device=x.device)
    scale = torch.empty((), dtype=acc_dtype(x.dtype), device=x.device)
    wrap_triton(_ce_finalize_kernel)[(1,)](out, loss, scale, programs, MEAN=code == 1, BLOCK=REDUCE_BLOCK, num_warps=4)
    return loss, g, (scale if code == 1 else None)


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


# --------------------------------------------------------------------------- registration
def _case(name, n, c, reduction="mean", weight=False, ignore=False, smoothing=0.0, ignore_index=-100, scale=3.0):
    def make(dtype, device):
        x = (torch.randn(n, c, device=device) * scale).to(dtype).requires_grad_()
        y = torch.randint(0, c, (n,), device=device)
        if ignore:
            y[::3] = ignore_index
        w = torch.rand(c, device=device, dtype=dtype) + 0.5 if weight else None
        return x, y, w, ignore_index, reduction, smoothing

    return Case(name, make)


def _bench(n, c, smoothing=0.0):
    def make(dtype, device):
        x = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
        return x, torch.randint(0, c, (n,), device=device), None, -100, "mean", smoothing

    return Case(f"N={n} C={c}" + (f" smoothing={smoothing}" if smoothing else ""), make)


def _bytes(args):
    x, y, w, _, reduction, _ = args
    # read logits (once from HBM: the second pass of a row hits L2) and targets; write the gradient
    weight_bytes = w.numel() * w.element_size() if w is not None else 0
    return x.numel() * x.element_size() * (1 + x.requires_grad) + y.numel() * 8 + weight_bytes


def _variants():
    variants = []
    for block_c in BLOCK_C_CHOICES:
        block_n, _, num_warps = block_sizes(block_c)
        for dtype in (torch.float32, torch.bfloat16):
            ptr = triton_dtype(dtype)
            variants.append(CompileVariant(
                f"ce-{str(dtype)[6:]}-BN{block_n}-BC{block_c}", _ce_fwd_kernel,
                {"x_ptr": ptr, "y_ptr": "*i64", "w_ptr": ptr, "out_ptr": "*fp32", "g_ptr": ptr, "n_rows": "i32",
                 "n_classes": "i32", "stride_xn": "i64", "ignore_index": "i64", "smoothing": "fp32",
                 "HAS_WEIGHT": "constexpr", "SMOOTHING": "constexpr", "REDUCTION": "constexpr", "GRAD": "constexpr",
                 "ACC": "constexpr", "BLOCK_N": "constexpr", "BLOCK_C": "constexpr"},
                {"HAS_WEIGHT": True, "SMOOTHING": True, "REDUCTION": 1, "GRAD": True, "ACC": tl.float32,
                 "BLOCK_N": block_n, "BLOCK_C": block_c},
                num_warps=num_warps,
            ))
    for out in ("fp32", "bf16"):
        variants.append(CompileVariant(
            f"ce_finalize-{out}", _ce_finalize_kernel,
            {"partial_ptr": "*fp32", "out_ptr": f"*{out}", "scale_ptr": "*fp32", "num_partials": "i32",
             "MEAN": "constexpr", "BLOCK": "constexpr"},
            {"MEAN": True, "BLOCK": REDUCE_BLOCK}, num_warps=4,
        ))
    return variants


SPEC = register(KernelSpec(
    op="cross_entropy",
    triton=cross_entropy,
    unsupported=unsupported,
    cases=[
        _case("[37,5] mean", 37, 5),
        _case("[64,1000] sum weight", 64, 1000, "sum", weight=True),
        _case("[37,5000] mean ignore smoothing=0.1", 37, 5000, "mean", ignore=True, smoothing=0.1),
        _case("[37,10] mean weight ignore=3 smoothing=0.2", 37, 10, "mean", weight=True, ignore=True,
              smoothing=0.2, ignore_index=3),
        _case("[37,17] none weight ignore extreme", 37, 17, "none", weight=True, ignore=True, scale=300.0),
    ],
    gradcheck_case=_case("[5,7] mean weight ignore smoothing", 5, 7, "mean", weight=True, ignore=True, smoothing=0.3),
    tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)},
    compile_variants=_variants,
    bench_cases=[_bench(8192, 32000), _bench(8192, 32000, 0.1), _bench(65536, 1000)],
    flops=None,
    bytes_moved=_bytes,
    description="softmax cross-entropy [N, C] with int64 targets: online logsumexp and gradient in one launch",
))
