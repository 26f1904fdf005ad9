"""conv2d's registration data: cases, gradcheck and tuning cases, bench cases, compile variants,
the FLOP/byte model and `SPEC`."""

from __future__ import annotations

import math

import torch

from gpudl.kernels._common import triton_dtype
from gpudl.kernels.conv2d import _out_size, conv2d, unsupported
from gpudl.kernels.conv2d_triton import (
    _DGRAD_CONFIGS,
    _FWD_CONFIGS,
    _WGRAD_CONFIGS,
    _conv2d_dgrad_kernel,
    _conv2d_fwd_kernel,
    _conv2d_wgrad_kernel,
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


def _compile_variants():
    variants = []
    for dtype in (torch.float32, torch.bfloat16):
        precision = "tf32" if dtype == torch.float32 else "ieee"
        # fp32 variants compile the relu epilogue, bf16 ones the heaviest (gelu, storing z).
        act = "relu" if dtype == torch.float32 else "gelu"
        common = {"KH": 3, "KW": 3, "ACTIVATION": act, "INPUT_PRECISION": precision}
        for config in _FWD_CONFIGS:
            variants.append(_variant(_conv2d_fwd_kernel, "fwd", config, dtype,
                                     {**common, "HAS_BIAS": True, "STORE_Z": act == "gelu"}))
        for config in _DGRAD_CONFIGS:
            variants.append(_variant(_conv2d_dgrad_kernel, "dgrad", config, dtype,
                                     {**common, "HAS_BIAS": False, "OUT_ACTIVATION": "none", "STORE_Z": False}))
        for config in _WGRAD_CONFIGS:
            variants.append(_variant(_conv2d_wgrad_kernel, "wgrad", config, dtype,
                                     {**common, "COMPUTE_W": True, "COMPUTE_B": True}, acc_ptrs=("dw_ptr", "db_ptr")))
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
        _conv_case("depthwise_no_activation", 2, 3, 6, (5, 5), (3, 3), padding=(1, 1, 1, 1), groups=3),
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
    description="implicit-GEMM conv2d with fused bias + activation; dgrad/wgrad implicit GEMMs, "
                "bias grad fused in wgrad",
))
