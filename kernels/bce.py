"""Fused binary cross-entropy on logits, and the two GAN losses built from it.

    binary_cross_entropy_with_logits(input, target, weight, reduction, pos_weight)
    gan_discriminator_loss(real_logits, fake_logits)   mean softplus(-real) + mean softplus(fake)
    gan_generator_loss(fake_logits)                     mean softplus(-fake)  (non-saturating)

One kernel launch computes the loss (per element, or one partial sum per program) together with
d loss / d input (and d loss / d target when the target requires grad). The gradients are saved,
so backward is a single multiply by grad_output. Reductions are deterministic: every program
writes its partial sum, and a one-program kernel adds the partials in a fixed order (no atomics).

Numerics. With sp(x) = softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|):
    loss      = w * ((1 - t) * sp(x) + p * t * sp(-x))        p = pos_weight (1 if absent)
    dloss/dx  = w * ((1 - t) * sigmoid(x) - p * t * sigmoid(-x))
    dloss/dt  = w * (p * sp(-x) - sp(x))                     (= -w * x without pos_weight)
This is PyTorch's (1 - t) x + (1 + (p - 1) t) sp(-x) rewritten with sp(x) = x + sp(-x): every term
is non-negative for t in [0, 1], so nothing cancels, and only exp(-|x|) is ever evaluated, so any
logit (+-1000 included) gives finite, exact results.
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

# One config for every launch (no autotuning): memory-bound elementwise work saturates HBM with
# 4096 elements per program and 8 warps (16 elements per thread); big blocks also keep the
# interpreter's program count small.
BLOCK = 4096
NUM_WARPS = 8


# --------------------------------------------------------------------------- @triton.jit helpers
@triton.jit
def log1p_exp_neg(a):
    """log(1 + exp(-a)) for a >= 0, accurate to a few ulps even when exp(-a) is tiny.

    log(u) * z / (u - 1) with u = 1 + z cancels the rounding of 1 + z (Goldberg's log1p trick);
    when u rounds to 1, log1p(z) = z to working precision."""
    z = tl.exp(-a)
    u = 1.0 + z
    is_one = u == 1.0
    return tl.where(is_one, z, tl.log(u) * (z / tl.where(is_one, 1.0, u - 1.0)))


@triton.jit
def broadcast_offsets(idx, size1, size2, s0, s1, s2, MODE: tl.constexpr):
    """Element offsets of an operand broadcast over a contiguous input, by flat input index.

    MODE 1: the operand has the input's layout (offset = idx). MODE 2: the operand is a strided
    view of (up to) three coalesced dims of sizes (size0, size1, size2) with strides (s0, s1, s2),
    size0 implied; zero strides broadcast."""
    if MODE == 1:
        off = idx
    else:
        i2 = idx % size2
        rest = idx // size2
        off = (rest // size1) * s0 + (rest % size1) * s1 + i2 * s2
    return off


# --------------------------------------------------------------------------- kernels
@triton.jit
def _bce_fwd_kernel(
    x_ptr, t_ptr, w_ptr, pw_ptr,  # input, target [n]; weight, pos_weight broadcast views
    out_ptr,  # [n] elementwise loss (REDUCTION 0) or [num_programs] partial sums
    gx_ptr, gt_ptr,  # [n] saved d loss / d input, d loss / d target (1/n included for mean)
    n,
    w_size1, w_size2, w_s0, w_s1, w_s2,
    pw_size1, pw_size2, pw_s0, pw_s1, pw_s2,
    W_MODE: tl.constexpr, PW_MODE: tl.constexpr,  # 0 absent, 1 same layout, 2 broadcast view
    REDUCTION: tl.constexpr,  # 0 none, 1 mean, 2 sum
    GRAD_X: tl.constexpr, GRAD_T: tl.constexpr,
    ACC: tl.constexpr,  # fp32, or fp64 for float64 inputs (so gradcheck sees exact numbers)
    INDEX_64: tl.constexpr,  # numel may pass 2**31
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INDEX_64:
        idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC)
    t = tl.load(t_ptr + idx, mask=mask, other=0.0).to(ACC)

    # softplus(x) and softplus(-x) share log1p(exp(-|x|)); the two sigmoids share exp(-|x|).
    common = log1p_exp_neg(tl.abs(x))
    sp_pos = tl.maximum(x, 0.0) + common
    sp_neg = tl.maximum(-x, 0.0) + common
    if PW_MODE != 0:
        pw = tl.load(pw_ptr + broadcast_offsets(idx, pw_size1, pw_size2, pw_s0, pw_s1, pw_s2, PW_MODE),
                     mask=mask, other=0.0).to(ACC)
        pt = pw * t
    else:
        pt = t
    loss = (1.0 - t) * sp_pos + pt * sp_neg
    if W_MODE != 0:
        w = tl.load(w_ptr + broadcast_offsets(idx, w_size1, w_size2, w_s0, w_s1, w_s2, W_MODE),
                    mask=mask, other=0.0).to(ACC)
        loss = loss * w

    if REDUCTION == 0:
        tl.store(out_ptr + idx, loss.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))

    if GRAD_X or GRAD_T:
        scale = tl.full([BLOCK], 1.0, ACC)
        if W_MODE != 0:
            scale = scale * w
        if REDUCTION == 1:
            scale = scale / n  # mean: d(sum / n) / dx, divided in ACC precision
        if GRAD_X:
            z = tl.exp(-tl.abs(x))
            r = 1.0 / (1.0 + z)
            sig_pos = tl.where(x >= 0, r, z * r)  # sigmoid(x)
            sig_neg = tl.where(x >= 0, z * r, r)  # sigmoid(-x) = 1 - sigmoid(x), without cancellation
            gx = ((1.0 - t) * sig_pos - pt * sig_neg) * scale
            tl.store(gx_ptr + idx, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        if GRAD_T:
            if PW_MODE != 0:
                gt = (pw * sp_neg - sp_pos) * scale
            else:
                gt = -x * scale  # sp(-x) - sp(x) = -x exactly
            tl.store(gt_ptr + idx, gt.to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softplus_half(x_ptr, g_ptr, partial_ptr, block_id, n, SIGN: tl.constexpr, GRAD: tl.constexpr,
                   ACC: tl.constexpr, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
    """One block of mean(softplus(SIGN * x)): writes its partial sum (already / n) and, if GRAD,
    d/dx = SIGN * sigmoid(SIGN * x) / n."""
    if INDEX_64:
        idx = block_id.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        idx = block_id * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    y = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC) * SIGN
    loss = tl.maximum(y, 0.0) + log1p_exp_neg(tl.abs(y))
    tl.store(partial_ptr, tl.sum(tl.where(mask, loss, 0.0), axis=0) / n)
    if GRAD:
        z = tl.exp(-tl.abs(y))
        r = 1.0 / (1.0 + z)
        g = tl.where(y >= 0, r, z * r) * (SIGN / n)
        tl.store(g_ptr + idx, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softplus_means_kernel(
    neg_ptr, pos_ptr,  # [n_neg], [n_pos] logits: the loss is mean sp(-neg) + mean sp(pos)
    partial_ptr,  # [num_programs] partial sums, each already divided by its half's size
    gneg_ptr, gpos_ptr,  # [n_neg], [n_pos] saved gradients
    n_neg, n_pos, neg_programs,
    GRAD_NEG: tl.constexpr, GRAD_POS: tl.constexpr,
    ACC: tl.constexpr, INDEX_64: tl.constexpr, BLOCK: tl.constexpr,
):
    # One grid over both tensors: the first neg_programs programs take neg, the rest take pos.
    pid = tl.program_id(0)
    if pid < neg_programs:
        _softplus_half(neg_ptr, gneg_ptr, partial_ptr + pid, pid, n_neg, -1.0, GRAD_NEG, ACC, INDEX_64, BLOCK)
    else:
        _softplus_half(pos_ptr, gpos_ptr, partial_ptr + pid, pid - neg_programs, n_pos, 1.0, GRAD_POS, ACC,
                       INDEX_64, BLOCK)


# --------------------------------------------------------------------------- host launchers
def _broadcast_view(t: torch.Tensor | None, shape: torch.Size):
    """How a kernel reads `t` broadcast to the contiguous `shape`: (mode, tensor, sizes, strides).

    The expanded view is coalesced (adjacent dims merged where their strides allow), so common
    cases (full shape, per-class [C], per-row [N, 1], scalar) need no copy. More than three
    coalesced dims is materialized with expand().contiguous()."""
    if t is None:
        return 0, None, (1, 1), (0, 0, 0)
    dims = []
    for size, stride in zip(shape, t.expand(shape).stride()):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if len(dims) == 1 and dims[0][1] == 1:
        return 1, t, (1, 1), (0, 0, 0)
    if len(dims) > 3:
        return 1, t.expand(shape).contiguous(), (1, 1), (0, 0, 0)
    dims = [(1, 0)] * (3 - len(dims)) + dims
    return 2, t, (dims[1][0], dims[2][0]), tuple(d[1] for d in dims)


def bce_forward(x, t, weight, pos_weight, reduction: str, grad_x: bool, grad_t: bool):
    """Launch the fused kernel. x, t contiguous [n...]; returns (loss, saved grad_x or None,
    saved grad_t or None), the saved gradients already scaled by 1/n for 'mean'."""
    n = x.numel()
    gx = torch.empty_like(x) if grad_x else None
    gt = torch.empty_like(t) if grad_t else None
    if n == 0:  # PyTorch: none -> empty, mean -> nan, sum -> 0; nothing to launch
        loss = torch.empty_like(x) if reduction == "none" else empty_reduction(reduction, x)
        return loss, gx, gt
    w_mode, w, w_sizes, w_strides = _broadcast_view(weight, x.shape)
    pw_mode, pw, pw_sizes, pw_strides = _broadcast_view(pos_weight, x.shape)
    programs = triton.cdiv(n, BLOCK)
    code = REDUCTION_CODES[reduction]
    out = torch.empty_like(x) if code == 0 else torch.empty(programs, dtype=acc_dtype(x.dtype), device=x.device)
    wrap_triton(_bce_fwd_kernel)[(programs,)](
        x, t, w if w is not None else x, pw if pw is not None else x, out,
        gx if gx is not None else x, gt if gt is not None else x, n,
        *w_sizes, *w_strides, *pw_sizes, *pw_strides,
        W_MODE=w_mode, PW_MODE=pw_mode, REDUCTION=code, GRAD_X=grad_x, GRAD_T=grad_t,
        ACC=tl_acc(x.dtype), INDEX_64=n > INT32_LIMIT - BLOCK, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    loss = out if code == 0 else sum_partials(out, x.dtype, n if code == 1 else None)
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


# --------------------------------------------------------------------------- registration
def _logits(shape, dtype, device, extreme=False):
    x = torch.randn(shape, device=device, dtype=torch.float32) * 3
    if extreme:  # every fourth logit is one of +-100, +-1000
        flat = x.view(-1)
        flat[::4] = torch.tensor([100.0, -100.0, 1000.0, -1000.0], device=device).repeat(flat[::4].numel() // 4 + 1)[
            : flat[::4].numel()
        ]
    return x.to(dtype)


def _bce_case(name, shape, reduction, weight_shape=None, pos_weight_shape=None, extreme=False, target_grad=False):
    def make(dtype, device):
        x = _logits(shape, dtype, device, extreme).requires_grad_()
        t = torch.rand(shape, device=device, dtype=dtype).requires_grad_(target_grad)
        w = torch.rand(weight_shape, device=device, dtype=dtype) + 0.5 if weight_shape is not None else None
        pw = torch.rand(pos_weight_shape, device=device, dtype=dtype) * 3 if pos_weight_shape is not None else None
        return x, t, w, reduction, pw

    return Case(name, make)


def _bce_bytes(args):
    x, t, w, reduction, pw = args
    nbytes = x.numel() * x.element_size() * (2 + (reduction == "none") + x.requires_grad + t.requires_grad)
    return nbytes + sum(a.numel() * a.element_size() for a in (w, pw) if a is not None)


def _bce_variants():
    variants = []
    for dtype in (torch.float32, torch.bfloat16):
        ptr = triton_dtype(dtype)
        for w_mode, pw_mode, reduction, index_64 in ((0, 0, 1, False), (2, 2, 0, False), (1, 2, 2, True)):
            name = f"bce-{str(dtype)[6:]}-w{w_mode}-pw{pw_mode}-red{reduction}-i{64 if index_64 else 32}-B{BLOCK}"
            variants.append(CompileVariant(
                name, _bce_fwd_kernel,
                {"x_ptr": ptr, "t_ptr": ptr, "w_ptr": ptr, "pw_ptr": ptr,
                 "out_ptr": ptr if reduction == 0 else "*fp32", "gx_ptr": ptr, "gt_ptr": ptr,
                 "n": "i64" if index_64 else "i32",
                 **{f"{p}_{k}": "i64" for p in ("w", "pw") for k in ("size1", "size2", "s0", "s1", "s2")},
                 "W_MODE": "constexpr", "PW_MODE": "constexpr", "REDUCTION": "constexpr", "GRAD_X": "constexpr",
                 "GRAD_T": "constexpr", "ACC": "constexpr", "INDEX_64": "constexpr", "BLOCK": "constexpr"},
                {"W_MODE": w_mode, "PW_MODE": pw_mode, "REDUCTION": reduction, "GRAD_X": True, "GRAD_T": True,
                 "ACC": tl.float32, "INDEX_64": index_64, "BLOCK": BLOCK},
                num_warps=NUM_WARPS,
            ))
    return variants + sum_partials_variants()


def _softplus_variants():
    variants = []
    for dtype in (torch.float32, torch.bfloat16):
        ptr = triton_dtype(dtype)
        for index_64 in (False, True):
            variants.append(CompileVariant(
                f"softplus_means-{str(dtype)[6:]}-i{64 if index_64 else 32}-B{BLOCK}", _softplus_means_kernel,
                {"neg_ptr": ptr, "pos_ptr": ptr, "partial_ptr": "*fp32", "gneg_ptr": ptr, "gpos_ptr": ptr,
                 "n_neg": "i64" if index_64 else "i32", "n_pos": "i64" if index_64 else "i32", "neg_programs": "i32",
                 "GRAD_NEG": "constexpr", "GRAD_POS": "constexpr", "ACC": "constexpr", "INDEX_64": "constexpr",
                 "BLOCK": "constexpr"},
                {"GRAD_NEG": True, "GRAD_POS": True, "ACC": tl.float32, "INDEX_64": index_64, "BLOCK": BLOCK},
                num_warps=NUM_WARPS,
            ))
    return variants + sum_partials_variants()


def _bench_bce(n, reduction="mean"):
    def make(dtype, device):
        x = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        return x, torch.rand(n, device=device, dtype=dtype), None, reduction, None

    return Case(f"n={n} {reduction}", make)


def _bench_bce_weighted(rows, cols):
    def make(dtype, device):
        x = torch.randn(rows, cols, device=device, dtype=dtype, requires_grad=True)
        t = torch.rand(rows, cols, device=device, dtype=dtype)
        return x, t, torch.rand(cols, device=device, dtype=dtype), "mean", torch.rand(cols, device=device, dtype=dtype)

    return Case(f"[{rows},{cols}] weight+pos_weight [C]", make)


TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}

SPEC = register(KernelSpec(
    op="binary_cross_entropy_with_logits",
    triton=binary_cross_entropy_with_logits,
    cases=[
        _bce_case("n=1000 sum", (1000,), "sum", target_grad=True),
        # extreme logits under 'mean': their sum (~3e5) would overflow float16 on the GPU run
        _bce_case("n=4097 mean extreme", (4097,), "mean", extreme=True),
        _bce_case("[37,5] none weight[5] pos_weight[5]", (37, 5), "none", (5,), (5,), target_grad=True),
        _bce_case("[37,5] mean weight[37,1] pos_weight[5] extreme", (37, 5), "mean", (37, 1), (5,), extreme=True),
        _bce_case("[3,7,11] sum weight[7,1] pos_weight[11]", (3, 7, 11), "sum", (7, 1), (11,), target_grad=True),
    ],
    gradcheck_case=_bce_case("[6,5] mean weight pos_weight", (6, 5), "mean", (5,), (5,), target_grad=True),
    tolerances=TOLERANCES,
    compile_variants=_bce_variants,
    bench_cases=[_bench_bce(2**24), _bench_bce(2**26), _bench_bce(2**24, "none"), _bench_bce_weighted(2**14, 2**10)],
    flops=None,
    bytes_moved=_bce_bytes,
    description="BCE on logits: loss and d/dinput (d/dtarget) in one launch; backward is one multiply",
))


def _gan_case(name, real_shape, fake_shape, extreme=False, real_grad=True):
    def make(dtype, device):
        return (_logits(real_shape, dtype, device, extreme).requires_grad_(real_grad),
                _logits(fake_shape, dtype, device, extreme).requires_grad_())

    return Case(name, make)


def _bench_gan(n):
    def make(dtype, device):
        return (torch.randn(n, device=device, dtype=dtype, requires_grad=True),
                torch.randn(n, device=device, dtype=dtype, requires_grad=True))

    return Case(f"real=fake={n}", make)


def _gan_bytes(args):
    # read every logit, write its saved gradient when it requires grad
    return sum(a.numel() * a.element_size() * (1 + a.requires_grad) for a in args)


GAN_D_SPEC = register(KernelSpec(
    op="gan_discriminator_loss",
    triton=gan_discriminator_loss,
    cases=[
        _gan_case("real=1000 fake=4097", (1000,), (4097,)),
        _gan_case("real[37,1] fake[5,3,2] extreme", (37, 1), (5, 3, 2), extreme=True),
        _gan_case("real frozen=[64] fake=[63]", (64,), (63,), real_grad=False),
    ],
    gradcheck_case=_gan_case("real[7] fake[5]", (7,), (5,)),
    tolerances=TOLERANCES,
    compile_variants=_softplus_variants,
    bench_cases=[_bench_gan(2**24), _bench_gan(2**25)],
    flops=None,
    bytes_moved=_gan_bytes,
    description="mean softplus(-real) + mean softplus(fake): both halves and their grads in one launch",
))


def _gen_case(name, shape, extreme=False):
    def make(dtype, device):
        return (_logits(shape, dtype, device, extreme).requires_grad_(),)

    return Case(name, make)


def _bench_gen(n):
    def make(dtype, device):
        return (torch.randn(n, device=device, dtype=dtype, requires_grad=True),)

    return Case(f"n={n}", make)


GAN_G_SPEC = register(KernelSpec(
    op="gan_generator_loss",
    triton=gan_generator_loss,
    cases=[_gen_case("n=4097", (4097,)), _gen_case("[37,5] extreme", (37, 5), extreme=True)],
    gradcheck_case=_gen_case("[9]", (9,)),
    tolerances=TOLERANCES,
    compile_variants=_softplus_variants,
    bench_cases=[_bench_gen(2**24), _bench_gen(2**26)],
    flops=None,
    bytes_moved=_gan_bytes,
    description="non-saturating generator loss mean softplus(-fake) and its grad in one launch",
))
