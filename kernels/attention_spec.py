"""Registration of scaled_dot_product_attention (kernels/attention.py): test, gradcheck and
tuning cases, compile variants of every kernel and tile, the FLOP/byte model and the GPU baselines."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpudl.kernels._common import acc_dtype, triton_dtype
from gpudl.kernels.attention import OP, _precision, scaled_dot_product_attention, unsupported
from gpudl.kernels.attention_triton import (
    HALF,
    PRE_BLOCK_M,
    PRE_WARPS,
    Tile,
    _attn_bwd_dkdv,
    _attn_bwd_dq,
    _attn_bwd_preprocess,
    _attn_fwd,
    block_d,
    candidates,
)
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, register


def _signature(kernel, dtype: torch.dtype, mask_kind: str, constexprs: dict) -> dict[str, str]:
    """Argument types of one compilation: tensors of `dtype`, fp32 (fp64) LSE/Delta, i32 ints."""
    ptr, stat = triton_dtype(dtype), triton_dtype(acc_dtype(dtype))
    mask_ptr = "*i1" if mask_kind == "bool" else ptr
    types = {"Mask": mask_ptr, "LSE": stat, "Delta": stat, "qk_scale": "fp32", "sm_scale": "fp32"}
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


def _variants_of(kernel, label, kind, dtype, head_dim, mask_kind="none", causal=False, extra=None,
                 per_program="query", configs=None, precision=None):
    """Compile variants of `kernel` for the candidates of `kind` (or `configs`)."""
    variants = []
    padded_d = block_d(head_dim)
    if configs is None:
        configs = candidates(kind, padded_d, torch.tensor([], dtype=dtype).element_size(), per_program)
    precision = precision or _precision(dtype)
    for block_m, block_n, warps, stages in configs:
        # Contiguous inputs: the head-dim strides are 1, which Triton specializes as a constant.
        constexprs = {n: 1 for n in kernel.arg_names if n.startswith("stride_") and n.endswith("d")}
        constexprs.update(HEAD_DIM=head_dim, BLOCK_D=padded_d, MASK_KIND=mask_kind, IS_CAUSAL=causal,
                          PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, **(extra or {}))
        constexprs = {n: c for n, c in constexprs.items() if n in kernel.arg_names}
        name = f"{label}_{str(dtype)[6:]}{'_tf32' if precision == 'tf32' and dtype == torch.float32 else ''}"
        name += f"_d{head_dim}_m{block_m}_n{block_n}_w{warps}_s{stages}"
        name += "" if mask_kind == "none" else f"_{mask_kind}mask"
        name += "_causal" if causal else ""
        signature = _signature(kernel, dtype, mask_kind, constexprs)
        variants.append(CompileVariant(name, kernel, signature, constexprs, warps, stages))
    return variants


def compile_variants() -> list[CompileVariant]:
    """Every tile the autotuner may pick on a GPU (`candidates`) for the forward, dK/dV and dQ
    kernels, and the preprocess kernel, in float32 (IEEE; TF32 at head dim 128) and bfloat16 for
    head dims 64 and 128; plus the causal, bool-mask and float-mask code paths (bfloat16, head
    dim 64: every causal dK/dV tile and every float-mask dQ tile, the register-heaviest paths,
    else the first tile)."""
    out = []
    both = {"COMPUTE_DK": True, "COMPUTE_DV": True}
    pre = [Tile(PRE_BLOCK_M, 0, PRE_WARPS, 1)]
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
    out += _variants_of(_attn_fwd, "fwd", "fwd", bf16, 64, "bool", configs=HALF["fwd"][:1])
    out += _variants_of(_attn_fwd, "fwd", "fwd", bf16, 64, "none", True, configs=HALF["fwd"][:1])
    out += _variants_of(_attn_bwd_dkdv, "dkdv", "dkdv", bf16, 64, "none", True, both, "key")
    out += _variants_of(_attn_bwd_dq, "dq", "dq", bf16, 64, "none", True, configs=HALF["dq"][:1])
    out += _variants_of(_attn_bwd_dq, "dq", "dq", bf16, 64, "float")
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
