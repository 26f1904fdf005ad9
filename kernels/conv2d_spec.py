"""conv2d's registration data: cases, gradcheck and tuning cases, bench cases, compile variants,
the FLOP/byte model and `SPEC`."""

from __future__ import annotations

import math

import torch

from gpudl.kernels._common import triton_dtype
from gpudl.kernels.conv2d import _out_size, conv2d, unsupported
from gpudl.kernels.conv2d_triton import (
    ACT_GRAD_BLOCK,
    BIAS_GRAD_CHANNELS,
    BIAS_GRAD_ROWS,
    DEPTHWISE_DGRAD_TILES,
    DGRAD_TILES,
    FWD_TILES,
    WGRAD_TILES,
    _activation_grad_kernel,
    _bias_grad_kernel,
    _conv2d_dgrad_depthwise_kernel,
    _conv2d_dgrad_kernel,
    _conv2d_fwd_kernel,
    _conv2d_wgrad_kernel,
    for_operands,
    tap_steps,
)
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, register


def _conv_case(name, n, c_in, c_out, hw, k, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1,
               act=None, bias=True, channels_last=False):
    def make(dtype, device):
        fan_in = c_in // groups * k[0] * k[1]
        x = torch.randn(n, c_in, *hw, device=device).to(dtype)
        # Kaiming-like scale keeps outputs O(1), so TF32 / half-precision errors stay relative.
        w = (torch.randn(c_out, c_in // groups, *k, device=device) / math.sqrt(fan_in)).to(dtype)
        b = torch.randn(c_out, device=device).to(dtype).requires_grad_() if bias else None
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
            w = w.to(memory_format=torch.channels_last)
        return (x.requires_grad_(), w.requires_grad_(), b, stride, padding, dilation, groups, act)

    return Case(name, make)


def _out_hw(args):
    x, w, _, stride, padding, dilation = args[:6]
    return (_out_size(x.shape[2], padding[0], padding[1], dilation[0], w.shape[2], stride[0]),
            _out_size(x.shape[3], padding[2], padding[3], dilation[1], w.shape[3], stride[1]))


def _flops(args):
    x, w = args[0], args[1]
    h_out, w_out = _out_hw(args)
    return 2.0 * x.shape[0] * w.shape[0] * h_out * w_out * w.shape[1] * w.shape[2] * w.shape[3]


def _bytes_moved(args):
    x, w, b = args[0], args[1], args[2]
    h_out, w_out = _out_hw(args)
    out = x.shape[0] * w.shape[0] * h_out * w_out
    return (x.numel() + w.numel() + (b.numel() if b is not None else 0) + out) * x.element_size()


def _variant(kernel, label, config, dtype, constexprs, acc_ptrs=()):
    """A CompileVariant of `kernel` (an Autotuner) with one of its configs: pointers of `dtype`
    except `acc_ptrs` (fp32 partial buffers), every integer argument i32."""
    fn = kernel.fn
    constexprs = {**constexprs, **config.kwargs}
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in acc_ptrs else triton_dtype(dtype)
        else:
            signature[arg] = "i32"
    blocks = "x".join(str(config.kwargs[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    name = f"{label}-{str(dtype).split('.')[-1]}-{blocks}-w{config.num_warps}s{config.num_stages}"
    return CompileVariant(name, fn, signature, constexprs, config.num_warps, config.num_stages)


def depthwise_variant(label, config, dtype, constexprs):
    """A CompileVariant of the depthwise dgrad kernel (CUDA cores, no K block) with one config."""
    fn = _conv2d_dgrad_depthwise_kernel
    constexprs = {**constexprs, **config.kwargs}
    signature = {a: "constexpr" if a in constexprs else triton_dtype(dtype) if a.endswith("_ptr") else "i32"
                 for a in fn.arg_names}
    blocks = "x".join(str(config.kwargs[b]) for b in ("BLOCK_M", "BLOCK_N"))
    name = f"{label}-{str(dtype).split('.')[-1]}-{blocks}-w{config.num_warps}"
    return CompileVariant(name, fn, signature, constexprs, config.num_warps, config.num_stages)


def geometry(stride=1, dilation=1, kernel=3) -> dict:
    """The geometry constexprs of a compile variant (square: a model's usual convolutions)."""
    return {"STRIDE_H": stride, "STRIDE_W": stride, "DIL_H": dilation, "DIL_W": dilation, "KH": kernel,
            "KW": kernel, "INDEX_64": False}


def elementwise_variants(dtype) -> list[CompileVariant]:
    """The activation-gradient pass and the bias-gradient reduction, in both of their layouts."""
    label, ptr = str(dtype).split(".")[-1], triton_dtype(dtype)
    variants = []
    for same in (True, False):
        fn = _activation_grad_kernel
        constexprs = {"ACTIVATION": "gelu", "SAME_DENSE_LAYOUT": same, "BLOCK": ACT_GRAD_BLOCK}
        signature = {a: "constexpr" if a in constexprs else ptr if a.endswith("_ptr") else "i32" for a in fn.arg_names}
        variants.append(CompileVariant(f"act_grad-{label}-{'flat' if same else 'strided'}", fn, signature,
                                       constexprs, num_warps=4))
    fn = _bias_grad_kernel
    constexprs = {"BLOCK_M": BIAS_GRAD_ROWS, "BLOCK_C": BIAS_GRAD_CHANNELS}
    signature = {a: "constexpr" if a in constexprs else ptr if a == "g_ptr" else "*fp32" if a == "db_ptr" else "i32"
                 for a in fn.arg_names}
    variants.append(CompileVariant(f"bias_grad-{label}", fn, signature, constexprs, num_warps=4))
    return variants


def _compile_variants():
    variants = []
    for dtype in (torch.float32, torch.bfloat16):
        precision = "tf32" if dtype == torch.float32 else "ieee"
        # fp32 variants compile the relu epilogue, bf16 ones the heaviest (gelu, storing z).
        act = "relu" if dtype == torch.float32 else "gelu"
        fwd = {"ACTIVATION": act, "INPUT_PRECISION": precision, "HAS_BIAS": True, "STORE_Z": act == "gelu"}
        # Every tile at 3x3 stride 1; the first tile at stride 2 too (the downsampling layers).
        for stride, tiles in ((1, FWD_TILES), (2, FWD_TILES[:1])):
            for config in tiles:
                variants.append(_variant(_conv2d_fwd_kernel, f"fwd-s{stride}", config, dtype,
                                         {**fwd, **geometry(stride)}))
        dgrad = {"INPUT_PRECISION": precision, "HAS_BIAS": False, "ACTIVATION": "none", "STORE_Z": False}
        for stride, tiles in ((1, for_operands(DGRAD_TILES, dtype)), (2, for_operands(DGRAD_TILES, dtype)[:1])):
            for config in tiles:
                variants.append(_variant(_conv2d_dgrad_kernel, f"dgrad-s{stride}", config, dtype,
                                         {**dgrad, **geometry(stride), **tap_steps((stride, stride), (1, 1))}))
        # Depthwise dgrad (C_in_g = 1): every tile at stride 1, the first at stride 2.
        for stride, tiles in ((1, DEPTHWISE_DGRAD_TILES), (2, DEPTHWISE_DGRAD_TILES[:1])):
            for config in tiles:
                variants.append(depthwise_variant(f"dgrad_dw-s{stride}", config, dtype, {
                    **geometry(stride), **tap_steps((stride, stride), (1, 1)), "C_OUT_G": 1,
                    "HAS_BIAS": False, "ACTIVATION": "none", "STORE_Z": False}))
        for stride, tiles in ((1, for_operands(WGRAD_TILES, dtype)), (2, WGRAD_TILES[:1])):
            for config in tiles:
                variants.append(_variant(_conv2d_wgrad_kernel, f"wgrad-s{stride}", config, dtype,
                                         {"INPUT_PRECISION": precision, **geometry(stride)}, acc_ptrs=("dw_ptr",)))
        variants += elementwise_variants(dtype)
    return variants


def _resnet_case(name, n, c, hw):
    def make(dtype, device):
        x = torch.randn(n, c, hw, hw, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        w = (torch.randn(c, c, 3, 3, device=device) / math.sqrt(9 * c)).to(dtype).to(memory_format=torch.channels_last)
        b = torch.randn(c, device=device, dtype=dtype)
        return (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), (1, 1), (1, 1, 1, 1), (1, 1), 1, "relu")

    return Case(name, make)


SPEC = register(KernelSpec(
    op="conv2d",
    triton=conv2d,
    unsupported=unsupported,
    cases=[
        _conv_case("regular_3x3_relu", 2, 4, 8, (8, 8), (3, 3), padding=(1, 1, 1, 1), act="relu"),
        _conv_case("ragged_stride2_dilation2_leaky", 2, 3, 5, (7, 9), (3, 3), stride=(2, 2), padding=(1, 2, 2, 1),
                   dilation=(2, 2), act="leaky_relu"),
        _conv_case("same_2x2_asymmetric_tanh_nobias", 1, 3, 5, (5, 7), (2, 2), padding=(0, 1, 0, 1), act="tanh",
                   bias=False),
        _conv_case("groups2_channels_last_sigmoid", 2, 4, 6, (6, 5), (3, 1), stride=(2, 1), padding=(1, 1, 0, 0),
                   groups=2, act="sigmoid", channels_last=True),
        _conv_case("rect_1x3_stride_w2_gelu", 1, 5, 3, (6, 10), (1, 3), stride=(1, 2), padding=(0, 0, 1, 1),
                   act="gelu"),
        # C_in_g = 1: the depthwise dgrad kernel, 162 input positions = two programs of its 128-row tile.
        _conv_case("depthwise_no_activation", 2, 3, 6, (9, 9), (3, 3), padding=(1, 1, 1, 1), groups=3),
        # More output channels than a bias-gradient program sums (BIAS_GRAD_CHANNELS), more elements
        # than an activation-gradient program: several programs of each.
        _conv_case("wide_72_channels_1x1_relu", 2, 3, 72, (3, 3), (1, 1), act="relu"),
    ],
    gradcheck_case=_conv_case("gradcheck_gelu", 1, 2, 3, (5, 4), (3, 3), stride=(2, 1), padding=(1, 0, 1, 1),
                              dilation=(1, 2), act="gelu"),
    # fp32 through the interpreter is IEEE (the cases need 4e-7); on GPUs fp32 runs on TF32 tensor
    # cores, as F.conv2d does by default (cudnn.allow_tf32): 10-bit products.
    tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)},
    gpu_tolerances={torch.float32: (5e-3, 5e-3)},
    # Several programs along M, several K steps in every kernel, under each config.
    tuning_cases=[_conv_case("tuning_2x8x16_12x12_gelu", 2, 8, 16, (12, 12), (3, 3), padding=(1, 1, 1, 1),
                             act="gelu")],
    compile_variants=_compile_variants,
    bench_cases=[
        _resnet_case("resnet_c64_56x56", 32, 64, 56),
        _resnet_case("resnet_c128_28x28", 32, 128, 28),
        _resnet_case("resnet_c256_14x14", 32, 256, 14),
        _resnet_case("resnet_c512_7x7", 32, 512, 7),
    ],
    flops=_flops,
    bytes_moved=_bytes_moved,
    description="implicit-GEMM conv2d with fused bias + activation; dgrad/wgrad implicit GEMMs "
                "(depthwise dgrad on CUDA cores), activation and bias gradients in their own passes",
))
