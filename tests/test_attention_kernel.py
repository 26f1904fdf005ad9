"""The flash-attention kernel (kernels/attention.py) beyond what the registry harness checks:
zero-stride (broadcast) masks, rows with no visible key, layouts, empty shapes, fallbacks and
their warnings, which gradients are computed, gpudl.ops dispatch and gpudl.nn.MultiheadAttention.
Runs through the Triton interpreter on the CPU; shapes are tiny."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import check_against_reference

import gpudl
from gpudl import nn as gnn
from gpudl import ops, reference
from gpudl.kernels import attention as A

pytestmark = pytest.mark.usefixtures("on_test_device")


def _check(q, k, v, mask=None, is_causal=False, scale=None, grad=None, min_scale=0.0):
    """The kernel against F.scaled_dot_product_attention (through gpudl.reference), by
    helpers.check_against_reference: output and every gradient within 1e-5 x the tensor's RMS
    + 1e-4 x |reference|. scale 1/sqrt(D) by default. Returns the kernel's output."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return check_against_reference(A.scaled_dot_product_attention, reference.scaled_dot_product_attention,
                                   q, k, v, mask, 0.0, is_causal, scale, grad=grad, atol=1e-5, rtol=1e-4,
                                   min_scale=min_scale).out


def _qkv(b, h, lq, lk, d, dtype=torch.float32, grad=True):
    torch.manual_seed(0)
    return tuple(torch.randn(b, h, n, d, dtype=dtype).requires_grad_(grad) for n in (lq, lk, lk))


# --------------------------------------------------------------------------- masks
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_broadcast_mask_keeps_zero_strides(kind):
    """A [Lq, Lk] mask expanded to [B, H, Lq, Lk] is read through its zero strides."""
    q, k, v = _qkv(2, 3, 21, 35, 16)
    torch.manual_seed(1)
    keep = torch.rand(21, 35) > 0.4
    mask = keep if kind == "bool" else torch.randn(21, 35).masked_fill(~keep, float("-inf"))
    expanded = mask.expand(2, 3, 21, 35)
    assert expanded.stride()[:2] == (0, 0)
    _check(q, k, v, expanded)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_rows_with_no_visible_key_match_torch(kind):
    """PyTorch returns a zero output row (and zero gradients) where every key is masked out."""
    q, k, v = _qkv(1, 2, 9, 19, 8)
    keep = torch.ones(9, 19, dtype=torch.bool)
    keep[2] = False
    keep[7, 3:] = False
    mask = keep if kind == "bool" else torch.zeros(9, 19).masked_fill(~keep, float("-inf"))
    out = _check(q, k, v, mask.expand(1, 2, 9, 19))
    assert torch.all(out[:, :, 2] == 0) and torch.isfinite(out).all()


def test_float_mask_values_are_added():
    """Large finite negative values are not 'masked out': the row is a softmax over them."""
    q, k, v = _qkv(1, 1, 5, 17, 16)
    mask = torch.full((1, 1, 5, 17), -1e30)
    mask[..., 0, 4] = 2.0
    _check(q, k, v, mask)


def test_per_head_mask_strides():
    """A mask with a real head dimension but broadcast over the batch."""
    q, k, v = _qkv(2, 2, 17, 18, 16)
    torch.manual_seed(2)
    mask = (torch.rand(1, 2, 17, 18) > 0.5).expand(2, 2, 17, 18)
    _check(q, k, v, mask)


# --------------------------------------------------------------------------- causal, lengths, head dims
@pytest.mark.parametrize("lq,lk", [(7, 40), (40, 7), (33, 33), (1, 5), (5, 1)])
def test_causal_is_top_left_aligned(lq, lk):
    q, k, v = _qkv(1, 2, lq, lk, 16)
    # One visible key per query (Lq or Lk of 1): dq cancels to exactly zero, so the reference's dq
    # is rounding noise of unit-variance terms; atol is then 1e-5 absolute.
    _check(q, k, v, is_causal=True, min_scale=1.0 if 1 in (lq, lk) else 0.0)


@pytest.mark.parametrize("d", [8, 24, 80, 96, 128])
def test_head_dims(d):
    q, k, v = _qkv(1, 1, 9, 18, d)
    _check(q, k, v, is_causal=d == 96, scale=0.17 if d == 80 else None)


def test_non_contiguous_inputs_and_gradient():
    """q/k/v transposed from [B, L, H, D]; key sliced from a wider tensor; dO with zero strides
    (what out.sum().backward() sends back)."""
    torch.manual_seed(0)
    q = torch.randn(2, 13, 3, 16).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 3, 22, 32)[..., ::2].requires_grad_()
    v = torch.randn(2, 22, 3, 16).transpose(1, 2).requires_grad_()
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(q, k, v, grad=torch.ones(1, 1, 1, 1).expand(2, 3, 13, 16))


