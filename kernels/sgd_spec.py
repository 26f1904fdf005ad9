"""Registration data of sgd_step: cases, bench cases and baselines, compile variants, byte model."""

from __future__ import annotations

import torch
import triton.language as tl
from torch.optim.sgd import sgd as _functional_sgd

from gpudl.kernels._common import triton_dtype
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, register
from gpudl.kernels.sgd import sgd_step, unsupported
from gpudl.kernels.sgd_triton import BLOCK, NUM_WARPS, _sgd_multi_tensor_kernel


def _make_case(shapes, momentum, dampening, weight_decay, nesterov, maximize, first_step, lr=0.1):
    def make(dtype, device):
        params = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
        grads = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
        buffers = [None if first_step else torch.randn(s, dtype=dtype, device=device) for s in shapes]
        # inplace=False: the harness hands the same lists to the kernel and the reference.
        return (params, grads, buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, False)

    return make


# Ragged sizes, a tiny bias, an empty tensor, exactly one block (no tail), and one tensor of 18
# blocks (17 whole, a masked tail). 23 blocks over the interpreter's 4 programs (5, 6, 6, 6): the
# first program crosses six tensors (the empty one included), the others start inside the last.
_SHAPES = [(33, 17), (5,), (1000,), (4, 3, 3, 3), (0, 3), (64, 64), (70000,)]


def _misaligned_case(dtype, device):
    """The ragged list with one parameter (and its grad and buffer) a view one element into its
    storage: that tensor takes the scalar path, the others the 128-bit one, in one launch."""
    params, grads, buffers, *rest = _make_case(_SHAPES, 0.9, 0.0, 1e-2, False, False, False)(dtype, device)

    def shifted(t):
        return torch.randn(t.numel() + 1, dtype=dtype, device=device)[1:].view(t.shape)

    params[-1], grads[-1], buffers[-1] = shifted(params[-1]), shifted(grads[-1]), shifted(buffers[-1])
    return (params, grads, buffers, *rest)


def _bench(total, num_tensors, momentum=0.9, first_step=False):
    per = total // num_tensors
    shapes = [(per + 37 * (i % 5),) for i in range(num_tensors)]  # uneven sizes like a real model

    def make(dtype, device):
        params = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
        grads = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
        buffers = [None if first_step else torch.zeros(s, dtype=dtype, device=device) for s in shapes]
        return (params, grads, buffers, 1e-3, momentum, 0.0, 1e-4, False, False, True)

    return make


def _bytes_moved(args):
    params, grads, buffers, _lr, momentum = args[:5]
    total = 0
    for p, b in zip(params, buffers):
        n = p.numel() * p.element_size()
        total += 3 * n  # read param and grad, write param
        if momentum != 0:
            total += n if b is None else 2 * n  # write the buffer (and read it after the first step)
    return total


def _torch_sgd(fused: bool):
    def run(params, grads, buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, inplace):
        bufs = list(buffers)
        _functional_sgd(
            list(params), list(grads), bufs, weight_decay=weight_decay, momentum=momentum, lr=lr,
            dampening=dampening, nesterov=nesterov, maximize=maximize, foreach=not fused, fused=fused,
        )
        return list(params), bufs

    return run


def _compile_variants():
    """Every switch combination in fp32 and bf16 (each kernel holds the aligned, 128-bit path and the
    scalar one of misaligned tensors)."""
    variants = []
    for dtype in (torch.float32, torch.bfloat16):
        for momentum, nesterov in ((False, False), (True, False), (True, True)):
            for weight_decay in (False, True):
                variants.append(CompileVariant(
                    name=f"sgd-{str(dtype)[6:]}-mom{int(momentum)}-nest{int(nesterov)}-wd{int(weight_decay)}",
                    kernel=_sgd_multi_tensor_kernel,
                    signature={"table_ptr": "*i64", "block_start_ptr": "*i64", "first_tensor_ptr": "*i64",
                               "hyper_ptr": "*fp64", "witness_ptr": triton_dtype(dtype), "num_tensors": "i32",
                               "COMPUTE_DTYPE": "constexpr", "WEIGHT_DECAY": "constexpr", "MOMENTUM": "constexpr",
                               "NESTEROV": "constexpr", "MAXIMIZE": "constexpr", "BLOCK": "constexpr"},
                    constexprs={"COMPUTE_DTYPE": tl.float32, "WEIGHT_DECAY": weight_decay, "MOMENTUM": momentum,
                                "NESTEROV": nesterov, "MAXIMIZE": momentum and not nesterov, "BLOCK": BLOCK},
                    num_warps=NUM_WARPS,
                ))
    return variants


SPEC = register(KernelSpec(
    op="sgd_step",
    triton=sgd_step,
    unsupported=unsupported,
    cases=[
        Case("plain", _make_case(_SHAPES, 0.0, 0.0, 0.0, False, False, True)),
        Case("momentum-first-step-wd", _make_case(_SHAPES, 0.9, 0.1, 1e-2, False, False, True)),
        Case("momentum-dampening-maximize", _make_case(_SHAPES, 0.9, 0.25, 0.0, False, True, False)),
        Case("nesterov-wd", _make_case(_SHAPES, 0.8, 0.0, 5e-2, True, False, False)),
        Case("misaligned-view-momentum-wd", _misaligned_case),
    ],
    gradcheck_case=None,
    # The kernel computes in fp32 and rounds once to the parameter's dtype; the harness's reference
    # runs in float64 on the same inputs (lists included). So the error is one rounding: half an
    # ulp, at most 2^-8 = 3.9e-3 relative in bf16 (at the bottom of a binade) and 2^-11 = 4.9e-4 in
    # fp16, plus the fp32 arithmetic (1.6e-7 on these cases).
    tolerances={torch.float32: (1e-6, 1e-5), torch.float16: (1e-4, 1e-3), torch.bfloat16: (1e-3, 4e-3),
                torch.float64: (1e-12, 1e-12)},
    compile_variants=_compile_variants,
    bench_cases=[
        Case("100M-params-200-tensors-momentum", _bench(100_000_000, 200)),
        Case("100M-params-200-tensors-plain", _bench(100_000_000, 200, momentum=0.0)),
    ],
    flops=lambda args: 5.0 * sum(p.numel() for p in args[0]),
    bytes_moved=_bytes_moved,
    baselines={"torch.optim.SGD(foreach)": _torch_sgd(False), "torch.optim.SGD(fused)": _torch_sgd(True)},
    differentiable=False,
    description="Fused multi-tensor SGD step (momentum, dampening, weight decay, nesterov, maximize), "
                "one launch per group",
))
