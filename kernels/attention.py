"""Flash attention: softmax(q kᵀ · scale + mask) v without ever forming the Lq x Lk matrix.

Structure of Triton's fused-attention tutorial (FlashAttention-2):
  forward   one program per (query block, batch*head); loops over key blocks with an online
            softmax in base 2 (scale*log2(e) folded into the scores) and saves the base-2
            log-sum-exp of every query row for the backward pass.
  backward  delta = rowsum(dO * O) (preprocess), then a dK/dV pass (one program per key block,
            looping over query blocks) and a dQ pass (one program per query block, looping over
            key blocks). Both recompute P = exp2(S - LSE) instead of storing it: O(L) memory.

Semantics of torch.nn.functional.scaled_dot_product_attention: causal masks are TOP-LEFT
aligned (query i sees keys j <= i, also when Lq != Lk); a bool mask keeps True entries; a float
mask is added to the scores; a query row whose every key is masked out gives a zero output row
and zero gradients, as PyTorch (2.5 and later) does for both bool and -inf float masks.

Shapes: query [B, H, Lq, D], key [B, H, Lk, D], value [B, H, Lk, D] (Dv == D), attn_mask None,
bool or float, expanded (zero strides allowed) to [B, H, Lq, Lk]; output [B, H, Lq, D].
Any strides are accepted for every tensor (e.g. q/k/v transposed from [B, L, H, D]).
`unsupported` names what the kernel does not run: dropout_p > 0, Dv != D, D > 128 and a float
mask that requires grad (gpudl.ops runs the PyTorch reference for those, warning once).

Custom ops: torch.ops.gpudl.scaled_dot_product_attention (q, k, v, mask, is_causal, scale) ->
(out, lse), and its backward op ..._backward -> (dq, dk, dv), computing only the gradients asked
for. The mask is read through its own strides (an expanded mask is never materialized).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import (
    SHARED_MEMORY_LIMIT,
    acc_dtype,
    fp32_matmul_allows_tf32,
    triton_dtype,
    tuning_configs,
)
from gpudl.kernels.registry import (
    Case,
    CompileVariant,
    KernelSpec,
    first_order_only,
    kernel_op,
    no_tensor,
    register,
)

OP = "scaled_dot_product_attention"
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


# --------------------------------------------------------------------------- kernels
@triton.jit
def _mask_scores(s, m_ptr, qi, kj, stride_mm, stride_mn, Lq, Lk,
                 MASK_KIND: tl.constexpr, CHECK: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Apply the user mask, the key bounds and the causal mask to base-2 scores `s`.

    qi, kj: query and key indices broadcastable to s's shape ([M, 1] x [1, N] in the forward
    and dQ passes, [1, M] x [N, 1] in the transposed dK/dV pass). CHECK switches on the bounds
    and causal tests; blocks that need neither skip them.
    """
    if MASK_KIND == 1:
        keep = tl.load(m_ptr + qi * stride_mm + kj * stride_mn, mask=(qi < Lq) & (kj < Lk), other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    elif MASK_KIND == 2:
        bias = tl.load(m_ptr + qi * stride_mm + kj * stride_mn, mask=(qi < Lq) & (kj < Lk), other=0.0)
        s = s + bias.to(s.dtype) * 1.4426950408889634  # natural-log units -> base 2
    if CHECK:
        ok = kj < Lk
        if IS_CAUSAL:
            ok = ok & (kj <= qi)  # top-left alignment, as torch's is_causal
        s = tl.where(ok, s, float("-inf"))
    return s


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, m_base, offs_m, offs_d, d_ok,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
               Lq, Lk, qk_scale, lo, hi,
               MASK_KIND: tl.constexpr, CHECK: tl.constexpr, IS_CAUSAL: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over the key blocks [lo, hi): acc [M, D] unnormalized output, l_i [M] row
    sums, m_i [M] running row maxima (base 2)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        kv_mask = (offs_n < Lk)[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = _mask_scores(s, m_base, offs_m[:, None], offs_n[None, :], stride_mm, stride_mn, Lq, Lk,
                         MASK_KIND, CHECK, IS_CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key yet has m_new = -inf; subtract 0 there so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION, out_dtype=acc.dtype)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, M, O, LSE,  # noqa: E741 - the math's names
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_mb, stride_mh, stride_mm, stride_mn,
              stride_ob, stride_oh, stride_om, stride_od,
              H, Lq, Lk, qk_scale, TUNE_LQ, TUNE_LK,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """O[b, h, i] = sum_j softmax_j(S[i, j]) V[b, h, j]; LSE[b*H + h, i] = log2 sum_j 2^S[i, j]
    (+inf for a row with no visible key). Grid: (batch*heads * query blocks,), query blocks
    fastest so neighbouring programs share K/V in L2 (and no 65535 limit on grid axis 1)."""
    ACC = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    n_mblocks = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // n_mblocks
    start_m = pid % n_mblocks
    b = bh // H
    h = bh % H
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    m_base = M + b * stride_mb + h * stride_mh

    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # the head dim is padded to a power of two >= 16
    q_mask = (offs_m < Lq)[:, None] & d_ok[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    # Key blocks [0, full_end) need no bounds or causal test; [full_end, hi) do. Causal rows of this
    # block see no key past m0 + BLOCK_M - 1, so later key blocks are skipped altogether.
    if IS_CAUSAL:
        hi = tl.minimum(Lk, m0 + BLOCK_M)
        full_end = tl.minimum((Lk // BLOCK_N) * BLOCK_N, ((m0 + 1) // BLOCK_N) * BLOCK_N)
    else:
        hi = Lk
        full_end = (Lk // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, m_base, offs_m, offs_d, d_ok,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                               Lq, Lk, qk_scale, 0, full_end, MASK_KIND, False, IS_CAUSAL, PRECISION, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, m_base, offs_m, offs_d, d_ok,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                               Lq, Lk, qk_scale, full_end, hi, MASK_KIND, True, IS_CAUSAL, PRECISION, BLOCK_N)

    # Rows that saw no key (all masked, or Lk == 0) have acc = 0 and l_i = 0: output 0, like torch.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_base = O + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=q_mask)
    # +inf makes the backward's exp2(S - LSE) exactly 0 on such rows.
    lse = tl.where(seen, m_i + tl.log2(l_safe), float("inf"))
    tl.store(LSE + bh * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _attn_bwd_preprocess(O, DO, Delta,  # noqa: E741 - the math's names
                         stride_ob, stride_oh, stride_om, stride_od,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         H, Lq,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta[b*H + h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] (the softmax-backward row term)."""
    ACC = tl.float64 if O.dtype.element_ty == tl.float64 else tl.float32
    n_mblocks = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // n_mblocks
    start_m = pid % n_mblocks
    b = bh // H
    h = bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(ACC)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(ACC)
    tl.store(Delta + bh * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, m_base, lse_base, delta_base, offs_n, offs_d, d_ok,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                Lq, Lk, qk_scale, lo, hi,
                MASK_KIND: tl.constexpr, CHECK: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dK, dV [N, D] of one key block over the query blocks [lo, hi), transposed:
    Pᵀ [N, M] = exp2(K Qᵀ · qk_scale - LSE), dV += Pᵀ dO, dSᵀ = Pᵀ (V dOᵀ - Delta), dK += dSᵀ Q."""
    n_ok = offs_n < Lk
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = (start_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = offs_m < Lq
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
        # Padding rows get LSE = +inf, so their probabilities are exactly 0.
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        s_t = _mask_scores(s_t, m_base, offs_m[None, :], offs_n[:, None], stride_mm, stride_mn, Lq, Lk,
                           MASK_KIND, CHECK, IS_CAUSAL)
        # Padding keys: their rows of dK/dV are never stored, but keep them finite anyway.
        s_t = tl.where(n_ok[:, None], s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=qd_mask, other=0.0)
        if COMPUTE_DV:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION, out_dtype=dv.dtype)
        if COMPUTE_DK:
            delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION, out_dtype=dk.dtype)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, M, DO, LSE, Delta, DK, DV,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_mb, stride_mh, stride_mm, stride_mn,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   H, Lq, Lk, qk_scale, sm_scale, TUNE_LQ, TUNE_LK,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   PRECISION: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV [B, H, Lk, D] (contiguous). One program per (key block, batch*head), key blocks fastest."""
    ACC = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    n_nblocks = tl.cdiv(Lk, BLOCK_N)
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // n_nblocks
    start_n = pid % n_nblocks
    b = bh // H
    h = bh % H
    n0 = start_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (offs_n < Lk)[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    m_base = M + b * stride_mb + h * stride_mh
    lse_base = LSE + bh * Lq
    delta_base = Delta + bh * Lq
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    if IS_CAUSAL:
        # Queries before n0 see none of these keys: start at the query block holding row n0. Query
        # blocks starting before the block's last key straddle the diagonal and need the causal test.
        lo = (n0 // BLOCK_M) * BLOCK_M
        diag_end = lo + tl.cdiv(n0 + BLOCK_N - 1 - lo, BLOCK_M) * BLOCK_M
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, m_base, lse_base, delta_base, offs_n, offs_d, d_ok,
                             stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                             Lq, Lk, qk_scale, lo, tl.minimum(diag_end, Lq),
                             MASK_KIND, True, IS_CAUSAL, PRECISION, COMPUTE_DK, COMPUTE_DV, BLOCK_M)
    else:
        diag_end = 0
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, m_base, lse_base, delta_base, offs_n, offs_d, d_ok,
                         stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                         Lq, Lk, qk_scale, diag_end, Lq,
                         MASK_KIND, False, IS_CAUSAL, PRECISION, COMPUTE_DK, COMPUTE_DV, BLOCK_M)
    # dK and dV are contiguous [B, H, Lk, D] buffers allocated by the launcher.
    out_offs = bh * Lk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    if COMPUTE_DK:
        tl.store(DK + out_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    if COMPUTE_DV:
        tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, m_base, offs_m, offs_d, d_ok,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
              Lq, Lk, qk_scale, lo, hi,
              MASK_KIND: tl.constexpr, CHECK: tl.constexpr, IS_CAUSAL: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ [M, D] of one query block over the key blocks [lo, hi):
    P = exp2(Q Kᵀ · qk_scale - LSE), dS = P (dO Vᵀ - Delta), dQ += dS K."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        kv_mask = (offs_n < Lk)[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = _mask_scores(s, m_base, offs_m[:, None], offs_n[None, :], stride_mm, stride_mn, Lq, Lk,
                         MASK_KIND, CHECK, IS_CAUSAL)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION, out_dtype=dq.dtype)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, M, DO, LSE, Delta, DQ,
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_mb, stride_mh, stride_mm, stride_mn,
                 stride_dob, stride_doh, stride_dom, stride_dod,
                 H, Lq, Lk, qk_scale, sm_scale, TUNE_LQ, TUNE_LK,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ [B, H, Lq, D] (contiguous). One program per (query block, batch*head), query blocks fastest."""
    ACC = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    n_mblocks = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // n_mblocks
    start_m = pid % n_mblocks
    b = bh // H
    h = bh % H
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < Lq
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=qd_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=qd_mask, other=0.0)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + bh * Lq + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    m_base = M + b * stride_mb + h * stride_mh
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    # Same key-block split as the forward pass.
    if IS_CAUSAL:
        hi = tl.minimum(Lk, m0 + BLOCK_M)
        full_end = tl.minimum((Lk // BLOCK_N) * BLOCK_N, ((m0 + 1) // BLOCK_N) * BLOCK_N)
    else:
        hi = Lk
        full_end = (Lk // BLOCK_N) * BLOCK_N
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, m_base, offs_m, offs_d, d_ok,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                   Lq, Lk, qk_scale, 0, full_end, MASK_KIND, False, IS_CAUSAL, PRECISION, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, m_base, offs_m, offs_d, d_ok,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                   Lq, Lk, qk_scale, full_end, hi, MASK_KIND, True, IS_CAUSAL, PRECISION, BLOCK_N)
    out_offs = bh * Lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_mask)


# --------------------------------------------------------------------------- launchers
# (BLOCK_M, BLOCK_N, num_warps, num_stages). The first entry of each table is the only one used
# under the interpreter (tuning_configs), with blocks small enough that the tiny test shapes span
# several blocks. On a GPU, half precision autotunes over the HALF entries that fit, float32 and
# float64 over the FP32 ones: each audited (gpudl.kernels.audit) for spills on sm_80 and sm_90 at
# head dims 64 and 128 (on sm_80, 4 warps spilled at d128 on 64x64 forward and 32x64 dK/dV tiles,
# and 32x128 dK/dV or 128x64 dQ tiles spilled even on 8).
INTERPRETER = {"fwd": (32, 16, 4, 2), "dkdv": (16, 32, 4, 2), "dq": (32, 16, 4, 2)}
HALF = {
    "fwd": [(64, 64, 8, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
    # dK/dV: BLOCK_N keys per program, BLOCK_M queries per loop step.
    "dkdv": [(32, 64, 8, 3), (64, 64, 8, 2), (16, 64, 4, 3), (32, 32, 4, 3)],
    # dQ: BLOCK_M queries per program, BLOCK_N keys per loop step.
    "dq": [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3)],
}
# float32 on FMA units (IEEE) holds its operand tiles in registers: bigger tiles than the
# interpreter's spilled at head dim 128, so they are for head dims up to 64 only.
FP32 = {
    "fwd": [(32, 16, 4, 2), (32, 32, 4, 2)],
    "dkdv": [(16, 32, 4, 2), (16, 64, 4, 2)],
    "dq": [(32, 16, 4, 2), (64, 16, 4, 2)],
}
FP32_D128 = {kind: table[:1] for kind, table in FP32.items()}
FWD_CONFIGS, DKDV_CONFIGS, DQ_CONFIGS = (
    list(dict.fromkeys([INTERPRETER[k], *HALF[k], *FP32[k]])) for k in ("fwd", "dkdv", "dq"))
PRE_BLOCK_M, PRE_WARPS = 64, 4
TUNE_KEY = ["TUNE_LQ", "TUNE_LK", "HEAD_DIM", "MASK_KIND", "IS_CAUSAL"]


def _smem_estimate(cfg, block_d: int, elem: int, per_program: str) -> int:
    """Rough estimate of one config's shared memory in bytes (the pipelined tiles of the looped
    operands plus the resident block), only to keep configs far from the limit out; compile_check
    measures the real figure of every kept config."""
    block_m, block_n, _, stages = cfg
    looped, resident = (block_n, block_m) if per_program == "query" else (block_m, block_n)
    return (2 * stages * looped + 2 * resident) * block_d * elem


def _candidates(kind: str, block_d: int, elem: int, per_program: str) -> list[tuple]:
    """The configs of kernel `kind` the autotuner may pick on a GPU for this padded head dim and
    element size."""
    table = HALF[kind] if elem == 2 else FP32[kind] if block_d <= 64 else FP32_D128[kind]
    limit = min(SHARED_MEMORY_LIMIT.values())
    return [c for c in table if _smem_estimate(c, block_d, elem, per_program) <= limit] or table[-1:]


def _configs(table) -> list[triton.Config]:
    return tuning_configs([triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                           for m, n, w, s in table])


def _pruner(kind: str, per_program: str):
    def prune(configs, named_args, **kwargs):
        keep = _candidates(kind, kwargs["BLOCK_D"], named_args["Q"].element_size(), per_program)
        # Under the interpreter the one config tried is INTERPRETER's: keep it.
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep] \
            or configs

    return prune


_attn_fwd_tuned = triton.autotune(_configs(FWD_CONFIGS), key=TUNE_KEY,
                                  prune_configs_by={"early_config_prune": _pruner("fwd", "query")})(_attn_fwd)
_attn_bwd_dkdv_tuned = triton.autotune(_configs(DKDV_CONFIGS), key=TUNE_KEY + ["COMPUTE_DK", "COMPUTE_DV"],
                                       prune_configs_by={"early_config_prune": _pruner("dkdv", "key")})(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(_configs(DQ_CONFIGS), key=TUNE_KEY,
                                     prune_configs_by={"early_config_prune": _pruner("dq", "query")})(_attn_bwd_dq)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    # float32 follows torch's own TF32 switch for matmuls (off by default: IEEE products, never
    # silently TF32); float64 is IEEE; half-precision inputs use the tensor cores whatever this says.
    if dtype == torch.float32:
        return "tf32" if fp32_matmul_allows_tf32() else "ieee"
    return "ieee" if dtype == torch.float64 else "tf32"


def _mask_args(mask, like):
    """(pointer, strides, kind) of the optional [B, H, Lq, Lk] mask; its zero strides are kept."""
    if mask is None:
        return like, (0, 0, 0, 0), MASK_NONE
    return mask, mask.stride(), MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT


def _common_meta(q, mask_kind, is_causal):
    head_dim = q.shape[-1]
    return dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), MASK_KIND=mask_kind, IS_CAUSAL=bool(is_causal),
                PRECISION=_precision(q.dtype))


def _tune_lengths(lq: int, lk: int) -> tuple[int, int]:
    # Autotune per power-of-two length bucket, not per exact length (variable-length batches).
    return triton.next_power_of_2(max(lq, 1)), triton.next_power_of_2(max(lk, 1))


def attention_forward(q, k, v, mask, is_causal: bool, scale: float):
    """q [B, H, Lq, D], k and v [B, H, Lk, D], mask None or [B, H, Lq, Lk] (any strides).
    Returns out [B, H, Lq, D] (contiguous, q's dtype) and lse [B*H, Lq] (base-2 log-sum-exp of
    the scaled scores, +inf on rows with no visible key)."""
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    out = torch.empty((batch, heads, lq, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch * heads, lq), dtype=acc_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse
    m_ptr, m_strides, mask_kind = _mask_args(mask, q)
    grid = lambda meta: (batch * heads * triton.cdiv(lq, meta["BLOCK_M"]),)  # noqa: E731
    wrap_triton(_attn_fwd_tuned)[grid](
        q, k, v, m_ptr, out, lse, *q.stride(), *k.stride(), *v.stride(), *m_strides, *out.stride(),
        heads, lq, lk, scale * LOG2E, *_tune_lengths(lq, lk), **_common_meta(q, mask_kind, is_causal))
    return out, lse


def attention_backward(do, q, k, v, out, lse, mask, is_causal: bool, scale: float, needs=(True, True, True)):
    """Gradients (dq, dk, dv) for dO [B, H, Lq, D] (any strides, zero strides included), each
    contiguous; an empty tensor for each input that `needs` leaves out."""
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    need_q, need_k, need_v = needs
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if need_q else no_tensor(q)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if need_k else no_tensor(k)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if need_v else no_tensor(v)
    if batch * heads == 0 or head_dim == 0:
        return dq, dk, dv
    if lq == 0:  # no query: nothing flows back
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty((batch * heads, lq), dtype=lse.dtype, device=q.device)
    m_ptr, m_strides, mask_kind = _mask_args(mask, q)
    meta = _common_meta(q, mask_kind, is_causal)
    wrap_triton(_attn_bwd_preprocess)[(batch * heads * triton.cdiv(lq, PRE_BLOCK_M),)](
        out, do, delta, *out.stride(), *do.stride(), heads, lq,
        HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=PRE_BLOCK_M, num_warps=PRE_WARPS)
    common = (*q.stride(), *k.stride(), *v.stride(), *m_strides, *do.stride(),
              heads, lq, lk, scale * LOG2E, scale, *_tune_lengths(lq, lk))
    if (need_k or need_v) and lk > 0:
        grid = lambda m: (batch * heads * triton.cdiv(lk, m["BLOCK_N"]),)  # noqa: E731
        # An output that is not wanted is never written; pass the other buffer as a placeholder.
        wrap_triton(_attn_bwd_dkdv_tuned)[grid](
            q, k, v, m_ptr, do, lse, delta, dk if need_k else dv, dv if need_v else dk, *common,
            COMPUTE_DK=need_k, COMPUTE_DV=need_v, **meta)
    if need_q:
        grid = lambda m: (batch * heads * triton.cdiv(lq, m["BLOCK_M"]),)  # noqa: E731
        wrap_triton(_attn_bwd_dq_tuned)[grid](q, k, v, m_ptr, do, lse, delta, dq, *common, **meta)
    return dq, dk, dv


# --------------------------------------------------------------------------- custom ops
@kernel_op(OP)
def _attention_op(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                  scale: float) -> tuple[Tensor, Tensor]:
    """(out [B, H, Lq, D] contiguous, lse [B*H, Lq] in the accumulator dtype, saved for backward)."""
    return attention_forward(query, key, value, attn_mask, is_causal, scale)


@_attention_op.register_fake
def _(query, key, value, attn_mask, is_causal, scale):
    batch, heads, lq, head_dim = query.shape
    return (query.new_empty((batch, heads, lq, head_dim)),
            query.new_empty((batch * heads, lq), dtype=acc_dtype(query.dtype)))


def _setup_attention(ctx, inputs, output):
    query, key, value, attn_mask, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, attn_mask)  # every gradient recomputes P from q, k (and v)
    ctx.is_causal, ctx.scale = is_causal, scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, grad_out, _grad_lse):
    query, key, value, out, lse, attn_mask = ctx.saved_tensors
    need_q, need_k, need_v, need_mask = ctx.needs_input_grad[:4]
    if need_mask:
        raise RuntimeError(f"torch.ops.gpudl.{OP} gives no gradient for attn_mask; gpudl.ops.{OP} runs the "
                           "PyTorch reference for a float mask that requires grad")
    if grad_out is None:
        return None, None, None, None, None, None
    dq, dk, dv = torch.ops.gpudl.scaled_dot_product_attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, ctx.is_causal, ctx.scale, need_q, need_k, need_v)
    return (dq if need_q else None), (dk if need_k else None), (dv if need_v else None), None, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_setup_attention)


@kernel_op(OP + "_backward")
def _attention_backward_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                           attn_mask: Optional[Tensor], is_causal: bool, scale: float, need_query: bool,
                           need_key: bool, need_value: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dquery, dkey, dvalue), each contiguous; an empty tensor for each one not asked for."""
    return attention_backward(grad_out, query, key, value, out, lse, attn_mask, is_causal, scale,
                              (need_query, need_key, need_value))


first_order_only(_attention_backward_op)


@_attention_backward_op.register_fake
def _(grad_out, query, key, value, out, lse, attn_mask, is_causal, scale, need_query, need_key, need_value):
    return (query.new_empty(query.shape if need_query else 0), key.new_empty(key.shape if need_key else 0),
            value.new_empty(value.shape if need_value else 0))


# --------------------------------------------------------------------------- public entry
def unsupported(query, key, value, attn_mask, dropout_p, is_causal, scale) -> str | None:
    """What the kernel does not run (gpudl.ops runs the reference instead, warning once)."""
    if dropout_p > 0.0:
        return "dropout_p > 0 is not implemented in the Triton kernel"
    if value.shape[-1] != query.shape[-1]:
        return "the value head dim Dv differs from the query/key head dim D"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head dims above {MAX_HEAD_DIM} are not supported by the Triton kernel"
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad and torch.is_grad_enabled():
        return "attn_mask requires grad; the Triton kernel gives no gradient for the mask"
    return None


def scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale):
    """Normalized signature of gpudl.reference.scaled_dot_product_attention.

    query [B, H, Lq, D]; key [B, H, Lk, D]; value [B, H, Lk, Dv]; attn_mask None, bool (True =
    attend) or float (added), expanded to [B, H, Lq, Lk] (zero strides welcome); dropout_p a
    float; is_causal a bool (top-left aligned); scale a float. Returns [B, H, Lq, Dv].
    Arguments `unsupported` names are an error here; gpudl.ops sends them to the reference.
    """
    if attn_mask is not None and is_causal:
        raise ValueError("pass either attn_mask or is_causal=True, not both (as in torch.nn.functional)")
    reason = unsupported(query, key, value, attn_mask, dropout_p, is_causal, scale)
    if reason is not None:
        raise ValueError(f"the Triton kernel cannot run this call ({reason}); gpudl.ops.{OP} runs the reference")
    return torch.ops.gpudl.scaled_dot_product_attention(query, key, value, attn_mask, bool(is_causal), float(scale))[0]


# --------------------------------------------------------------------------- registration
def _signature(kernel, dtype: torch.dtype, mask_kind: int, constexprs: dict) -> dict[str, str]:
    """Argument types of one compilation: tensors of `dtype`, fp32 (fp64) LSE/Delta, i32 ints."""
    ptr, stat = triton_dtype(dtype), triton_dtype(acc_dtype(dtype))
    mask_ptr = {MASK_NONE: ptr, MASK_BOOL: "*i1", MASK_FLOAT: ptr}[mask_kind]
    types = {"M": mask_ptr, "LSE": stat, "Delta": stat, "qk_scale": "fp32", "sm_scale": "fp32"}
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            sig[name] = ptr
        else:
            sig[name] = "i32"
    return sig


def _variants_of(kernel, label, kind, dtype, head_dim, mask_kind=MASK_NONE, causal=False, extra=None,
                 per_program="query", configs=None, precision=None):
    """Compile variants of `kernel` for the candidates of `kind` (or `configs`)."""
    variants = []
    block_d = _block_d(head_dim)
    if configs is None:
        configs = _candidates(kind, block_d, torch.tensor([], dtype=dtype).element_size(), per_program)
    precision = precision or _precision(dtype)
    for cfg in configs:
        block_m, block_n, warps, stages = cfg
        # Contiguous inputs: the head-dim strides are 1, which Triton specializes as a constant.
        constexprs = {n: 1 for n in kernel.arg_names if n.startswith("stride_") and n.endswith("d")}
        constexprs.update(HEAD_DIM=head_dim, BLOCK_D=block_d, MASK_KIND=mask_kind, IS_CAUSAL=causal,
                          PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, **(extra or {}))
        constexprs = {n: c for n, c in constexprs.items() if n in kernel.arg_names}
        name = f"{label}_{str(dtype)[6:]}{'_tf32' if precision == 'tf32' and dtype == torch.float32 else ''}"
        name += f"_d{head_dim}_m{block_m}_n{block_n}_w{warps}_s{stages}"
        name += {MASK_NONE: "", MASK_BOOL: "_boolmask", MASK_FLOAT: "_floatmask"}[mask_kind]
        name += "_causal" if causal else ""
        signature = _signature(kernel, dtype, mask_kind, constexprs)
        variants.append(CompileVariant(name, kernel, signature, constexprs, warps, stages))
    return variants


def compile_variants() -> list[CompileVariant]:
    """Every config the autotuner may pick on a GPU (_candidates) for the forward, dK/dV and dQ
    kernels, and the preprocess kernel, in float32 (IEEE; TF32 at head dim 128) and bfloat16 for
    head dims 64 and 128; plus the causal, bool-mask and float-mask code paths (bfloat16, head
    dim 64: every dK/dV and dQ candidate where the audit found spills before, else the first)."""
    out = []
    both = {"COMPUTE_DK": True, "COMPUTE_DV": True}
    pre = [(PRE_BLOCK_M, 0, PRE_WARPS, 1)]
    for dtype in (torch.float32, torch.bfloat16):
        for head_dim in (64, 128):
            precisions = ["ieee", "tf32"] if dtype == torch.float32 and head_dim == 128 else [None]
            for precision in precisions:
                out += _variants_of(_attn_fwd, "fwd", "fwd", dtype, head_dim, precision=precision)
                out += _variants_of(_attn_bwd_dkdv, "dkdv", "dkdv", dtype, head_dim, extra=both, per_program="key",
                                    precision=precision)
                out += _variants_of(_attn_bwd_dq, "dq", "dq", dtype, head_dim, precision=precision)
            out += _variants_of(_attn_bwd_preprocess, "pre", "pre", dtype, head_dim, configs=pre)
    bf16 = torch.bfloat16
    out += _variants_of(_attn_fwd, "fwd", "fwd", bf16, 64, MASK_BOOL, configs=HALF["fwd"][:1])
    out += _variants_of(_attn_fwd, "fwd", "fwd", bf16, 64, MASK_NONE, True, configs=HALF["fwd"][:1])
    out += _variants_of(_attn_bwd_dkdv, "dkdv", "dkdv", bf16, 64, MASK_NONE, True, both, "key")
    out += _variants_of(_attn_bwd_dq, "dq", "dq", bf16, 64, MASK_NONE, True, configs=HALF["dq"][:1])
    out += _variants_of(_attn_bwd_dq, "dq", "dq", bf16, 64, MASK_FLOAT)
    return out


def _qkv(batch, heads, lq, lk, head_dim, dtype, device, grad=True, layout="bhld"):
    """Random q [B, H, Lq, D], k and v [B, H, Lk, D]; layout "blhd" makes them transposed views of
    [B, L, H, D] tensors (non-contiguous), as multi-head attention produces them."""
    def make(length):
        if layout == "blhd":
            t = torch.randn(batch, length, heads, head_dim, dtype=dtype, device=device).transpose(1, 2)
        else:
            t = torch.randn(batch, heads, length, head_dim, dtype=dtype, device=device)
        return t.requires_grad_(grad)

    return make(lq), make(lk), make(lk)


def _case(name, batch, heads, lq, lk, head_dim, causal=False, mask=None, scale=None, layout="bhld"):
    """mask: None, "bool" or "float": a [B, 1, Lq, Lk] mask expanded over heads (zero stride),
    with row 1 fully masked out, to check that rows with no visible key match torch."""

    def make(dtype, device):
        q, k, v = _qkv(batch, heads, lq, lk, head_dim, dtype, device, layout=layout)
        m = None
        if mask is not None:
            keep = torch.rand(batch, 1, lq, lk, device=device) > 0.3
            keep[:, :, 1] = False
            if mask == "bool":
                m = keep
            else:
                m = torch.randn(batch, 1, lq, lk, dtype=dtype, device=device).masked_fill(~keep, float("-inf"))
            m = m.expand(batch, heads, lq, lk)
        return q, k, v, m, 0.0, causal, scale if scale is not None else 1.0 / math.sqrt(head_dim)

    return Case(name, make)


def _flops(args) -> float:
    q, k, _, _, _, is_causal, _ = args
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    # Visible (query, key) pairs: all of them, or sum_i min(i + 1, Lk) with top-left causal masking.
    pairs = lq * lk
    if is_causal:
        full = max(lq - lk, 0)  # rows i >= Lk see every key
        diag = lq - full
        pairs = diag * (diag + 1) // 2 + full * lk
    return 4.0 * batch * heads * pairs * head_dim  # two matmuls, 2 flops per multiply-add


def _bytes(args) -> float:
    q, k, v = args[:3]
    out = q.numel() // q.shape[-1] * v.shape[-1]
    return float((q.numel() + k.numel() + v.numel() + out) * q.element_size())


def _torch_sdpa_with(backend_name):
    """torch's SDPA pinned to one backend, with the normalized arguments (a benchmark baseline)."""

    def run(query, key, value, attn_mask, dropout_p, is_causal, scale):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale)

    run.__name__ = f"torch_sdpa_{backend_name.lower()}"
    return run


SPEC = register(
    KernelSpec(
        op=OP,
        triton=scaled_dot_product_attention,
        unsupported=unsupported,
        cases=[
            _case("regular", 2, 2, 32, 32, 16),
            _case("ragged_lq13_lk29", 1, 2, 13, 29, 16),
            _case("causal_lq_lt_lk", 1, 2, 20, 37, 16, causal=True),
            _case("causal_lq_gt_lk", 1, 2, 37, 20, 16, causal=True),
            _case("bool_mask", 2, 2, 24, 40, 16, mask="bool"),
            _case("float_mask", 1, 2, 24, 40, 16, mask="float"),
            _case("head_dim_8", 1, 2, 17, 23, 8),
            _case("head_dim_40_causal", 1, 2, 40, 40, 40, causal=True),
            _case("custom_scale_blhd_layout", 1, 2, 19, 33, 40, scale=0.3, layout="blhd"),
        ],
        gradcheck_case=_case("gradcheck", 1, 2, 6, 9, 8, causal=True),
        # fp32: IEEE products everywhere (the cases need 2e-6 through the interpreter). Half
        # precision rounds P and dS to 8 (bf16) or 11 (fp16) bits before the second matmuls.
        tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)},
        # Every query and key block size of every config: 150 > 128 rows, causal (the block-size
        # dependent diagonal split), and a ragged bool-masked one.
        tuning_cases=[_case("tuning_causal_l150", 1, 1, 150, 150, 16, causal=True),
                      _case("tuning_bool_mask_lq133_lk141", 1, 1, 133, 141, 16, mask="bool")],
        compile_variants=compile_variants,
        bench_cases=[
            _case(f"b4_h16_l{length}_d{head_dim}{'_causal' if causal else ''}", 4, 16, length, length, head_dim,
                  causal=causal)
            for length in (2048, 4096) for head_dim in (64, 128) for causal in (False, True)
        ],
        flops=_flops,
        bytes_moved=_bytes,
        baselines={f"torch_sdpa_{b.lower()}": _torch_sdpa_with(b)
                   for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")},
        description="flash attention (online softmax, recomputing backward); causal, bool and float masks",
    )
)