def test_zero_size_shapes():
    # Empty batch: empty output and gradients.
    q, k, v = _qkv(0, 2, 5, 7, 16)
    out = A.scaled_dot_product_attention(q, k, v, None, 0.0, False, 0.25)
    assert out.shape == (0, 2, 5, 16)
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
    assert gq.shape == q.shape and gk.shape == k.shape and gv.shape == v.shape
    # No keys: torch gives zeros; no queries: an empty output and zero key/value gradients.
    q, k, v = _qkv(1, 2, 5, 0, 16)
    out = _check(q, k, v)
    assert torch.all(out == 0)
    q, k, v = _qkv(1, 2, 0, 6, 16)
    out = A.scaled_dot_product_attention(q, k, v, None, 0.0, False, 0.25)
    gk, gv = torch.autograd.grad(out.sum(), (k, v))
    assert out.shape == (1, 2, 0, 16) and torch.all(gk == 0) and torch.all(gv == 0)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "causal"])
def test_gradcheck_float64(mask_kind):
    q, k, v = _qkv(1, 2, 5, 7, 8, dtype=torch.float64)
    mask, causal = None, mask_kind == "causal"
    if mask_kind in ("bool", "float"):
        keep = (torch.rand(5, 7, generator=torch.Generator().manual_seed(3), device="cpu") > 0.4).to(q.device)
        keep[1] = False
        mask = keep if mask_kind == "bool" else torch.randn(5, 7, dtype=torch.float64).masked_fill(~keep, float("-inf"))
        mask = mask.expand(1, 2, 5, 7)
    fn = lambda q, k, v: A.scaled_dot_product_attention(q, k, v, mask, 0.0, causal, 0.4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- gradients not required
@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, False), (False, False, True),
                                    (False, True, True)])
def test_only_required_gradients_are_computed(wanted, launches):
    q, k, v = _qkv(1, 2, 11, 13, 16)
    for t, w in zip((q, k, v), wanted):
        t.requires_grad_(w)
    out = A.scaled_dot_product_attention(q, k, v, None, 0.0, False, 0.25)
    out.sum().backward()
    assert [t.grad is not None for t in (q, k, v)] == list(wanted)
    dq, dkdv = launches.of("_attn_bwd_dq"), launches.of("_attn_bwd_dkdv")
    assert len(dq) == int(wanted[0])
    if wanted[1] or wanted[2]:
        assert len(dkdv) == 1
        assert (dkdv[0]["COMPUTE_DK"], dkdv[0]["COMPUTE_DV"]) == wanted[1:]
    else:
        assert not dkdv
    # The gradients that are computed are right.
    rq, rk, rv = (t.detach().requires_grad_(w) for t, w in zip((q, k, v), wanted))
    F.scaled_dot_product_attention(rq, rk, rv, scale=0.25).sum().backward()
    for t, r in zip((q, k, v), (rq, rk, rv)):
        if r.grad is not None:
            torch.testing.assert_close(t.grad, r.grad, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- fallbacks
def _ran_kernel(out) -> bool:
    return out.grad_fn is not None and "gpudl_scaled_dot_product_attention" in out.grad_fn.name()


def _fallback(args, match):
    """gpudl.ops on the triton backend runs the reference for these arguments, warning once;
    the kernel's own entry refuses them."""
    q, k, v, mask, dropout_p, is_causal, scale = args
    with gpudl.use_backend("triton"), pytest.warns(UserWarning, match=match):
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                               scale=scale)
    assert not _ran_kernel(out)
    with pytest.raises(ValueError, match=match):
        A.scaled_dot_product_attention(*args)
    return out


def test_dropout_falls_back_with_one_warning():
    q, k, v = _qkv(1, 2, 6, 6, 16)
    torch.manual_seed(5)
    out = _fallback((q, k, v, None, 0.5, False, 0.25), "dropout_p > 0")
    torch.manual_seed(5)
    torch.testing.assert_close(out, reference.scaled_dot_product_attention(q, k, v, None, 0.5, False, 0.25))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call does not warn again
        with gpudl.use_backend("triton"):
            ops.scaled_dot_product_attention(q, k, v, dropout_p=0.3, scale=0.25)


def test_value_head_dim_mismatch_falls_back():
    q, k, _ = _qkv(1, 2, 6, 7, 16)
    v = torch.randn(1, 2, 7, 24)
    out = _fallback((q, k, v, None, 0.0, False, 0.25), "Dv differs")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.25))


def test_large_head_dim_falls_back():
    q, k, v = _qkv(1, 1, 3, 4, 136)
    out = _fallback((q, k, v, None, 0.0, False, 0.1), "head dims above 128")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.1))


