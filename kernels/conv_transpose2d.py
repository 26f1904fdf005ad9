"""Transposed 2-D convolution (+ bias + activation) on the conv2d kernels, forward and backward.

Shapes (the normalized arguments of gpudl.reference.conv_transpose2d):
    input  x [N, C_in, H, W]              any strides
    weight w [C_in, C_out / groups, kH, kW]
    bias   b [C_out] or None
    output y [N, C_out, H_out, W_out]     H_out = (H - 1) * sH - 2 * pH + dH * (kH - 1) + opH + 1
                                          channels_last when x or w is (as F.conv_transpose2d does)

A transposed convolution is the input gradient of the convolution whose weight is w read as
[C_out_conv = C_in, C_in_g_conv = C_out / groups, kH, kW], with the same stride, padding, dilation
and groups. So every launch here is one of the conv2d kernels (gpudl.kernels.conv2d):
    forward  y  = act(dgrad(x, w) + b)           the dgrad kernel with its bias/activation epilogue
    backward dz = dy * act'(saved)               one elementwise pass (skipped without activation)
             dx = conv2d_fwd(dz, w)              the convolution itself, output cut to x's size
             dw = wgrad(grad_out=x, input=dz)    conv2d's weight gradient, roles as in the forward
             db = sum over (n, h, w) of dz       the wgrad kernel's bias-only mode, reading dy
No atomics: the reductions are per-program partials summed in a fixed order.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels import conv2d as _conv
from gpudl.kernels._common import activation_constexpr, activation_grad_from_saved, triton_dtype
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, first_order_only, kernel_op, no_tensor, register

# The conv2d kernels this op launches, bound here so that the registry's every-config test forces
# each of their autotune configs on this op's tuning case too.
_conv2d_fwd_kernel = _conv._conv2d_fwd_kernel
_conv2d_dgrad_kernel = _conv._conv2d_dgrad_kernel
_conv2d_wgrad_kernel = _conv._conv2d_wgrad_kernel

_ACT_GRAD_BLOCK = 1024


@triton.jit
def _activation_grad_kernel(
    g_ptr, s_ptr, out_ptr, NUMEL, C, H, W,
    sg_n, sg_c, sg_h, sg_w,
    ss_n, ss_c, ss_h, ss_w,
    so_n, so_c, so_h, so_w,
    ACTIVATION: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = g * act'(pre), from the saved output (or pre-activation for gelu), over [N, C, H, W]
    tensors of any strides (dy may be an expanded view)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    w = offs % W
    h = (offs // W) % H
    c = (offs // (W * H)) % C
    n = offs // (W * H * C)
    g = tl.load(g_ptr + n * sg_n + c * sg_c + h * sg_h + w * sg_w, mask=mask, other=0.0)
    s = tl.load(s_ptr + n * ss_n + c * ss_c + h * ss_h + w * ss_w, mask=mask, other=0.0)
    ACC: tl.constexpr = tl.float64 if g_ptr.dtype.element_ty == tl.float64 else tl.float32
    dz = activation_grad_from_saved(s.to(ACC), g.to(ACC), ACTIVATION)
    tl.store(out_ptr + n * so_n + c * so_c + h * so_h + w * so_w, dz.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- host launchers
def _out_size(size, stride, padding, output_padding, dilation, kernel):
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def _output_shape(x_shape, w_shape, stride, padding, output_padding, groups, dilation):
    n, _, h, wd = x_shape
    _, c_out_g, kh, kw = w_shape
    return (n, c_out_g * groups, _out_size(h, stride[0], padding[0], output_padding[0], dilation[0], kh),
            _out_size(wd, stride[1], padding[1], output_padding[1], dilation[1], kw))


def _output_format(x, w):
    return torch.channels_last if _conv._is_channels_last(x) or _conv._is_channels_last(w) else torch.contiguous_format


def _pad4(padding):
    # The conv2d launchers take (top, bottom, left, right) and read top and left only.
    return (padding[0], padding[0], padding[1], padding[1])


def _forward(x, w, b, stride, padding, output_padding, groups, dilation, act, store_z):
    shape = _output_shape(x.shape, w.shape, stride, padding, output_padding, groups, dilation)
    y = torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=_output_format(x, w))
    z = torch.empty_like(y) if store_z else None
    if y.numel() == 0:
        return y, z
    # The dgrad kernel reads x as the convolution's output gradient with no activation of its own
    # (act 0): every output element is written, taps that miss x contribute zero.
    _conv._conv2d_dgrad(x, None, w, y, stride, _pad4(padding), dilation, groups, "none", bias=b, out_act=act, z=z)
    return y, z


def _activation_grad(gy, saved, act):
    """dz = gy * act'(pre) with saved's (dense) strides."""
    dz = torch.empty_like(saved)
    numel = dz.numel()
    grid = (triton.cdiv(numel, _ACT_GRAD_BLOCK),)
    wrap_triton(_activation_grad_kernel)[grid](
        gy, saved, dz, numel, dz.shape[1], dz.shape[2], dz.shape[3],
        *gy.stride(), *saved.stride(), *dz.stride(),
        ACTIVATION=act, BLOCK=_ACT_GRAD_BLOCK, num_warps=4,
    )
    return dz


def _backward(gy, x, w, saved, x_shape, x_strides, w_shape, stride, padding, dilation, groups, act,
              need_x, need_w, need_b):
    """(dx with x's strides, dw, db); None for those not asked for."""
    like = dict(dtype=gy.dtype, device=gy.device)
    dx = dw = db = None
    if gy.numel() == 0:  # empty batch or no output channels: every gradient is zero
        dx = torch.empty_strided(x_shape, x_strides, **like).zero_() if need_x else None
        dw = torch.zeros(w_shape, **like) if need_w else None
        db = torch.zeros(gy.shape[1], **like) if need_b else None
        return dx, dw, db
    pad4 = _pad4(padding)
    # On a GPU the launches read channels-innermost operands: repack dy (and the saved output) once.
    gy, saved = _conv._channels_inner(gy), _conv._channels_inner(saved)
    dz = None
    if need_x or need_w:
        dz = gy if act == "none" else _activation_grad(gy, saved, act)
    if need_x:
        dx = torch.empty_strided(x_shape, x_strides, **like)
        if dx.numel() == 0:
            dx.zero_()
        else:
            # The convolution of dz, its output cut to x's size (rows past it would need
            # output_padding >= stride, which dilation allows; the kernel writes only dx's rows).
            _conv._conv2d_fwd_launch(dz, w, None, dx, None, stride, pad4, dilation, groups, 0)
    if need_w:
        if math.prod(w_shape) == 0 or x.numel() == 0:
            dw = torch.zeros(w_shape, **like)
        else:
            # conv2d's weight gradient with the roles of its forward: x is the output gradient, dz the input.
            dw, _ = _conv._conv2d_wgrad(x, None, dz, w_shape, stride, pad4, dilation, groups, 0, True, False)
    if need_b:
        # The wgrad kernel's bias-only mode sums dy * act'(saved) over (n, h, w), per group.
        c_out = gy.shape[1]
        stand_in = gy.new_empty((1, 1, 1, 1)).expand(gy.shape[0], groups, 1, 1)
        _, db = _conv._conv2d_wgrad(gy, saved, stand_in, (c_out, 1, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), groups,
                                    act, False, True)
    return dx, dw, db


# --------------------------------------------------------------------------- custom ops
@kernel_op("conv_transpose2d")
def _conv_transpose2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                         padding: list[int], output_padding: list[int], groups: int, dilation: list[int],
                         activation: Optional[str], store_pre: bool) -> tuple[Tensor, Tensor]:
    """(y [N, C_out, H_out, W_out], the pre-activation z (same layout) when store_pre, else empty)."""
    y, z = _forward(input, weight, bias, stride, padding, output_padding, groups, dilation,
                    activation_constexpr(activation), store_pre)
    return y, (z if z is not None else no_tensor(y))


