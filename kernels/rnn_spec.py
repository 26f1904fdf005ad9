"""Registration of the rnn op (kernels/rnn.py): cases, gradcheck case, compile variants of both
kernels at every block size, the FLOP/byte model and the cuDNN baseline."""

from __future__ import annotations

import torch

from gpudl.kernels._common import tl_acc, triton_dtype
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, register
from gpudl.kernels.rnn import rnn, unsupported
from gpudl.kernels.rnn_triton import (
    _rnn_backward_kernel,
    _rnn_forward_kernel,
    backward_stages,
    backward_warps,
    forward_stages,
    input_config,
    launch_config,
)


def _make(length, batch, h_in, hidden, nonlinearity="tanh", batch_first=False, bias=True, hx_grad=True):
    """A case's arguments. relu cases keep every pre-activation at least ~0.3 away from 0 (a
    bias of +-0.6..1 dominates small weights): otherwise a half-precision run and its fp32
    reference would disagree on a relu's on/off state somewhere, and one flipped unit changes
    the gradients by O(1), which is a property of relu in bf16, not an error of the kernel."""

    def make(dtype, device):
        relu = nonlinearity == "relu"
        scale = (0.05 if relu else 1.0) * hidden**-0.5  # tanh: torch.nn.RNN's init range
        x = torch.randn((batch, length, h_in) if batch_first else (length, batch, h_in), dtype=dtype, device=device)
        hx = (0.5 * torch.randn(batch, hidden, dtype=dtype, device=device)).requires_grad_(hx_grad)
        w_ih = (scale * torch.randn(hidden, h_in, dtype=dtype, device=device)).requires_grad_()
        w_hh = (scale * torch.randn(hidden, hidden, dtype=dtype, device=device)).requires_grad_()
        b_ih = b_hh = None
        if bias:
            b_ih = scale * torch.randn(hidden, dtype=dtype, device=device)
            if relu:
                sign = torch.where(torch.rand(hidden, device=device) < 0.5, -1.0, 1.0)
                b_ih = (sign * (0.6 + 0.4 * torch.rand(hidden, device=device))).to(dtype)
            b_ih = b_ih.requires_grad_()
            b_hh = (scale * torch.randn(hidden, dtype=dtype, device=device)).requires_grad_()
        return (x.requires_grad_(), hx, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_first)

    return make


def _flops(args):
    x, _hx, w_ih, w_hh = args[:4]
    batch_first = args[7]
    length, batch = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
    return 2.0 * length * batch * w_hh.shape[0] * (w_ih.shape[1] + w_hh.shape[0])


def _bytes(args):
    x, hx, w_ih, w_hh, b_ih, b_hh = args[:6]
    out = x.numel() // x.shape[-1] * w_hh.shape[0] * x.element_size()
    return sum(t.numel() * t.element_size() for t in (x, hx, w_ih, w_hh, b_ih, b_hh) if t is not None) + out


def _cudnn_rnn(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, batch_first):
    """What torch.nn.RNN(H_in, H, nonlinearity=..., bias=..., batch_first=...) runs with these
    weights (cuDNN on a GPU): its functional core, so the gradients reach the given tensors."""
    has_bias = bias_ih is not None or bias_hh is not None
    biases = [b if b is not None else weight_hh.new_zeros(weight_hh.shape[0]) for b in (bias_ih, bias_hh)]
    weights = [weight_ih, weight_hh] + (biases if has_bias else [])
    fn = torch.rnn_tanh if nonlinearity == "tanh" else torch.rnn_relu
    # args: input, hx, weights, has_biases, num_layers, dropout, train, bidirectional, batch_first
    output, h_n = fn(input, hx.unsqueeze(0), weights, has_bias, 1, 0.0, True, False, batch_first)
    return output, h_n.squeeze(0)


