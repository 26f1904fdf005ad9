"""Flash attention's Triton kernels: softmax(q kᵀ · scale + mask) v without forming the Lq x Lk matrix.

The structure of FlashAttention-2 (Dao 2023) and Triton's fused-attention tutorial (06):
  forward   one program per (query block, batch*head); it loops over key blocks with an online
            softmax in base 2 (scale*log2(e) is folded into the scores, so every exponential is one
            exp2) and saves the base-2 log-sum-exp of every query row for the backward pass.
            Exponentials per key block: BLOCK_M * BLOCK_N for P and BLOCK_M for the rescale alpha.
  backward  a preprocess kernel computes delta = rowsum(dO * O); then a dK/dV kernel (one program
            per key block, looping over query blocks) and a dQ kernel (one program per query block,
            looping over key blocks). Both recompute P = exp2(S - LSE) from the saved LSE instead of
            storing it (O(L) memory): BLOCK_M * BLOCK_N exponentials per loop step in each kernel,
            2 * Lq * Lk in all against the forward's Lq * Lk (FlashAttention-2's split; FA2's
            single-kernel variant with atomic dQ adds trades them for atomics).
Blocks wholly inside the causal triangle and the key bounds run a loop without the bounds and
causal tests (CHECK=False); only the diagonal and ragged-end blocks pay for them.

Mask kinds (the MASK_KIND constexpr): "none"; "bool" (True keeps the score); "float" (added to the
score, in natural-log units). The mask is read through its own strides, zero strides included, so
an expanded [B, 1, Lq, Lk] mask is never materialized.

Everything here runs under the Triton interpreter: no libdevice, no block pointers; the autotune
lists collapse to their first config there (_common.tuning_configs).
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from gpudl.kernels._common import SHARED_MEMORY_LIMIT, tuning_configs

LOG2E = 1.4426950408889634
MASK_KINDS = ("none", "bool", "float")


# --------------------------------------------------------------------------- kernels
@triton.jit
def _load_tile(ptrs, rows, n_rows, d_ok, EDGE: tl.constexpr, PAD_D: tl.constexpr):
    """A [rows, BLOCK_D] tile of q, k, v or dO: masked against the sequence end only in EDGE blocks
    (full blocks load without a predicate), against the head dim only when it is padded."""
    if EDGE:
        if PAD_D:
            tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & d_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    elif PAD_D:
        tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _mask_scores(s, mask_ptr, qi, kj, stride_mask_q, stride_mask_k, Lq, Lk,
                 MASK_KIND: tl.constexpr, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Apply the user mask, the key bounds and the causal mask to base-2 scores `s`.

    qi, kj: query and key indices broadcastable to s's shape ([M, 1] x [1, N] in the forward
    and dQ passes, [1, M] x [N, 1] in the transposed dK/dV pass). EDGE switches on the bounds
    and causal tests; blocks that need neither skip them.
    """
    if MASK_KIND != "none":  # int64: a mask's Lq * Lk elements may pass 2**31
        qi, kj = qi.to(tl.int64), kj.to(tl.int64)
    if MASK_KIND == "bool":
        keep = tl.load(mask_ptr + qi * stride_mask_q + kj * stride_mask_k, mask=(qi < Lq) & (kj < Lk), other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    elif MASK_KIND == "float":
        bias = tl.load(mask_ptr + qi * stride_mask_q + kj * stride_mask_k, mask=(qi < Lq) & (kj < Lk), other=0.0)
        s = s + bias.to(s.dtype) * 1.4426950408889634  # natural-log units -> base 2 (LOG2E)
    if EDGE:
        ok = kj < Lk
        if IS_CAUSAL:
            ok = ok & (kj <= qi)  # top-left alignment, as torch's is_causal
        s = tl.where(ok, s, float("-inf"))
    return s


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_base, offs_m, offs_n0, d_ok,
               stride_kn, stride_vn, stride_mask_q, stride_mask_k, Lq, Lk, qk_scale, lo, hi,
               MASK_KIND: tl.constexpr, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over the key blocks [lo, hi): acc [M, D] unnormalized output, l_i [M] row
    sums, m_i [M] running row maxima (base 2). k_ptrs, v_ptrs point at key/value rows lo .. lo +
    BLOCK_N - 1 and advance one block per step (a scalar increment: no per-element index
    arithmetic in the loop); returned advanced, for the next loop."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_ptrs, offs_n, Lk, d_ok, EDGE, PAD_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = _mask_scores(s, mask_base, offs_m[:, None], offs_n[None, :], stride_mask_q, stride_mask_k, Lq, Lk,
                         MASK_KIND, EDGE, IS_CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if EDGE or MASK_KIND != "none":
            # A row with no visible key yet has m_new = -inf; subtract 0 there so exp2 gives 0, not NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new  # every key of a full block is visible: m_new is finite
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs, offs_n, Lk, d_ok, EDGE, PAD_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION, out_dtype=acc.dtype)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i, k_ptrs, v_ptrs


