"""Triton kernels of binary cross-entropy on logits and of the two GAN losses built from it.

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

import triton
import triton.language as tl

# One config for every launch (no autotuning): memory-bound elementwise work saturates HBM with
# 4096 elements per program and 8 warps (16 elements per thread); big blocks also keep the
# interpreter's program count small.
BLOCK = 4096
NUM_WARPS = 8
TILED_MAX_BLOCK_C = 1024  # the tiled kernel's widest tile along the last dim (BLOCK // it rows)


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

    MODE "same": the operand has the input's layout (offset = idx). "strided": the operand is a strided
    view of (up to) three coalesced dims of sizes (size0, size1, size2) with strides (s0, s1, s2),
    size0 implied; zero strides broadcast."""
    if MODE == "same":
        off = idx
    else:
        i2 = idx % size2
        rest = idx // size2
        off = (rest // size1) * s0 + (rest % size1) * s1 + i2 * s2
    return off


# --------------------------------------------------------------------------- kernels
@triton.jit
def _bce_loss_and_grads(x, t, w, pw, idx, mask, pid, n, out_ptr, gx_ptr, gt_ptr,
                        HAS_W: tl.constexpr, HAS_PW: tl.constexpr, REDUCTION: tl.constexpr,
                        GRAD_X: tl.constexpr, GRAD_T: tl.constexpr, ACC: tl.constexpr):
    """The loss of the elements idx (a [BLOCK] or [BLOCK_R, BLOCK_C] tile; w and pw broadcast to it)
    stored per element or as this program's partial sum, and the saved gradients."""
    # softplus(x) and softplus(-x) share log1p(exp(-|x|)); the two sigmoids share exp(-|x|).
    common = log1p_exp_neg(tl.abs(x))
    sp_pos = tl.maximum(x, 0.0) + common
    sp_neg = tl.maximum(-x, 0.0) + common
    if HAS_PW:
        pt = pw * t
    else:
        pt = t
    loss = (1.0 - t) * sp_pos + pt * sp_neg
    if HAS_W:
        loss = loss * w

    if REDUCTION == "none":
        tl.store(out_ptr + idx, loss.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=None))

    if GRAD_X or GRAD_T:
        scale = tl.full(x.shape, 1.0, ACC)
        if HAS_W:
            scale = scale * w
        if REDUCTION == "mean":
            scale = scale / n  # mean: d(sum / n) / dx, divided in ACC precision
        if GRAD_X:
            z = tl.exp(-tl.abs(x))
            r = 1.0 / (1.0 + z)
            sig_pos = tl.where(x >= 0, r, z * r)  # sigmoid(x)
            sig_neg = tl.where(x >= 0, z * r, r)  # sigmoid(-x) = 1 - sigmoid(x), without cancellation
            gx = ((1.0 - t) * sig_pos - pt * sig_neg) * scale
            tl.store(gx_ptr + idx, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        if GRAD_T:
            if HAS_PW:
                gt = (pw * sp_neg - sp_pos) * scale
            else:
                gt = -x * scale  # sp(-x) - sp(x) = -x exactly
            tl.store(gt_ptr + idx, gt.to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bce_fwd_kernel(
    x_ptr, t_ptr, w_ptr, pw_ptr,  # input, target [n]; weight, pos_weight broadcast views
    out_ptr,  # [n] elementwise loss ("none") or [num_programs] partial sums
    gx_ptr, gt_ptr,  # [n] saved d loss / d input, d loss / d target (1/n included for mean)
    n,
    w_size1, w_size2, w_s0, w_s1, w_s2,
    pw_size1, pw_size2, pw_s0, pw_s1, pw_s2,
    W_MODE: tl.constexpr, PW_MODE: tl.constexpr,  # "absent", "same" (layout) or "strided" (view)
    REDUCTION: tl.constexpr,  # "none", "mean" or "sum"
    GRAD_X: tl.constexpr, GRAD_T: tl.constexpr,
    ACC: tl.constexpr,  # fp32, or fp64 for float64 inputs (so gradcheck sees exact numbers)
    INDEX_64: tl.constexpr,  # numel may pass 2**31
    BLOCK: tl.constexpr,
):
    """Flat blocks of BLOCK elements; weight and pos_weight read per element (by their layout or
    through their broadcast strides)."""
    pid = tl.program_id(0)
    if INDEX_64:
        idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC)
    t = tl.load(t_ptr + idx, mask=mask, other=0.0).to(ACC)
    w = x  # placeholders when absent (never read)
    pw = x
    if PW_MODE != "absent":
        pw = tl.load(pw_ptr + broadcast_offsets(idx, pw_size1, pw_size2, pw_s0, pw_s1, pw_s2, PW_MODE),
                     mask=mask, other=0.0).to(ACC)
    if W_MODE != "absent":
        w = tl.load(w_ptr + broadcast_offsets(idx, w_size1, w_size2, w_s0, w_s1, w_s2, W_MODE),
                    mask=mask, other=0.0).to(ACC)
    _bce_loss_and_grads(x, t, w, pw, idx, mask, pid, n, out_ptr, gx_ptr, gt_ptr, W_MODE != "absent",
                        PW_MODE != "absent", REDUCTION, GRAD_X, GRAD_T, ACC)


@triton.jit
def _operand_tile(ptr, rows, cols, row_ok, col_ok, idx, mask, size1, s0, s1, s_col, MODE: tl.constexpr,
                  ACC: tl.constexpr):
    """weight or pos_weight for a [BLOCK_R, BLOCK_C] tile of the input seen as [rows, last dim]:
    "row" (it varies with the row only: one load per row, offset (row // size1) * s0 + (row % size1)
    * s1), "col" (with the last dim only: one load per column, offset col * s_col), or "same" (the
    input's layout)."""
    if MODE == "row":
        v = tl.load(ptr + (rows // size1) * s0 + (rows % size1) * s1, mask=row_ok, other=0.0).to(ACC)[:, None]
    elif MODE == "col":
        v = tl.load(ptr + cols * s_col, mask=col_ok, other=0.0).to(ACC)[None, :]
    else:
        v = tl.load(ptr + idx, mask=mask, other=0.0).to(ACC)
    return v


@triton.jit
def _bce_tiled_kernel(
    x_ptr, t_ptr, w_ptr, pw_ptr,  # input, target [R, C] contiguous; weight, pos_weight (see _operand_tile)
    out_ptr, gx_ptr, gt_ptr,  # as _bce_fwd_kernel's
    n_rows, n_cols, n,  # n = n_rows * n_cols
    w_size1, w_s0, w_s1, w_s_col, pw_size1, pw_s0, pw_s1, pw_s_col,
    W_MODE: tl.constexpr, PW_MODE: tl.constexpr,  # "absent", "row", "col" or "same"
    REDUCTION: tl.constexpr, GRAD_X: tl.constexpr, GRAD_T: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """[BLOCK_R, BLOCK_C] tiles of the input seen as [rows, last dim], for weights broadcast per row
    ([N, 1]) or per class ([C]): each weight is loaded once per tile row or column, not once per
    element. Grid: row blocks x column blocks, column blocks fastest."""
    pid = tl.program_id(0)
    n_cblocks = tl.cdiv(n_cols, BLOCK_C)
    rows = (pid // n_cblocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    idx = rows[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC)
    t = tl.load(t_ptr + idx, mask=mask, other=0.0).to(ACC)
    w = x  # placeholders when absent (never read)
    pw = x
    if W_MODE != "absent":
        w = _operand_tile(w_ptr, rows, cols, row_ok, col_ok, idx, mask, w_size1, w_s0, w_s1, w_s_col, W_MODE, ACC)
    if PW_MODE != "absent":
        pw = _operand_tile(pw_ptr, rows, cols, row_ok, col_ok, idx, mask, pw_size1, pw_s0, pw_s1, pw_s_col,
                           PW_MODE, ACC)
    _bce_loss_and_grads(x, t, w, pw, idx, mask, pid, n, out_ptr, gx_ptr, gt_ptr, W_MODE != "absent",
                        PW_MODE != "absent", REDUCTION, GRAD_X, GRAD_T, ACC)


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