@_conv_transpose2d_op.register_fake
def _(input, weight, bias, stride, padding, output_padding, groups, dilation, activation, store_pre):
    shape = _output_shape(input.shape, weight.shape, stride, padding, output_padding, groups, dilation)
    y = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=_output_format(input, weight))
    return y, (torch.empty_like(y) if store_pre else y.new_empty(0))


def _setup(ctx, inputs, output):
    x, w, _, stride, padding, _, groups, dilation, activation, store_pre = inputs
    _conv.save_for_backward(ctx, x, w, output, stride, padding, dilation, groups, activation, store_pre)


def _backward_autograd(ctx, grad_output, _grad_pre):
    x, w, saved = ctx.saved_tensors
    if grad_output is None:
        return (None,) * 10
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.gpudl.conv_transpose2d_backward(grad_output, x, w, saved, *ctx.conf, need_x, need_w, need_b)
    return (dx if need_x else None), (dw if need_w else None), (db if need_b else None), *(None,) * 7


_conv_transpose2d_op.register_autograd(_backward_autograd, setup_context=_setup)


@kernel_op("conv_transpose2d_backward")
def _conv_transpose2d_backward_op(grad_output: Tensor, input: Optional[Tensor], weight: Optional[Tensor],
                                  saved: Optional[Tensor], input_shape: list[int], input_strides: list[int],
                                  weight_shape: list[int], stride: list[int], padding: list[int],
                                  dilation: list[int], groups: int, activation: Optional[str], need_input: bool,
                                  need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dinput, dweight, dbias); each an empty tensor when not asked for."""
    act = activation_constexpr(activation)
    dx, dw, db = _backward(grad_output, input, weight, saved, input_shape, input_strides, weight_shape, stride,
                           padding, dilation, groups, act, need_input, need_weight, need_bias)
    return tuple(t if t is not None else no_tensor(grad_output) for t in (dx, dw, db))


first_order_only(_conv_transpose2d_backward_op)


@_conv_transpose2d_backward_op.register_fake
def _(grad_output, input, weight, saved, input_shape, input_strides, weight_shape, stride, padding, dilation, groups,
      activation, need_input, need_weight, need_bias):
    like = dict(dtype=grad_output.dtype, device=grad_output.device)
    return (torch.empty_strided(input_shape, input_strides, **like) if need_input else grad_output.new_empty(0),
            torch.empty(weight_shape, **like) if need_weight else grad_output.new_empty(0),
            torch.empty(grad_output.shape[1], **like) if need_bias else grad_output.new_empty(0))


def unsupported(input, weight, bias, stride, padding, output_padding, groups, dilation, activation_name):
    if groups > _conv._MAX_GRID_Z:
        return f"groups > {_conv._MAX_GRID_Z} (the CUDA grid limit of the group axis)"
    return None


def conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation, activation_name):
    """F.conv_transpose2d followed by an activation, in Triton.

    input [N, C_in, H, W]; weight [C_in, C_out / groups, kH, kW]; bias [C_out] or None;
    stride, padding, output_padding, dilation pairs; groups an int;
    activation_name None, 'relu', 'leaky_relu', 'tanh', 'sigmoid' or 'gelu'.
    Returns y [N, C_out, H_out, W_out], channels_last when input or weight is channels_last.
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    store_pre = needs_grad and activation_name == "gelu"
    return torch.ops.gpudl.conv_transpose2d(input, weight, bias, list(stride), list(padding), list(output_padding),
                                            int(groups), list(dilation), activation_name, store_pre)[0]