def test_float_mask_requiring_grad_falls_back_and_gets_its_gradient():
    q, k, v = _qkv(1, 2, 5, 6, 16)
    mask = torch.randn(1, 2, 5, 6, requires_grad=True)
    out = _fallback((q, k, v, mask, 0.0, False, 0.25), "attn_mask requires grad")
    (g,) = torch.autograd.grad(out.sum(), mask)
    assert g.shape == mask.shape and g.abs().sum() > 0


def test_fallback_warning_points_at_the_callers_line():
    q, k, v = _qkv(1, 2, 6, 6, 16)
    with gpudl.use_backend("triton"), pytest.warns(UserWarning, match="dropout_p > 0") as record:
        ops.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert record[0].filename == __file__


def test_double_backward_is_refused():
    q, k, v = _qkv(1, 2, 5, 6, 8)
    out = A.scaled_dot_product_attention(q, k, v, None, 0.0, False, 0.3)
    (gq,) = torch.autograd.grad(out.square().sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gq.sum().backward()


def test_mask_together_with_causal_is_an_error():
    q, k, v = _qkv(1, 1, 4, 4, 16)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        A.scaled_dot_product_attention(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool), 0.0, True, 0.25)


# --------------------------------------------------------------------------- gpudl.ops and gpudl.nn
def test_ops_dispatches_to_the_kernel_under_triton_backend():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 16, requires_grad=True) for _ in range(3))
    mask = torch.rand(11, 11) > 0.3  # broadcast by gpudl.ops to [B, H, Lq, Lk] without copying
    with gpudl.use_backend("triton"):
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert _ran_kernel(out)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-4)
    with gpudl.use_backend("torch"):
        assert not _ran_kernel(ops.scaled_dot_product_attention(q, k, v))


def test_ops_three_dim_inputs_and_causal_under_triton_backend():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 8), torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    with gpudl.use_backend("triton"):
        out = ops.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5)
    assert out.shape == (2, 9, 8)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)


