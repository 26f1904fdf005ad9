"""Registration of binary_cross_entropy_with_logits, gan_discriminator_loss and gan_generator_loss
(kernels/bce.py): cases, compile variants, byte models."""

from __future__ import annotations

import torch
import triton.language as tl

from gpudl.kernels._common import sum_partials_variants, triton_dtype
from gpudl.kernels.bce import binary_cross_entropy_with_logits, gan_discriminator_loss, gan_generator_loss
from gpudl.kernels.bce_triton import (
    BLOCK,
    NUM_WARPS,
    TILED_MAX_BLOCK_C,
    _bce_fwd_kernel,
    _bce_tiled_kernel,
    _softplus_means_kernel,
)
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, register


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
        for w_mode, pw_mode, reduction, index_64 in (("absent", "absent", "mean", False),
                                                     ("strided", "strided", "none", False),
                                                     ("same", "strided", "sum", True)):
            name = f"bce-{str(dtype)[6:]}-w_{w_mode}-pw_{pw_mode}-{reduction}-i{64 if index_64 else 32}-B{BLOCK}"
            variants.append(CompileVariant(
                name, _bce_fwd_kernel,
                {"x_ptr": ptr, "t_ptr": ptr, "w_ptr": ptr, "pw_ptr": ptr,
                 "out_ptr": ptr if reduction == "none" else "*fp32", "gx_ptr": ptr, "gt_ptr": ptr,
                 "n": "i64" if index_64 else "i32",
                 **{f"{p}_{k}": "i64" for p in ("w", "pw") for k in ("size1", "size2", "s0", "s1", "s2")},
                 "W_MODE": "constexpr", "PW_MODE": "constexpr", "REDUCTION": "constexpr", "GRAD_X": "constexpr",
                 "GRAD_T": "constexpr", "ACC": "constexpr", "INDEX_64": "constexpr", "BLOCK": "constexpr"},
                {"W_MODE": w_mode, "PW_MODE": pw_mode, "REDUCTION": reduction, "GRAD_X": True, "GRAD_T": True,
                 "ACC": tl.float32, "INDEX_64": index_64, "BLOCK": BLOCK},
                num_warps=NUM_WARPS,
            ))
    # The tiled kernel (weights per row or per class), at a narrow, a middle and the widest tile.
    for dtype in (torch.float32, torch.bfloat16):
        ptr = triton_dtype(dtype)
        for w_mode, pw_mode, reduction, block_c in (("col", "col", "mean", 8), ("row", "col", "none", 64),
                                                    ("same", "row", "sum", TILED_MAX_BLOCK_C)):
            variants.append(CompileVariant(
                f"bce_tiled-{str(dtype)[6:]}-w_{w_mode}-pw_{pw_mode}-{reduction}-C{block_c}", _bce_tiled_kernel,
                {"x_ptr": ptr, "t_ptr": ptr, "w_ptr": ptr, "pw_ptr": ptr,
                 "out_ptr": ptr if reduction == "none" else "*fp32", "gx_ptr": ptr, "gt_ptr": ptr,
                 "n_rows": "i32", "n_cols": "i32", "n": "i64",
                 **{f"{p}_{k}": "i64" for p in ("w", "pw") for k in ("size1", "s0", "s1", "s_col")},
                 "W_MODE": "constexpr", "PW_MODE": "constexpr", "REDUCTION": "constexpr", "GRAD_X": "constexpr",
                 "GRAD_T": "constexpr", "ACC": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
                {"W_MODE": w_mode, "PW_MODE": pw_mode, "REDUCTION": reduction, "GRAD_X": True, "GRAD_T": True,
                 "ACC": tl.float32, "BLOCK_R": BLOCK // block_c, "BLOCK_C": block_c},
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
        # the tiled kernel over several programs: row blocks, then column blocks
        _bce_case("[600,7] mean weight[7] pos_weight[600,1]", (600, 7), "mean", (7,), (600, 1)),
        _bce_case("[3,1500] sum weight[1500]", (3, 1500), "sum", (1500,), target_grad=True),
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