@triton.jit
def _attn_fwd(Q, K, V, Mask, O, LSE,  # noqa: E741 - the math's names
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_mask_b, stride_mask_h, stride_mask_q, stride_mask_k,
              stride_ob, stride_oh, stride_om, stride_od,
              H, Lq, Lk, qk_scale, TUNE_LQ, TUNE_LK,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """O[b, h, i] = sum_j softmax_j(S[i, j]) V[b, h, j]; LSE[b*H + h, i] = log2 sum_j 2^S[i, j]
    (+inf for a row with no visible key). Grid: (batch*heads * query blocks,), query blocks
    fastest so neighbouring programs share K/V in L2 (and no 65535 limit on grid axis 1)."""
    ACC = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D  # the head dim is padded to a power of two >= 16
    n_mblocks = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // n_mblocks
    start_m = pid % n_mblocks
    b = bh // H
    h = bh % H
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_mask = (offs_m < Lq)[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd
    mask_base = Mask + b * stride_mask_b + h * stride_mask_h

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    # Key blocks [0, full_end) are whole and wholly visible: no mask, no test. [full_end, hi) are
    # EDGE blocks (the ragged end, the causal diagonal). Causal rows of this block see no key past
    # m0 + BLOCK_M - 1, so later key blocks are skipped altogether.
    if IS_CAUSAL:
        hi = tl.minimum(Lk, m0 + BLOCK_M)
        full_end = tl.minimum((Lk // BLOCK_N) * BLOCK_N, ((m0 + 1) // BLOCK_N) * BLOCK_N)
    else:
        hi = Lk
        full_end = (Lk // BLOCK_N) * BLOCK_N
    acc, l_i, m_i, k_ptrs, v_ptrs = _fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_base, offs_m, offs_n0, d_ok, stride_kn, stride_vn,
        stride_mask_q, stride_mask_k, Lq, Lk, qk_scale, 0, full_end, MASK_KIND, False, IS_CAUSAL, PAD_D, PRECISION,
        BLOCK_N)
    acc, l_i, m_i, k_ptrs, v_ptrs = _fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_base, offs_m, offs_n0, d_ok, stride_kn, stride_vn,
        stride_mask_q, stride_mask_k, Lq, Lk, qk_scale, full_end, hi, MASK_KIND, True, IS_CAUSAL, PAD_D, PRECISION,
        BLOCK_N)

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
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, mask_base, lse_base, delta_base, offs_n, offs_m0, d_ok,
                stride_qm, stride_dom, stride_mask_q, stride_mask_k, Lq, Lk, qk_scale, lo, hi,
                MASK_KIND: tl.constexpr, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
                PRECISION: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dK, dV [N, D] of one key block over the query blocks [lo, hi), transposed:
    Pᵀ [N, M] = exp2(K Qᵀ · qk_scale - LSE), dV += Pᵀ dO, dSᵀ = Pᵀ (V dOᵀ - Delta), dK += dSᵀ Q.
    q_ptrs, do_ptrs point at query rows lo .. lo + BLOCK_M - 1 and advance one block per step;
    returned advanced. Key rows past Lk were loaded as zeros; their rows of dK/dV are never
    stored, so their scores need no test."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_tile(q_ptrs, offs_m, Lq, d_ok, EDGE, PAD_D)
        if EDGE:  # padding rows get LSE = +inf, so their probabilities are exactly 0
            lse = tl.load(lse_base + offs_m, mask=offs_m < Lq, other=float("inf"))
        else:
            lse = tl.load(lse_base + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        s_t = _mask_scores(s_t, mask_base, offs_m[None, :], offs_n[:, None], stride_mask_q, stride_mask_k, Lq, Lk,
                           MASK_KIND, EDGE, IS_CAUSAL)
        p_t = tl.exp2(s_t - lse[None, :])
        do = _load_tile(do_ptrs, offs_m, Lq, d_ok, EDGE, PAD_D)
        if COMPUTE_DV:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION, out_dtype=dv.dtype)
        if COMPUTE_DK:
            if EDGE:
                delta = tl.load(delta_base + offs_m, mask=offs_m < Lq, other=0.0)
            else:
                delta = tl.load(delta_base + offs_m)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION, out_dtype=dk.dtype)
        q_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
    return dk, dv, q_ptrs, do_ptrs


@triton.jit
def _attn_bwd_dkdv(Q, K, V, Mask, DO, LSE, Delta, DK, DV,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_mask_b, stride_mask_h, stride_mask_q, stride_mask_k,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   H, Lq, Lk, qk_scale, sm_scale, TUNE_LQ, TUNE_LK,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   PRECISION: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV [B, H, Lk, D] (by their strides, unit stride along D). One program per (key block,
    batch*head), key blocks fastest."""
    ACC = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
    n_nblocks = tl.cdiv(Lk, BLOCK_N)
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // n_nblocks
    # Positions within a sequence are int32 (Lq, Lk < 2**31), so the loops' indices and tests are
    # 32-bit; offsets that multiply strides are int64.
    start_n = (pid % n_nblocks).to(tl.int32)
    b = bh // H
    h = bh % H
    n0 = start_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (offs_n < Lk)[:, None] & d_ok[None, :]
    rows64 = offs_n.to(tl.int64)
    k = tl.load(K + b * stride_kb + h * stride_kh + rows64[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + rows64[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m0[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m0[:, None] * stride_dom + offs_d[None, :] * stride_dod
    mask_base = Mask + b * stride_mask_b + h * stride_mask_h
    lse_base = LSE + bh * Lq
    delta_base = Delta + bh * Lq
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    # Query blocks: [lo, diag_end) straddle the causal diagonal (EDGE), [diag_end, full_end) are whole
    # and see every key of this block (no mask, no test), [full_end, Lq) is the ragged end (EDGE).
    if IS_CAUSAL:
        # Queries before n0 see none of these keys: start at the query block holding row n0.
        lo = (n0 // BLOCK_M) * BLOCK_M
        diag_end = tl.minimum(lo + tl.cdiv(n0 + BLOCK_N - 1 - lo, BLOCK_M) * BLOCK_M, Lq)
        q_ptrs += lo.to(tl.int64) * stride_qm
        do_ptrs += lo.to(tl.int64) * stride_dom
        dk, dv, q_ptrs, do_ptrs = _dkdv_inner(
            dk, dv, k, v, q_ptrs, do_ptrs, mask_base, lse_base, delta_base, offs_n, offs_m0, d_ok, stride_qm,
            stride_dom, stride_mask_q, stride_mask_k, Lq, Lk, qk_scale, lo, diag_end, MASK_KIND, True, IS_CAUSAL,
            PAD_D, PRECISION, COMPUTE_DK, COMPUTE_DV, BLOCK_M)
    else:
        diag_end = 0
    full_end = diag_end + ((Lq - diag_end) // BLOCK_M) * BLOCK_M
    dk, dv, q_ptrs, do_ptrs = _dkdv_inner(
        dk, dv, k, v, q_ptrs, do_ptrs, mask_base, lse_base, delta_base, offs_n, offs_m0, d_ok, stride_qm,
        stride_dom, stride_mask_q, stride_mask_k, Lq, Lk, qk_scale, diag_end, full_end, MASK_KIND, False, IS_CAUSAL,
        PAD_D, PRECISION, COMPUTE_DK, COMPUTE_DV, BLOCK_M)
    dk, dv, q_ptrs, do_ptrs = _dkdv_inner(
        dk, dv, k, v, q_ptrs, do_ptrs, mask_base, lse_base, delta_base, offs_n, offs_m0, d_ok, stride_qm,
        stride_dom, stride_mask_q, stride_mask_k, Lq, Lk, qk_scale, full_end, Lq, MASK_KIND, True, IS_CAUSAL,
        PAD_D, PRECISION, COMPUTE_DK, COMPUTE_DV, BLOCK_M)
    if COMPUTE_DK:
        dk_offs = b * stride_dkb + h * stride_dkh + offs_n.to(tl.int64)[:, None] * stride_dkn + offs_d[None, :]
        tl.store(DK + dk_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    if COMPUTE_DV:
        dv_offs = b * stride_dvb + h * stride_dvh + offs_n.to(tl.int64)[:, None] * stride_dvn + offs_d[None, :]
        tl.store(DV + dv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, mask_base, offs_m, offs_n0, d_ok,
              stride_kn, stride_vn, stride_mask_q, stride_mask_k, Lq, Lk, qk_scale, lo, hi,
              MASK_KIND: tl.constexpr, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ [M, D] of one query block over the key blocks [lo, hi):
    P = exp2(Q Kᵀ · qk_scale - LSE), dS = P (dO Vᵀ - Delta), dQ += dS K. k_ptrs, v_ptrs point at
    key/value rows lo .. lo + BLOCK_N - 1 and advance one block per step; returned advanced."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_ptrs, offs_n, Lk, d_ok, EDGE, PAD_D)
        v = _load_tile(v_ptrs, offs_n, Lk, d_ok, EDGE, PAD_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = _mask_scores(s, mask_base, offs_m[:, None], offs_n[None, :], stride_mask_q, stride_mask_k, Lq, Lk,
                         MASK_KIND, EDGE, IS_CAUSAL)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION, out_dtype=dq.dtype)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq, k_ptrs, v_ptrs


@triton.jit
def _attn_bwd_dq(Q, K, V, Mask, DO, LSE, Delta, DQ,
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_mask_b, stride_mask_h, stride_mask_q, stride_mask_k,
                 stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_dqb, stride_dqh, stride_dqm,
                 H, Lq, Lk, qk_scale, sm_scale, TUNE_LQ, TUNE_LK,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ [B, H, Lq, D] (by its strides, unit stride along D). One program per (query block,
    batch*head), query blocks fastest."""
    ACC = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
    n_mblocks = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // n_mblocks
    # Positions within a sequence are int32 (Lq, Lk < 2**31), so the loops' indices and tests are
    # 32-bit; offsets that multiply strides are int64.
    start_m = (pid % n_mblocks).to(tl.int32)
    b = bh // H
    h = bh % H
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # Query rows past Lq repeat row Lq - 1 (no row predicate held through the loop: fewer live
    # registers); their rows of dQ are never stored, and no other row depends on them.
    rows = tl.minimum(offs_m, Lq - 1)
    rows64 = rows.to(tl.int64)
    q = _load_tile(Q + b * stride_qb + h * stride_qh + rows64[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   rows, Lq, d_ok, False, PAD_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + rows64[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                    rows, Lq, d_ok, False, PAD_D)
    lse = tl.load(LSE + bh * Lq + rows)
    delta = tl.load(Delta + bh * Lq + rows)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd
    mask_base = Mask + b * stride_mask_b + h * stride_mask_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    # The forward's key-block split: whole, wholly visible blocks first, then the EDGE blocks.
    if IS_CAUSAL:
        hi = tl.minimum(Lk, m0 + BLOCK_M)
        full_end = tl.minimum((Lk // BLOCK_N) * BLOCK_N, ((m0 + 1) // BLOCK_N) * BLOCK_N)
    else:
        hi = Lk
        full_end = (Lk // BLOCK_N) * BLOCK_N
    dq, k_ptrs, v_ptrs = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, mask_base, offs_m, offs_n0, d_ok,
                                   stride_kn, stride_vn, stride_mask_q, stride_mask_k, Lq, Lk, qk_scale, 0, full_end,
                                   MASK_KIND, False, IS_CAUSAL, PAD_D, PRECISION, BLOCK_N)
    dq, k_ptrs, v_ptrs = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, mask_base, offs_m, offs_n0, d_ok,
                                   stride_kn, stride_vn, stride_mask_q, stride_mask_k, Lq, Lk, qk_scale, full_end, hi,
                                   MASK_KIND, True, IS_CAUSAL, PAD_D, PRECISION, BLOCK_N)
    dq_offs = b * stride_dqb + h * stride_dqh + offs_m.to(tl.int64)[:, None] * stride_dqm + offs_d[None, :]
    tl.store(DQ + dq_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=(offs_m < Lq)[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------- tuning tables
class Tile(NamedTuple):
    """One autotune candidate. Forward and dQ: BLOCK_M queries per program, BLOCK_N keys per loop
    step; dK/dV: BLOCK_N keys per program, BLOCK_M queries per loop step."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# The first tile of each kernel is the only one run under the interpreter (tuning_configs): small
# enough that the interpreter-sized test shapes span several blocks.
INTERPRETER = {"fwd": Tile(32, 16, 4, 2), "dkdv": Tile(16, 32, 4, 2), "dq": Tile(32, 16, 4, 2)}
# Half precision on tensor cores. Constraints (sm_80 and sm_90 at head dims 64 and 128, see
# bench_results/audit/current/): at head dim 128 on sm_80, 4 warps spill on 64x64 forward and 32x64
# dK/dV tiles, and 32x128 dK/dV and 128x64 dQ tiles spill even on 8 warps, so none is listed.
HALF = {
    "fwd": [Tile(64, 64, 8, 3), Tile(128, 64, 8, 3), Tile(128, 32, 8, 3), Tile(64, 32, 4, 3)],
    "dkdv": [Tile(32, 64, 8, 3), Tile(64, 64, 8, 2), Tile(16, 64, 4, 3), Tile(32, 32, 4, 3)],
    "dq": [Tile(128, 32, 8, 3), Tile(64, 32, 4, 3), Tile(64, 64, 4, 3), Tile(64, 64, 8, 3)],
}
# float32 (IEEE) and float64 on the FMA units hold their operand tiles in registers: tiles above
# the interpreter's spill at head dim 128 (see the audit), so the larger ones are for head dim <= 64.
FP32 = {
    "fwd": [Tile(32, 16, 4, 2), Tile(32, 32, 4, 2)],
    "dkdv": [Tile(16, 32, 4, 2), Tile(16, 64, 4, 2)],
    "dq": [Tile(32, 16, 4, 2), Tile(64, 16, 4, 2)],
}
# Head dim 128: the interpreter's tiles, the backward's on 8 warps. On 4 warps they sit at the
# edge of the registers ptxas allots and spill (the audit: dQ 32x16 on sm_90, 255 registers and
# 384 B of stack; dK/dV 16x32 on sm_80 or sm_90, 8 B, as the code around them changes); on 8
# warps they take 74-146 registers.
FP32_D128 = {"fwd": FP32["fwd"][:1], "dkdv": [Tile(16, 32, 8, 2)], "dq": [Tile(32, 16, 8, 2)]}
PRE_BLOCK_M, PRE_WARPS = 64, 4  # the preprocess kernel: one fixed launch shape
TUNE_KEY = ["TUNE_LQ", "TUNE_LK", "HEAD_DIM", "MASK_KIND", "IS_CAUSAL"]


def tile_table(kind: str) -> list[Tile]:
    """Every tile the autotuner of kernel `kind` ("fwd", "dkdv", "dq") knows, the interpreter's first."""
    return list(dict.fromkeys([INTERPRETER[kind], *HALF[kind], *FP32[kind], *FP32_D128[kind]]))


def block_d(head_dim: int) -> int:
    """The head dim padded to a power of two >= 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(head_dim))


def smem_estimate(tile: Tile, padded_d: int, elem: int, per_program: str) -> int:
    """Rough shared memory of one tile in bytes (the pipelined tiles of the looped operands plus
    the resident block), only to keep tiles far from the limit out; compile_check measures the
    real figure of every kept tile."""
    looped, resident = (tile.block_n, tile.block_m) if per_program == "query" else (tile.block_m, tile.block_n)
    return (2 * tile.num_stages * looped + 2 * resident) * padded_d * elem


def candidates(kind: str, padded_d: int, elem: int, per_program: str) -> list[Tile]:
    """The tiles of kernel `kind` the autotuner may pick on a GPU for this padded head dim and
    element size."""
    table = HALF[kind] if elem == 2 else FP32[kind] if padded_d <= 64 else FP32_D128[kind]
    limit = min(SHARED_MEMORY_LIMIT.values())
    return [t for t in table if smem_estimate(t, padded_d, elem, per_program) <= limit] or table[-1:]


def _configs(table: list[Tile]) -> list[triton.Config]:
    return tuning_configs([triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.num_warps,
                                         num_stages=t.num_stages) for t in table])


def _pruner(kind: str, per_program: str):
    def prune(configs, named_args, **kwargs):
        keep = candidates(kind, kwargs["BLOCK_D"], named_args["Q"].element_size(), per_program)
        # Under the interpreter the one config tried is INTERPRETER's: keep it.
        return [c for c in configs if Tile(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                in keep] or configs

    return prune


attn_fwd_tuned = triton.autotune(_configs(tile_table("fwd")), key=TUNE_KEY,
                                 prune_configs_by={"early_config_prune": _pruner("fwd", "query")})(_attn_fwd)
attn_bwd_dkdv_tuned = triton.autotune(_configs(tile_table("dkdv")), key=TUNE_KEY + ["COMPUTE_DK", "COMPUTE_DV"],
                                      prune_configs_by={"early_config_prune": _pruner("dkdv", "key")})(_attn_bwd_dkdv)
attn_bwd_dq_tuned = triton.autotune(_configs(tile_table("dq")), key=TUNE_KEY,
                                    prune_configs_by={"early_config_prune": _pruner("dq", "query")})(_attn_bwd_dq)
