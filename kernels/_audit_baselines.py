"""The audit's reference kernels, compiled beside gpudl's at the same tile, warps and stages: a
textbook tiled GEMM, and a textbook flash-attention forward and backward (online base-2
softmax with exp2, log-sum-exp saved by the forward; backward with Delta = rowsum(O * dO)
precomputed, one kernel for dK/dV over query blocks and one for dQ over key blocks). They are
written plainly, the way the Triton tutorials teach these algorithms, so the hot-loop model of a
gpudl kernel can be read against what the same tile costs without gpudl's extras. Never launched:
only compiled (no correctness tests; the audit reads their loops).

Each attention kernel splits its loop the textbook way: full blocks without any mask, then the
blocks that need the bounds or causal test (the diagonal), so the hot loop is the unmasked one.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _plain_gemm(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                ACC: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The textbook tiled GEMM: C = A @ B, one [BLOCK_M, BLOCK_N] tile per program, masked edges."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# --------------------------------------------------------------------------- attention forward
@triton.jit
def _flash_fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n, start_n, L, qk_scale, stride_kn, stride_vn,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """One key block of the online softmax: S = Q K^T (base 2), running max m_i, row sums l_i,
    acc rescaled by exp2(m_old - m_new) then += P V."""
    cols = start_n + offs_n
    if MASKED:
        k = tl.load(k_ptrs + start_n * stride_kn, mask=(cols < L)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * stride_kn)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        keep = cols[None, :] < L
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs + start_n * stride_vn, mask=(cols < L)[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs + start_n * stride_vn)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _textbook_attn_fwd(Q, K, V, O, LSE,  # noqa: E741 - the math's names
                       stride_qz, stride_qm, stride_qd, stride_kz, stride_kn, stride_kd,
                       stride_vz, stride_vn, stride_vd, stride_oz, stride_om, stride_od, L, qk_scale,
                       CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """O = softmax(Q K^T * scale) V for one [BLOCK_M, HEAD_DIM] query block of one (batch, head)
    (program axis 1); LSE = base-2 log-sum-exp per row. qk_scale = scale * log2(e)."""
    start_m = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + z * stride_qz + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m < L)[:, None], other=0.0)
    k_ptrs = K + z * stride_kz + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + z * stride_vz + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        full_end = (start_m * BLOCK_M // BLOCK_N) * BLOCK_N
        hi = tl.minimum(L, (start_m + 1) * BLOCK_M)
    else:
        full_end = (L // BLOCK_N) * BLOCK_N
        hi = L
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _flash_fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n, start_n, L, qk_scale,
                                        stride_kn, stride_vn, False, CAUSAL)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _flash_fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n, start_n, L, qk_scale,
                                        stride_kn, stride_vn, True, CAUSAL)
    out = acc / l_i[:, None]
    tl.store(O + z * stride_oz + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=(offs_m < L)[:, None])
    tl.store(LSE + z * L + offs_m, m_i + tl.log2(l_i), mask=offs_m < L)


# --------------------------------------------------------------------------- attention backward
@triton.jit
def _flash_dkdv_step(dk, dv, k, v, q_ptrs, do_ptrs, LSE_z, Delta_z, offs_n, offs_m, start_m, L, qk_scale,
                     stride_qm, stride_dom, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """One query block for a key block: P^T = exp2(K Q^T * qk_scale - LSE), dV += P^T dO,
    dS^T = P^T (V dO^T - Delta), dK += dS^T Q."""
    rows = start_m + offs_m
    if MASKED:
        q = tl.load(q_ptrs + start_m * stride_qm, mask=(rows < L)[:, None], other=0.0)
        do = tl.load(do_ptrs + start_m * stride_dom, mask=(rows < L)[:, None], other=0.0)
        lse = tl.load(LSE_z + rows, mask=rows < L, other=float("inf"))
        delta = tl.load(Delta_z + rows, mask=rows < L, other=0.0)
    else:
        q = tl.load(q_ptrs + start_m * stride_qm)
        do = tl.load(do_ptrs + start_m * stride_dom)
        lse = tl.load(LSE_z + rows)
        delta = tl.load(Delta_z + rows)
    p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
    if MASKED and CAUSAL:
        p_t = tl.where(offs_n[:, None] <= rows[None, :], p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv)
    dp_t = tl.dot(v, tl.trans(do))
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _textbook_attn_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, stride_z, stride_m, stride_d, L, qk_scale, sm_scale,
                            CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """dK, dV of one [BLOCK_N, HEAD_DIM] key block of one (batch, head) (program axis 1), over
    the query blocks of BLOCK_M rows. Q, K, V, dO, dK, dV share one layout (strides)."""
    start_n = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_offs = z * stride_z + offs_n[:, None] * stride_m + offs_d[None, :] * stride_d
    k = tl.load(K + kv_offs, mask=(offs_n < L)[:, None], other=0.0)
    v = tl.load(V + kv_offs, mask=(offs_n < L)[:, None], other=0.0)
    q_ptrs = Q + z * stride_z + offs_m[:, None] * stride_m + offs_d[None, :] * stride_d
    do_ptrs = DO + z * stride_z + offs_m[:, None] * stride_m + offs_d[None, :] * stride_d
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0
    diag_end = tl.minimum(((start_n + 1) * BLOCK_N + BLOCK_M - 1) // BLOCK_M * BLOCK_M, L) if CAUSAL else lo
    full_end = diag_end + ((L - diag_end) // BLOCK_M) * BLOCK_M
    for start_m in range(lo, diag_end, BLOCK_M):
        dk, dv = _flash_dkdv_step(dk, dv, k, v, q_ptrs, do_ptrs, LSE + z * L, Delta + z * L, offs_n, offs_m,
                                  start_m, L, qk_scale, stride_m, stride_m, True, CAUSAL)
    for start_m in range(diag_end, full_end, BLOCK_M):
        dk, dv = _flash_dkdv_step(dk, dv, k, v, q_ptrs, do_ptrs, LSE + z * L, Delta + z * L, offs_n, offs_m,
                                  start_m, L, qk_scale, stride_m, stride_m, False, CAUSAL)
    for start_m in range(full_end, L, BLOCK_M):
        dk, dv = _flash_dkdv_step(dk, dv, k, v, q_ptrs, do_ptrs, LSE + z * L, Delta + z * L, offs_n, offs_m,
                                  start_m, L, qk_scale, stride_m, stride_m, True, False)
    tl.store(DK + kv_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=(offs_n < L)[:, None])
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=(offs_n < L)[:, None])


@triton.jit
def _flash_dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs, offs_m, offs_n, start_n, L, qk_scale, stride_kn,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """One key block for a query block: P = exp2(Q K^T * qk_scale - LSE), dS = P (dO V^T - Delta),
    dQ += dS K."""
    cols = start_n + offs_n
    if MASKED:
        k = tl.load(k_ptrs + start_n * stride_kn, mask=(cols < L)[:, None], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_kn, mask=(cols < L)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * stride_kn)
        v = tl.load(v_ptrs + start_n * stride_kn)
    p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
    if MASKED:
        keep = cols[None, :] < L
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _textbook_attn_bwd_dq(Q, K, V, DO, LSE, Delta, DQ, stride_z, stride_m, stride_d, L, qk_scale, sm_scale,
                          CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """dQ of one [BLOCK_M, HEAD_DIM] query block of one (batch, head) (program axis 1), over the
    key blocks of BLOCK_N keys."""
    start_m = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_offs = z * stride_z + offs_m[:, None] * stride_m + offs_d[None, :] * stride_d
    q = tl.load(Q + q_offs, mask=(offs_m < L)[:, None], other=0.0)
    do = tl.load(DO + q_offs, mask=(offs_m < L)[:, None], other=0.0)
    lse = tl.load(LSE + z * L + offs_m, mask=offs_m < L, other=float("inf"))
    delta = tl.load(Delta + z * L + offs_m, mask=offs_m < L, other=0.0)
    k_ptrs = K + z * stride_z + offs_n[:, None] * stride_m + offs_d[None, :] * stride_d
    v_ptrs = V + z * stride_z + offs_n[:, None] * stride_m + offs_d[None, :] * stride_d
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        full_end = (start_m * BLOCK_M // BLOCK_N) * BLOCK_N
        hi = tl.minimum(L, (start_m + 1) * BLOCK_M)
    else:
        full_end = (L // BLOCK_N) * BLOCK_N
        hi = L
    for start_n in range(0, full_end, BLOCK_N):
        dq = _flash_dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs, offs_m, offs_n, start_n, L, qk_scale, stride_m,
                            False, CAUSAL)
    for start_n in range(full_end, hi, BLOCK_N):
        dq = _flash_dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs, offs_m, offs_n, start_n, L, qk_scale, stride_m,
                            True, CAUSAL)
    tl.store(DQ + q_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=(offs_m < L)[:, None])


ATTENTION = {"attention_fwd": _textbook_attn_fwd, "attention_bwd_dkdv": _textbook_attn_bwd_dkdv,
             "attention_bwd_dq": _textbook_attn_bwd_dq}


def plain_gemm_variant(dtype: str, precision: str, tile, warps: int, stages: int):
    """(CompileVariant, unit strides) of the plain GEMM: contiguous A [M, K] and B [K, N]."""
    from gpudl.kernels.registry import CompileVariant

    bm, bn, bk = tile
    ptr = f"*{dtype}"
    signature = {"a_ptr": ptr, "b_ptr": ptr, "c_ptr": ptr, **{n: "i32" for n in _plain_gemm.arg_names[3:12]},
                 "ACC": "constexpr", "PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                 "BLOCK_K": "constexpr"}
    acc = tl.float64 if dtype == "fp64" else tl.float32
    name = f"plain_gemm-{dtype}-{precision}-{bm}x{bn}x{bk}-w{warps}-s{stages}"
    constexprs = {"ACC": acc, "PRECISION": precision, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    return CompileVariant(name, _plain_gemm, signature, constexprs, warps, stages), ("stride_ak", "stride_bn",
                                                                                    "stride_cn")


def attention_variant(role: str, dtype: str, causal: bool, head_dim: int, block_m: int, block_n: int,
                      warps: int, stages: int):
    """(CompileVariant, unit strides) of the textbook attention kernel for `role`, contiguous
    [batch*heads, L, head_dim] tensors."""
    from gpudl.kernels.registry import CompileVariant

    kernel = ATTENTION[role]
    constexprs = {"CAUSAL": causal, "HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("LSE", "Delta"):
            signature[name] = "*fp32"
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        elif name.startswith("stride") or name == "L":
            signature[name] = "i32"
        else:
            signature[name] = f"*{dtype}"
    unit = tuple(n for n in kernel.arg_names if n.startswith("stride") and n.endswith("d"))
    name = (f"textbook_{role.removeprefix('attention_')}-{dtype}-d{head_dim}-m{block_m}-n{block_n}-w{warps}-s{stages}"
            f"{'-causal' if causal else ''}")
    return CompileVariant(name, kernel, signature, constexprs, warps, stages), unit