# --------------------------------------------------------------------------- registration
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
        common = {"KH": 4, "KW": 4, "INPUT_PRECISION": precision}
        # forward: the dgrad kernel with the full epilogue (bias, activation, z for gelu), every config
        for config in _conv._DGRAD_CONFIGS:
            variants.append(_conv._variant(_conv2d_dgrad_kernel, "fwd", config, dtype, {
                **common, "ACTIVATION": "none", "HAS_BIAS": True, "OUT_ACTIVATION": act,
                "STORE_Z": act == "gelu"}))
        # dx, dw, db: conv2d's kernels, whose every config conv2d's spec compiles; here the first
        # config, with this op's constexprs
        for config in _conv._FWD_CONFIGS[:1]:
            variants.append(_conv._variant(_conv2d_fwd_kernel, "dgrad", config, dtype, {
                **common, "ACTIVATION": "none", "HAS_BIAS": False, "STORE_Z": False}))
        # dw. (db is the wgrad kernel's bias-only mode, a reduction with no GEMM, which conv2d's
        # spec leaves out of its variants too.)
        for config in _conv._WGRAD_CONFIGS[:1]:
            variants.append(_conv._variant(_conv2d_wgrad_kernel, "wgrad", config, dtype, {
                **common, "ACTIVATION": "none", "COMPUTE_W": True, "COMPUTE_B": False}, acc_ptrs=("dw_ptr", "db_ptr")))
        ptr = triton_dtype(dtype)
        signature = {"g_ptr": ptr, "s_ptr": ptr, "out_ptr": ptr, **{a: "i32" for a in (
            "NUMEL", "C", "H", "W", "sg_n", "sg_c", "sg_h", "sg_w", "ss_n", "ss_c", "ss_h", "ss_w",
            "so_n", "so_c", "so_h", "so_w")}, "ACTIVATION": "constexpr", "BLOCK": "constexpr"}
        variants.append(CompileVariant(f"act_grad-{str(dtype).split('.')[-1]}", _activation_grad_kernel, signature,
                                       {"ACTIVATION": act, "BLOCK": _ACT_GRAD_BLOCK}, num_warps=4))
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
        _case("1x1_no_activation", 2, 7, 3, (3, 5), (1, 1)),
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