def _compile_variants():
    variants = []
    # fp32 and bf16, plus fp64 (the harness's gradcheck runs the kernel in float64 on a GPU too).
    # At H_in 28 (the sequential-MNIST rows; 8 for the digits: the same blocks), and the resident
    # kernels also at H_in 256 (W_ih streamed in chunks).
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for hidden in (64, 128, 256, 512):
            cfg = launch_config(hidden, dtype)
            consts = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_H", "BLOCK_K", "RESIDENT")}
            act = ("tanh", "relu")[hidden // 64 % 2]  # alternate across variants
            ptr = triton_dtype(dtype)
            tag = f"{str(dtype)[6:]}-H{cfg['BLOCK_H']}-K{cfg['BLOCK_K']}{'-resident' if cfg['RESIDENT'] else ''}"
            for input_size in (28, 256) if cfg["RESIDENT"] else (28,):
                inputs = input_config(input_size, cfg, dtype)
                in_tag = f"-I{inputs['BLOCK_I']}{'-resident' if inputs['INPUT_RESIDENT'] else ''}"
                variants.append(CompileVariant(
                    name=f"rnn-fwd-{tag}{in_tag}", kernel=_rnn_forward_kernel,
                    signature={"x_ptr": ptr, "h0_ptr": ptr, "wi_ptr": ptr, "w_ptr": ptr, "b_ptr": triton_dtype(
                               torch.float64 if dtype == torch.float64 else torch.float32), "out_ptr": ptr,
                               "hn_ptr": ptr, "L": "i32", "N": "i32", "H": "i32", "H_in": "i32", "sx_t": "i32",
                               "sx_n": "i32", "so_t": "i32", "so_n": "i32",
                               "HAS_BIAS": "constexpr", "ACTIVATION": "constexpr", "ACC_DTYPE": "constexpr",
                               "BLOCK_N": "constexpr", "BLOCK_H": "constexpr", "BLOCK_K": "constexpr",
                               "BLOCK_I": "constexpr", "RESIDENT": "constexpr", "INPUT_RESIDENT": "constexpr"},
                    constexprs={"HAS_BIAS": True, "ACTIVATION": act, "ACC_DTYPE": tl_acc(dtype), **consts, **inputs},
                    num_warps=cfg["num_warps"], num_stages=forward_stages(cfg, inputs, dtype),
                ))
            # BPTT with dx (a layer whose input needs a gradient) and without (a model's first layer),
            # with the output's gradient and without (a model reading only h_n)
            kinds = ((28, True, True), (256, True, True), (28, False, True), (28, False, False))
            for input_size, has_dx, has_dy in kinds if cfg["RESIDENT"] else ((28, True, True), (28, False, False)):
                inputs = input_config(input_size, cfg, dtype)
                in_tag = (f"-I{inputs['BLOCK_I']}{'-resident' if inputs['INPUT_RESIDENT'] else ''}" if has_dx
                          else "-no-dx") + ("" if has_dy else "-no-dy")
                variants.append(CompileVariant(
                    name=f"rnn-bwd-{tag}{in_tag}", kernel=_rnn_backward_kernel,
                    signature={"dy_ptr": ptr, "dhn_ptr": ptr, "out_ptr": ptr, "w_ptr": ptr, "dz_ptr": ptr,
                               "wi_ptr": ptr, "dx_ptr": ptr, "steps": "i32", "N": "i32", "H": "i32", "H_in": "i32",
                               "from_dz": "i32", "sdy_t": "i32", "sdy_n": "i32", "sdy_h": "i32", "sdh_n": "i32",
                               "sdh_h": "i32", "so_t": "i32", "so_n": "i32", "sz_t": "i32", "sdx_t": "i32",
                               "sdx_n": "i32", "last_dy": "i32", "last_o": "i32",
                               "last_z": "i32", "last_dx": "i32", "ACTIVATION": "constexpr",
                               "ACC_DTYPE": "constexpr", "BLOCK_N": "constexpr", "BLOCK_H": "constexpr",
                               "BLOCK_K": "constexpr", "BLOCK_I": "constexpr", "RESIDENT": "constexpr",
                               "INPUT_RESIDENT": "constexpr", "HAS_DX": "constexpr",
                               "HAS_DY": "constexpr"},
                    constexprs={"ACTIVATION": act, "ACC_DTYPE": tl_acc(dtype), **consts, **inputs, "HAS_DX": has_dx,
                                "HAS_DY": has_dy},
                    num_warps=backward_warps(cfg, dtype), num_stages=backward_stages(dtype),
                ))
    return variants


SPEC = register(KernelSpec(
    op="rnn",
    triton=rnn,
    unsupported=unsupported,
    cases=[
        Case("tanh-L6-N3-H16", _make(6, 3, 7, 16)),
        Case("relu-L5-N4-H24-ragged", _make(5, 4, 7, 24, "relu")),
        Case("tanh-batch_first-no-bias-L8-N3-H20", _make(8, 3, 7, 20, batch_first=True, bias=False)),
        # BLOCK_H 128 > 64: W_hh streamed in chunks, 2 programs
        Case("relu-chunked-L4-N17-H80", _make(4, 17, 7, 80, "relu")),
        Case("tanh-batch_first-chunked-L3-N2-H72", _make(3, 2, 5, 72, batch_first=True)),
        # 144 rows and 130 columns: the weight-gradient GEMMs and the bias column sums span
        # several programs at the interpreter's 128-wide tiles; 9 steps: BPTT in windows of 2
        Case("tanh-L9-N16-H130-wide", _make(9, 16, 5, 130)),
        # H_in 70 > 64: the resident forward streams W_ih^T in chunks; 2 programs
        Case("tanh-resident-wide-input-L3-N18-Hin70-H32", _make(3, 18, 70, 32)),
        Case("empty-sequence-L0", _make(0, 3, 7, 16), expect_fallback=True),  # answered on the host
    ],
    gradcheck_case=Case("gradcheck-tanh-L3-N2-H5", _make(3, 2, 3, 5)),
    # fp32 with IEEE dots: rounding only (the cases need 7e-7 through the interpreter). Half
    # precision: the state is rounded to the dtype every step; a torch emulation of the kernel's
    # roundings over these cases and 60 seeds needs up to 7.4e-3 (bf16) and 1.1e-3 (fp16) of the
    # largest element, which is up to 36x the RMS the harness scales atol by: the half atols cover
    # that margin until a GPU run measures them.
    tolerances={torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 4e-3), torch.bfloat16: (5e-2, 2e-2),
                torch.float64: (1e-10, 1e-10)},
    compile_variants=_compile_variants,
    bench_cases=[
        Case("L512-N64-Hin256-H256-tanh", _make(512, 64, 256, 256)),
        Case("L512-N256-Hin128-H128-relu", _make(512, 256, 128, 128, "relu")),
        Case("L256-N64-Hin64-H64-tanh", _make(256, 64, 64, 64)),
    ],
    flops=_flops,
    bytes_moved=_bytes,
    baselines={"cudnn nn.RNN": _cudnn_rnn},
    description="Elman RNN layer: one persistent launch (input projection fused), BPTT in windows + weight GEMMs",
))
