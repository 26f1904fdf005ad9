"""conv_transpose2d's registration data: cases, gradcheck and tuning cases, bench cases, compile
variants, the FLOP/byte model and `SPEC`."""

from __future__ import annotations

import math

import torch

from gpudl.kernels import conv2d_spec as _conv_spec
from gpudl.kernels.conv2d_triton import (
    DEPTHWISE_DGRAD_TILES,
    DGRAD_TILES,
    FWD_TILES,
    WGRAD_TILES,
    _conv2d_dgrad_kernel,
    _conv2d_fwd_kernel,
    _conv2d_wgrad_kernel,
    tap_steps,
)
from gpudl.kernels.conv_transpose2d import _output_shape, conv_transpose2d, unsupported
from gpudl.kernels.registry import Case, KernelSpec, register


def _case(name, n, c_in, c_out, hw, k, stride=(1, 1), padding=(0, 0), output_padding=(0, 0), dilation=(1, 1),
          groups=1, act=None, bias=True, channels_last=False):
    def make(dtype, device):
        # Each output element sums about C_in / groups * kH * kW / (sH * sW) products.
        fan = max(1.0, c_in // groups * k[0] * k[1] / (stride[0] * stride[1]))
        x = torch.randn(n, c_in, *hw, device=device).to(dtype)
        w = (torch.randn(c_in, c_out // groups, *k, device=device) / math.sqrt(fan)).to(dtype)
        b = torch.randn(c_out, device=device).to(dtype).requires_grad_() if bias else None
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
            w = w.to(memory_format=torch.channels_last)
        return (x.requires_grad_(), w.requires_grad_(), b, stride, padding, output_padding, groups, dilation, act)

    return Case(name, make)


def _flops(args):
    x, w = args[0], args[1]
    return 2.0 * x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] * w.shape[1] * w.shape[2] * w.shape[3]


def _bytes_moved(args):
    x, w, b, stride, padding, output_padding, groups, dilation = args[:8]
    out = math.prod(_output_shape(x.shape, w.shape, stride, padding, output_padding, groups, dilation))
    return (x.numel() + w.numel() + (b.numel() if b is not None else 0) + out) * x.element_size()


def _compile_variants():
    variants = []
    for dtype in (torch.float32, torch.bfloat16):
        precision = "tf32" if dtype == torch.float32 else "ieee"
        act = "relu" if dtype == torch.float32 else "gelu"
        # The DCGAN layer: kernel 4, stride 2 (two taps per phase and axis).
        geometry = {**_conv_spec.geometry(stride=2, kernel=4)}
        # forward: the dgrad kernel with the full epilogue (bias, activation, z for gelu), every tile
        for config in _conv_spec.for_operands(DGRAD_TILES, dtype):
            variants.append(_conv_spec._variant(_conv2d_dgrad_kernel, "fwd", config, dtype, {
                **geometry, **tap_steps((2, 2), (1, 1)), "INPUT_PRECISION": precision, "HAS_BIAS": True,
                "ACTIVATION": act, "STORE_Z": act == "gelu"}))
        # forward with C_out / groups = 1: the depthwise dgrad kernel with the same epilogue
        variants.append(_conv_spec.depthwise_variant("fwd_dw", DEPTHWISE_DGRAD_TILES[0], dtype, {
            **geometry, **tap_steps((2, 2), (1, 1)), "C_OUT_G": 1, "HAS_BIAS": True,
            "ACTIVATION": act, "STORE_Z": act == "gelu"}))
        # dx and dw: conv2d's kernels, whose every tile conv2d's spec compiles; here the first tile,
        # with this op's geometry. (dz and db are conv2d's elementwise kernels, compiled there.)
        variants.append(_conv_spec._variant(_conv2d_fwd_kernel, "dgrad", FWD_TILES[0], dtype, {
            **geometry, "INPUT_PRECISION": precision, "ACTIVATION": "none", "HAS_BIAS": False, "STORE_Z": False}))
        variants.append(_conv_spec._variant(_conv2d_wgrad_kernel, "wgrad", WGRAD_TILES[0], dtype, {
            **geometry, "INPUT_PRECISION": precision}, acc_ptrs=("dw_ptr",)))
    return variants


def _dcgan_case(name, n, c_in, c_out, hw, act, channels_last=False):
    """A DCGAN generator layer: kernel 4, stride 2, padding 1 doubles the resolution."""
    def make(dtype, device):
        x = torch.randn(n, c_in, hw, hw, device=device, dtype=dtype)
        w = (torch.randn(c_in, c_out, 4, 4, device=device) / math.sqrt(4 * c_in)).to(dtype)
        b = torch.randn(c_out, device=device, dtype=dtype)
        if channels_last:
            x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
        return (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), (2, 2), (1, 1), (0, 0), 1, (1, 1), act)

    return Case(name, make)


SPEC = register(KernelSpec(
    op="conv_transpose2d",
    triton=conv_transpose2d,
    unsupported=unsupported,
    cases=[
        _case("regular_4x4_stride2_relu", 2, 4, 6, (4, 4), (4, 4), stride=(2, 2), padding=(1, 1), act="relu"),
        _case("ragged_stride2_output_padding_leaky", 1, 3, 5, (5, 7), (3, 3), stride=(2, 2), padding=(1, 1),
              output_padding=(1, 1), act="leaky_relu"),
        # output_padding 1 >= stride 1 in H (allowed by dilation 2): the input gradient is cut to x's rows
        _case("groups2_dilation_channels_last_sigmoid", 2, 4, 6, (4, 5), (3, 2), stride=(1, 2), padding=(1, 0),
              output_padding=(1, 1), dilation=(2, 1), groups=2, act="sigmoid", channels_last=True),
        _case("stride3_gelu_nobias", 1, 5, 3, (3, 4), (2, 3), stride=(3, 2), padding=(0, 1), act="gelu", bias=False),
        _case("depthwise_tanh", 2, 3, 6, (5, 4), (3, 3), stride=(2, 1), padding=(1, 1), groups=3, act="tanh"),
        # One output channel per group: the forward runs the depthwise dgrad kernel, epilogue included.
        _case("depthwise_out_stride2_gelu", 2, 4, 2, (8, 9), (3, 3), stride=(2, 2), padding=(1, 1),
              output_padding=(1, 0), groups=2, act="gelu"),
        _case("1x1_no_activation", 2, 7, 3, (3, 5), (1, 1)),
        # More output channels than a bias-gradient program sums: several programs.
        _case("wide_72_channels_stride2_relu", 1, 3, 72, (2, 2), (2, 2), stride=(2, 2), act="relu"),
    ],
    gradcheck_case=_case("gradcheck_gelu", 1, 2, 3, (3, 4), (3, 3), stride=(2, 1), padding=(1, 0),
                         output_padding=(1, 0), dilation=(1, 2), act="gelu"),
    # As conv2d: IEEE fp32 through the interpreter; TF32 on GPUs (cudnn.allow_tf32, as F.conv_transpose2d).
    tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)},
    gpu_tolerances={torch.float32: (5e-3, 5e-3)},
    # Two groups, so that every kernel (forward, dx, dw, db) runs on several programs under each config.
    tuning_cases=[_case("tuning_groups2_stride2_gelu", 2, 8, 16, (5, 5), (3, 3), stride=(2, 2), padding=(1, 1),
                        output_padding=(1, 1), groups=2, act="gelu")],
    compile_variants=_compile_variants,
    bench_cases=[
        _dcgan_case("dcgan_512to256_4x4", 128, 512, 256, 4, "relu"),
        _dcgan_case("dcgan_256to128_8x8", 128, 256, 128, 8, "relu"),
        _dcgan_case("dcgan_128to64_16x16", 128, 128, 64, 16, "relu"),
        _dcgan_case("dcgan_64to3_32x32_tanh", 128, 64, 3, 32, "tanh"),
        _dcgan_case("dcgan_256to128_8x8_channels_last", 128, 256, 128, 8, "relu", channels_last=True),
    ],
    flops=_flops,
    bytes_moved=_bytes_moved,
    description="transposed conv2d on the conv2d kernels: forward = dgrad with fused bias + activation; "
                "backward = conv2d forward (dx) + wgrad (dw) + bias-only wgrad (db)",
))