def test_ops_validation_messages():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        ops.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match=r"does not broadcast to \(1, 2, 5, 5\)"):
        ops.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask has dtype torch.float64 but query has dtype torch.float32"):
        ops.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="dropout_p must be a float in"):
        ops.scaled_dot_product_attention(q, q, q, dropout_p=1.0)


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_matches_torch_under_triton_backend(batch_first, monkeypatch):
    """gpudl.nn.MultiheadAttention on the kernel vs torch.nn.MultiheadAttention with the same
    weights: key padding mask, causal attention mask, output and parameter gradients."""
    launches = []
    forward = A.attention_forward
    monkeypatch.setattr(A, "attention_forward", lambda *args: launches.append(args[3]) or forward(*args))
    torch.manual_seed(0)
    embed, heads, batch, lq, lk = 32, 2, 2, 9, 11
    ours = gnn.MultiheadAttention(embed, heads, batch_first=batch_first)
    theirs = torch.nn.MultiheadAttention(embed, heads, batch_first=batch_first)
    theirs.load_state_dict(ours.state_dict())
    shape_q = (batch, lq, embed) if batch_first else (lq, batch, embed)
    shape_k = (batch, lk, embed) if batch_first else (lk, batch, embed)
    query, key = torch.randn(shape_q), torch.randn(shape_k)
    padding = torch.zeros(batch, lk, dtype=torch.bool)
    padding[1, -3:] = True
    attn_mask = torch.ones(lq, lk, dtype=torch.bool).triu(1)  # True = masked out, as torch.nn wants
    with gpudl.use_backend("triton"):
        out, _ = ours(query, key, key, key_padding_mask=padding, attn_mask=attn_mask)
    want, _ = theirs(query, key, key, key_padding_mask=padding, attn_mask=attn_mask, need_weights=False)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    assert len(launches) == 1 and launches[0].dtype == torch.float32  # the kernel ran, on the merged float mask
    grad = torch.randn_like(want)
    got = torch.autograd.grad(out, [ours.in_proj_weight, ours.out_proj.weight], grad)
    ref = torch.autograd.grad(want, [theirs.in_proj_weight, theirs.out_proj.weight], grad)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_fp32_precision_follows_torch_tf32_switch():
    """float32 attention runs IEEE products unless torch's matmul switch allows TF32 (as
    F.scaled_dot_product_attention's matmuls do); float64 stays IEEE. In a subprocess: mixing
    torch's two TF32 APIs in this process would make later reads raise."""
    script = """
import torch
from gpudl.kernels import attention as A
got = [A._precision(torch.float32)]
torch.set_float32_matmul_precision("high")
got += [A._precision(torch.float32), A._precision(torch.float64)]
torch.set_float32_matmul_precision("highest")
got.append(A._precision(torch.float32))
print(",".join(got))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "ieee,tf32,ieee,ieee"


# --------------------------------------------------------------------------- memory layout
def test_output_is_stored_as_blhd_and_the_head_merge_is_a_view():
    """The output [B, H, L, D] is stored as [B, L, H, D] (as torch's flash backend does), so
    multi-head attention's transpose(1, 2).reshape(B, L, H * D) copies nothing; gradients of q, k
    and v split from one projection are stored the same way, so they reach it through views."""
    b, h, length, d = 2, 3, 21, 16
    q, k, v = (torch.randn(b, length, h, d).transpose(1, 2).requires_grad_() for _ in range(3))
    out = A.scaled_dot_product_attention(q, k, v, None, 0.0, True, d**-0.5)
    merged = out.transpose(1, 2).reshape(b, length, h * d)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None  # a view, not a copy
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for grad in (dq, dk, dv):
        assert grad.transpose(1, 2).is_contiguous(), grad.stride()
    # Contiguous [B, H, L, D] inputs keep contiguous gradients (what their .grad would hold).
    q, k, v = _qkv(b, h, length, length, d)
    assert all(g.is_contiguous() for g in torch.autograd.grad(A.scaled_dot_product_attention(
        q, k, v, None, 0.0, False, d**-0.5), (q, k, v), torch.randn(b, h, length, d)))


def test_backward_reads_grad_out_in_the_output_layout(monkeypatch):
    """In gpudl.nn.MultiheadAttention the output's gradient comes back through out_proj and the head
    merge as a [B, L, H, D] tensor seen as [B, H, L, D]: the backward op takes it as it is."""
    seen = []
    backward = A.attention_backward

    def recording(do, *args, **kwargs):
        seen.append((do.stride(), do.is_contiguous(), do.transpose(1, 2).is_contiguous()))
        return backward(do, *args, **kwargs)

    monkeypatch.setattr(A, "attention_backward", recording)
    torch.manual_seed(0)
    mha = gnn.MultiheadAttention(24, 3, batch_first=True)
    x = torch.randn(2, 11, 24, requires_grad=True)
    with gpudl.use_backend("triton"):
        mha(x, x, x)[0].sum().backward()
    assert len(seen) == 1
    _, contiguous, blhd_contiguous = seen[0]
    assert blhd_contiguous and not contiguous, seen


def test_multihead_attention_saves_one_projection_and_one_output():
    """Self-attention in gpudl.nn.MultiheadAttention under bf16 autocast saves three activations
    of [N, L, E] elements: the input cast to bf16 ONCE (one packed q/k/v GEMM, not three casts),
    the packed projection (q, k and v are views of it) and the attention output (saved by the
    attention op and, through a view, by out_proj: one storage)."""
    torch.manual_seed(0)
    batch, length, embed = 3, 17, 16  # an activation (816 elements) outsizes every weight (768)
    mha = gnn.MultiheadAttention(embed, 2, batch_first=True)
    x = torch.randn(batch, length, embed, requires_grad=True)
    saved = []
    with gpudl.use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mha(x, x, x)
    big = [t for t in saved if t.numel() >= batch * length * embed]
    storages = {t.untyped_storage().data_ptr() for t in big}
    described = [(tuple(t.shape), t.dtype, t.stride()) for t in big]
    assert len(storages) == 3, described
    assert sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in big}.values()) \
        == (1 + 3 + 1) * batch * length * embed * 2, described  # bf16 x, qkv [N, L, 3E], output


def test_multihead_attention_loads_separate_and_renamed_projection_keys():
    """A state dict with q_proj_weight/k_proj_weight/v_proj_weight, or with the GPT attention's old
    qkv.*/proj.* names, loads into the packed in_proj_weight/in_proj_bias/out_proj.*."""
    torch.manual_seed(0)
    source = gnn.MultiheadAttention(16, 2, batch_first=True)
    state = source.state_dict()
    separate = {f"{n}_proj_weight": w for n, w in zip("qkv", state["in_proj_weight"].chunk(3))}
    separate.update({k: state[k] for k in ("in_proj_bias", "out_proj.weight", "out_proj.bias")})
    renamed = {"qkv.weight": state["in_proj_weight"], "qkv.bias": state["in_proj_bias"],
               "proj.weight": state["out_proj.weight"], "proj.bias": state["out_proj.bias"]}
    x = torch.randn(2, 5, 16)
    for old in (separate, renamed):
        target = gnn.MultiheadAttention(16, 2, batch_first=True)
        target.load_state_dict(old)  # strict: every key used, none missing
        for name, tensor in state.items():
            assert torch.equal(target.state_dict()[name], tensor), name
        with gpudl.use_backend("torch"):
            torch.testing.assert_close(target(x, x, x)[0], source(x, x, x)[0])
