"""Softmax cross-entropy's Triton kernels, for logits [N, C] and int64 class indices [N].

_ce_fwd_kernel handles BLOCK_N rows per program: pass 1 streams the row in BLOCK_C chunks with an
online log-sum-exp (running max m and sum s of exp(x - m)); pass 2 streams it again (from L2 for
big rows) to write the gradient of the row's unnormalized loss and, with label smoothing, to add
the smoothing term. _ce_finalize_kernel adds the per-program partial sums in a fixed order.

Per row i with target y, weights w (1 without weight), W = sum_c w_c, eps = label_smoothing:
    loss_i = (1 - eps) w_y (lse - x_y) + eps / C * sum_c w_c (lse - x_c)
    d loss_i / d x_c = p_c ((1 - eps) w_y + eps W / C) - (1 - eps) w_y [c == y] - eps w_c / C
Rows whose target is ignore_index contribute 0; a target outside [0, C) that is not ignore_index
gives NaN (checking it on a GPU would cost a host sync). REDUCTION is the reduction's name.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Elements per program per step, BLOCK_N * BLOCK_C (4096 at BLOCK_C = 4096), on 4 warps: a 4096
# tile on 8 warps spills row values in some variants (see the audit).
TILE = 2048


@triton.jit
def _ce_fwd_kernel(
    x_ptr,  # [N, C] logits, unit stride along C
    y_ptr,  # [N] int64 targets
    w_ptr,  # [C] class weights (when HAS_WEIGHT)
    out_ptr,  # [N] row losses ("none"), else [2, num_programs]: loss partials, then weight partials
    g_ptr,  # [N, C] contiguous: saved d loss_i / d x (unnormalized for 'mean')
    n_rows, n_classes, stride_xn, ignore_index, smoothing,
    HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
    REDUCTION: tl.constexpr,  # "none", "mean" or "sum"
    GRAD: tl.constexpr,
    ACC: tl.constexpr,  # fp32, or fp64 for float64 logits
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,  # n_classes <= BLOCK_C: each row is read once and kept for pass 2
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
    if SINGLE_CHUNK:
        # The whole row in one tile: read once (x_y picked from it, no gather), kept for pass 2.
        cols = tl.arange(0, BLOCK_C)
        col_mask = cols < n_classes
        x_row = tl.load(x_rows[:, None] + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                        other=float("-inf")).to(ACC)
        x_y = tl.where(ok, tl.sum(tl.where(cols[None, :] == y_safe[:, None], x_row, 0.0), axis=1), 0.0)
        m = tl.maximum(m, tl.max(x_row, axis=1))
        s = tl.sum(tl.exp(x_row - m[:, None]), axis=1)
        if SMOOTHING and HAS_WEIGHT:
            w_row = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC)
            w_total = w_row
    else:
        x_y = tl.load(x_rows + y_safe, mask=ok, other=0.0).to(ACC)
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
            if SINGLE_CHUNK:
                xb = x_row  # -inf past the row's end: exp gives 0 there, and the sums below mask it
            else:
                xb = tl.load(x_rows[:, None] + cols[None, :], mask=mask2, other=0.0).to(ACC)
            if SMOOTHING:
                if HAS_WEIGHT and SINGLE_CHUNK:
                    wc = w_row
                elif HAS_WEIGHT:
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

    if REDUCTION == "none":
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


# --------------------------------------------------------------------------- launch shapes
# Chunk widths along C: powers of 4, so few variants need compiling; whole small rows, many per
# program (BLOCK_N = TILE // BLOCK_C), and big rows one per program.
BLOCK_C_CHOICES = (16, 64, 256, 1024, 4096, 16384)
WIDE_ROW_WARPS = 16  # a 16384-wide row kept in registers for pass 2: 32 values per thread on 16 warps


def block_sizes(n_classes: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) for rows of n_classes logits: rows up to 16384 classes are one
    chunk (read once); wider rows stream in 16384-wide chunks, read twice (the second pass from L2)."""
    block_c = next((b for b in BLOCK_C_CHOICES if b >= n_classes), BLOCK_C_CHOICES[-1])
    return max(1, TILE // block_c), block_c, 4 if block_c <= 4096 else WIDE_ROW_WARPS
