"""max_pool2d's registration data: cases, gradcheck and tuning cases, bench cases, compile
variants, the FLOP/byte model and `SPEC`."""

from __future__ import annotations

import torch
import triton

from gpudl.kernels._common import triton_dtype
from gpudl.kernels.max_pool2d import max_pool2d, pool_output_size, unsupported
from gpudl.kernels.max_pool2d_triton import (
    _FWD_CONFIGS,
    BWD_WARPS,
    PLANE_TILE_COLS,
    PLANE_TILE_ROWS,
    PLANE_TILE_WARPS,
    _max_pool2d_bwd_kernel,
    _max_pool2d_fwd_kernel,
    _max_pool2d_fwd_plane_kernel,
    bwd_block,
)
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, register


def _pool_case(name, n, c, hw, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False,
               channels_last=False, ties=False):
    def make(dtype, device):
        if ties:  # few distinct values: many windows tie, checking the first-maximum rule
            x = torch.randint(0, 3, (n, c, *hw), device=device).to(dtype)
        else:
            x = torch.randn(n, c, *hw, device=device).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        return (x.requires_grad_(), kernel_size, stride, padding, dilation, ceil_mode)

    return Case(name, make)


def _pool_bytes(args):
    """x read once, y written once, and the int32 argmax written when x requires grad (the
    training forward: the backward reads it instead of x)."""
    x, kernel_size, stride, padding, dilation, ceil_mode = args
    h_out = pool_output_size(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    w_out = pool_output_size(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    out = x.shape[0] * x.shape[1] * h_out * w_out
    return (x.numel() + out) * x.element_size() + (out * 4 if x.requires_grad else 0)


def _pool_flops(args):
    x, kernel_size, stride, padding, dilation, ceil_mode = args
    h_out = pool_output_size(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    w_out = pool_output_size(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    return float(x.shape[0] * x.shape[1] * h_out * w_out * kernel_size[0] * kernel_size[1])  # comparisons


def _compile_variants():
    variants = []
    for dtype in (torch.float32, torch.bfloat16):
        label = str(dtype).split(".")[-1]
        ptr = triton_dtype(dtype)
        for channels_last in (False, True):
            layout = "nhwc" if channels_last else "nchw"
            for config in _FWD_CONFIGS if channels_last else []:  # NCHW runs the plane kernel below
                fn = _max_pool2d_fwd_kernel.fn
                constexprs = {"KH": 3, "KW": 3, "CHANNELS_LAST": channels_last, "STORE_INDEX": True, **config.kwargs}
                signature = {a: "constexpr" if a in constexprs else ptr if a in ("x_ptr", "y_ptr") else
                             "*i32" if a == "idx_ptr" else "i32" for a in fn.arg_names}
                variants.append(CompileVariant(f"fwd-{label}-{layout}-b{config.kwargs['BLOCK']}-w{config.num_warps}",
                                               fn, signature, constexprs, config.num_warps, config.num_stages))
            fn = _max_pool2d_bwd_kernel
            block = bwd_block(channels_last, torch.tensor([], dtype=dtype).element_size())
            constexprs = {"KH": 3, "KW": 3, "CHANNELS_LAST": channels_last, "BLOCK": block}
            signature = {a: "constexpr" if a in constexprs else ptr if a in ("gy_ptr", "dx_ptr") else
                         "*i32" if a == "idx_ptr" else "i32" for a in fn.arg_names}
            variants.append(CompileVariant(f"bwd-{label}-{layout}-b{block}-w{BWD_WARPS}", fn, signature,
                                           constexprs, BWD_WARPS))
        # The NCHW forward at its full tile, for the ResNet stem (3x3 stride 2) and LeNet's 2x2 stride 2.
        fn = _max_pool2d_fwd_plane_kernel
        for k in (3, 2):
            block_ih = triton.next_power_of_2((PLANE_TILE_ROWS - 1) * 2 + k)
            block_iw = triton.next_power_of_2((PLANE_TILE_COLS - 1) * 2 + k)
            constexprs = {"STRIDE_H": 2, "STRIDE_W": 2, "DIL_H": 1, "DIL_W": 1, "KH": k, "KW": k, "STORE_INDEX": True,
                          "BLOCK_OH": PLANE_TILE_ROWS, "BLOCK_OW": PLANE_TILE_COLS, "BLOCK_IH": block_ih,
                          "BLOCK_IW": block_iw}
            signature = {a: "constexpr" if a in constexprs else ptr if a in ("x_ptr", "y_ptr") else
                         "*i32" if a == "idx_ptr" else "i32" for a in fn.arg_names}
            variants.append(CompileVariant(f"fwd-planes-{label}-nchw-k{k}s2", fn, signature, constexprs,
                                           PLANE_TILE_WARPS))
    return variants


SPEC = register(KernelSpec(
    op="max_pool2d",
    triton=max_pool2d,
    unsupported=unsupported,
    cases=[
        _pool_case("regular_k2_s2", 2, 3, (8, 8), (2, 2), (2, 2)),
        _pool_case("overlapping_k3_s2_p1_ties", 2, 3, (9, 7), (3, 3), (2, 2), (1, 1), ties=True),
        _pool_case("ceil_mode_dilation_channels_last", 2, 5, (10, 11), (3, 2), (2, 3), (1, 1), (2, 1), ceil_mode=True,
                   channels_last=True),
        _pool_case("rect_k3x1_s1", 1, 4, (6, 5), (3, 1), (1, 1), (1, 0)),
        # 2304 outputs: several programs of the channels_last forward's first BLOCK (1024).
        _pool_case("channels_last_k2_s2_several_programs", 2, 8, (24, 24), (2, 2), (2, 2), channels_last=True),
    ],
    gradcheck_case=_pool_case("gradcheck", 1, 2, (5, 6), (3, 3), (2, 2), (1, 1), ceil_mode=True),
    # Max pooling selects, it does not round: only the gradient sums of overlapping windows add error.
    tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)},
    compile_variants=_compile_variants,
    # 2 x 4 x 16 x 16 = 2048 outputs: several programs of every config's BLOCK of the autotuned
    # (channels_last) forward kernel.
    tuning_cases=[_pool_case("tuning_2x4x32x32_k3_s2_p1_channels_last", 2, 4, (32, 32), (3, 3), (2, 2), (1, 1),
                             channels_last=True)],
    bench_cases=[
        Case("resnet_stem_c64_112x112_k3_s2_p1",
             lambda dtype, device: (torch.randn(32, 64, 112, 112, device=device, dtype=dtype)
                                    .to(memory_format=torch.channels_last).requires_grad_(), (3, 3), (2, 2), (1, 1),
                                    (1, 1), False)),
        Case("nchw_c64_112x112_k3_s2_p1",
             lambda dtype, device: (torch.randn(32, 64, 112, 112, device=device, dtype=dtype).requires_grad_(),
                                    (3, 3), (2, 2), (1, 1), (1, 1), False)),
    ],
    flops=_pool_flops,
    bytes_moved=_pool_bytes,
    description="max_pool2d storing the int32 argmax; backward gathers each input's windows (deterministic)",
))
