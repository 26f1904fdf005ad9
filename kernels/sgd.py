"""Fused multi-tensor SGD step: every parameter of one (device, dtype) group in ONE launch.

The update is torch.optim.SGD's, per element, with g the gradient:
    g = -g if maximize;  g = g + weight_decay * p
    b = g (first step) or momentum * b + (1 - dampening) * g
    g = g + momentum * b (nesterov) or b
    p = p - lr * g
computed in fp32 (fp64 for float64 parameters) and stored in the parameter's dtype.

How one launch covers many tensors: the host writes a table of int64 addresses (param, grad,
momentum buffer, their outputs), sizes and first-step flags, plus one row per chunk saying which
tensor it belongs to and where it starts. Program i reads its chunk's row, turns the addresses
into typed pointers and streams the chunk. The table is one small host->device copy per step;
nothing is flattened or copied on the device.
"""

from __future__ import annotations

import itertools
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton
from torch.optim.sgd import sgd as _functional_sgd

from gpudl.kernels._common import tl_acc, triton_dtype
from gpudl.kernels.registry import Case, CompileVariant, KernelSpec, kernel_op, register

# One fixed launch configuration, no autotuning: the kernel updates its tensors in place, and an
# autotuner's benchmark runs would apply the step several times (its restore_value cannot reach
# tensors addressed through a pointer table).
BLOCK = 4096  # elements per loop iteration: 16 fp32 per thread at 8 warps, 4 x 128-bit accesses
BLOCKS_PER_PROGRAM = 16  # a chunk is 64 Ki elements: few table rows, long streams per program
NUM_WARPS = 8
CHUNK = BLOCK * BLOCKS_PER_PROGRAM

# Rows of the per-tensor table (each row has one int64 per tensor).
_P_IN, _GRAD, _B_IN, _P_OUT, _B_OUT, _NUMEL, _FIRST = range(7)
_TENSOR_ROWS = 7


# --------------------------------------------------------------------------- kernel
@triton.jit
def _sgd_block(p_in, g_in, b_in, p_out, b_out, offsets, mask, other, has_buffer, lr, weight_decay, momentum,
               one_minus_dampening, COMPUTE_DTYPE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
               MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr):
    """The update of BLOCK elements. mask and other are None for whole blocks (unmasked accesses
    can be vectorized) and (offsets < end, 0.0) for a tensor's last, partial block."""
    elem = p_out.dtype.element_ty
    p = tl.load(p_in + offsets, mask=mask, other=other).to(COMPUTE_DTYPE)
    g = tl.load(g_in + offsets, mask=mask, other=other).to(COMPUTE_DTYPE)
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        g = g + weight_decay * p
    if MOMENTUM:
        if has_buffer:
            b = tl.load(b_in + offsets, mask=mask, other=other).to(COMPUTE_DTYPE)
            b = b * momentum + one_minus_dampening * g
        else:  # first step: the buffer starts as g (and b_in may be a null address)
            b = g
        tl.store(b_out + offsets, b.to(elem), mask=mask)
        if NESTEROV:
            g = g + momentum * b
        else:
            g = b
    p = p - lr * g
    tl.store(p_out + offsets, p.to(elem), mask=mask)


@triton.jit
def _sgd_multi_tensor_kernel(
    table_ptr,  # int64 [7, T]: addresses of param, grad, buffer, param out, buffer out; numel; first-step flag
    chunk_ptr,  # int64 [2, C]: tensor index and first element of each chunk
    hyper_ptr,  # float64 [4]: lr, weight_decay, momentum, 1 - dampening
    witness_ptr,  # any parameter of the group: its pointer type gives the element type
    num_tensors,
    num_chunks,
    chunk_size,
    COMPUTE_DTYPE: tl.constexpr,  # fp32, or fp64 for float64 parameters
    WEIGHT_DECAY: tl.constexpr,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address 16-byte aligned: allow 128-bit accesses
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    elem = witness_ptr.dtype.element_ty
    t = tl.load(chunk_ptr + pid)
    start = tl.load(chunk_ptr + num_chunks + pid)
    numel = tl.load(table_ptr + 5 * num_tensors + t)
    end = tl.minimum(start + chunk_size, numel)
    p_in = tl.load(table_ptr + t).to(tl.pointer_type(elem))
    g_in = tl.load(table_ptr + num_tensors + t).to(tl.pointer_type(elem))
    p_out = tl.load(table_ptr + 3 * num_tensors + t).to(tl.pointer_type(elem))
    b_in = tl.load(table_ptr + 2 * num_tensors + t).to(tl.pointer_type(elem))
    b_out = tl.load(table_ptr + 4 * num_tensors + t).to(tl.pointer_type(elem))
    has_buffer = tl.load(table_ptr + 6 * num_tensors + t) == 0
    if ALIGNED:
        # Pointers made from integers carry no alignment facts: without these hints every access
        # would be a scalar one.
        p_in = tl.multiple_of(p_in, 16)
        g_in = tl.multiple_of(g_in, 16)
        p_out = tl.multiple_of(p_out, 16)
        b_in = tl.multiple_of(b_in, 16)
        b_out = tl.multiple_of(b_out, 16)

    lr = tl.load(hyper_ptr).to(COMPUTE_DTYPE)
    weight_decay = tl.load(hyper_ptr + 1).to(COMPUTE_DTYPE)
    momentum = tl.load(hyper_ptr + 2).to(COMPUTE_DTYPE)
    one_minus_dampening = tl.load(hyper_ptr + 3).to(COMPUTE_DTYPE)

    # Whole blocks without a mask (a runtime bound in the mask would also block vector accesses),
    # then at most one masked tail block. The loop counts blocks: a hint on a range() induction
    # variable with a runtime start is lost, one on `start` is not.
    start = tl.multiple_of(start, BLOCK)  # chunks start at multiples of CHUNK
    num_full = (end - start) // BLOCK
    for i in range(0, num_full):
        offsets = start + i * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        _sgd_block(p_in, g_in, b_in, p_out, b_out, offsets, None, None, has_buffer, lr, weight_decay, momentum,
                   one_minus_dampening, COMPUTE_DTYPE, WEIGHT_DECAY, MOMENTUM, NESTEROV, MAXIMIZE)
    tail = start + num_full * BLOCK
    if tail < end:
        offsets = tail + tl.arange(0, BLOCK).to(tl.int64)
        _sgd_block(p_in, g_in, b_in, p_out, b_out, offsets, offsets < end, 0.0, has_buffer, lr, weight_decay,
                   momentum, one_minus_dampening, COMPUTE_DTYPE, WEIGHT_DECAY, MOMENTUM, NESTEROV, MAXIMIZE)


# --------------------------------------------------------------------------- host launcher
def _is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill exactly numel consecutive slots of memory (any dim order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda s: s[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _launch(p_in, grads, b_in, p_out, b_out, lr, momentum, dampening, weight_decay, nesterov, maximize):
    """One launch over tensors of one device and dtype. b_in entries may be None (first step);
    with momentum == 0 the buffer lists are ignored."""
    device, dtype = p_in[0].device, p_in[0].dtype
    use_momentum = momentum != 0
    rows = [[] for _ in range(_TENSOR_ROWS)]
    chunk_tensor, chunk_start = [], []
    for i, (p, g, pout) in enumerate(zip(p_in, grads, p_out)):
        n = p.numel()
        bi = b_in[i] if use_momentum else None
        bo = b_out[i] if use_momentum else None
        rows[_P_IN].append(p.data_ptr())
        rows[_GRAD].append(g.data_ptr())
        rows[_B_IN].append(bi.data_ptr() if bi is not None else 0)
        rows[_P_OUT].append(pout.data_ptr())
        rows[_B_OUT].append(bo.data_ptr() if bo is not None else 0)
        rows[_NUMEL].append(n)
        rows[_FIRST].append(1 if bi is None else 0)
        for start in range(0, n, CHUNK):
            chunk_tensor.append(i)
            chunk_start.append(start)
    num_tensors, num_chunks = len(p_in), len(chunk_tensor)
    if num_chunks == 0:
        return
    # Hyperparameters travel as float64 bit patterns in the same int64 buffer: one copy per step,
    # full precision for float64 parameters, and a tensor lr needs no separate argument.
    hyper = struct.unpack("<4q", struct.pack("<4d", lr, weight_decay, momentum, 1.0 - dampening))
    host = torch.tensor([v for row in rows for v in row] + chunk_tensor + chunk_start + list(hyper), dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    meta = host.to(device, non_blocking=True)
    table = meta[: _TENSOR_ROWS * num_tensors]
    chunks = meta[_TENSOR_ROWS * num_tensors : _TENSOR_ROWS * num_tensors + 2 * num_chunks]
    hyper_t = meta[-4:].view(torch.float64)
    witness = next(p for p in p_in if p.numel() > 0)  # an empty tensor may have address 0
    wrap_triton(_sgd_multi_tensor_kernel)[(num_chunks,)](
        table, chunks, hyper_t, witness, num_tensors, num_chunks, CHUNK,
        COMPUTE_DTYPE=tl_acc(dtype),
        WEIGHT_DECAY=weight_decay != 0, MOMENTUM=use_momentum, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
        ALIGNED=all(a % 16 == 0 for row in rows[:_NUMEL] for a in row), BLOCK=BLOCK, num_warps=NUM_WARPS,
    )


# --------------------------------------------------------------------------- custom op
# Not traceable by Inductor: the launch builds a table of data pointers. An optimizer step is no
# part of a compiled forward/backward anyway; the op keeps it one opaque, in-place node.
@kernel_op("sgd_step_", mutates_args=("params", "momentum_buffers"), traceable=False)
def _sgd_step_op(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], first_step: list[bool],
                 lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                 maximize: bool) -> None:
    """Update params (and, with momentum, momentum_buffers, one per param) in place; a buffer
    whose first_step flag is set is written, not read. Tensors of one (device, dtype) share one
    launch."""
    use_momentum = momentum != 0
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    for idx in groups.values():
        p_group = [params[i] for i in idx]
        b_out = [momentum_buffers[i] for i in idx] if use_momentum else [None] * len(idx)
        b_in = [None if first_step[i] else momentum_buffers[i] for i in idx] if use_momentum else b_out
        _launch(p_group, [grads[i] for i in idx], b_in, p_group, b_out,
                lr, momentum, dampening, weight_decay, nesterov, maximize)


@_sgd_step_op.register_fake
def _(params, grads, momentum_buffers, first_step, lr, momentum, dampening, weight_decay, nesterov, maximize):
    return None


def _streamable(p: torch.Tensor, g: torch.Tensor, b: torch.Tensor | None) -> bool:
    return _is_dense(p) and g.stride() == p.stride() and (b is None or b.stride() == p.stride())


def unsupported(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, inplace):
    """The kernel streams each tensor as one flat array: every param dense, its grad and buffer
    laid out alike."""
    buffers = momentum_buffers if momentum != 0 else [None] * len(params)
    if not all(_streamable(p, g, b) for p, g, b in zip(params, grads, buffers)):
        return "a parameter is not dense, or its grad/buffer has other strides"
    return None


def sgd_step(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, inplace):
    """One SGD step over lists of tensors, torch.optim.SGD's update, fused into one launch per
    (device, dtype).

    params, grads: sequences of tensors, grads[i] shaped, typed and placed like params[i];
    momentum_buffers: sequence of tensors shaped like params or None (no buffer yet: this is the
    tensor's first momentum step); ignored when momentum == 0. lr etc.: floats (already
    validated by gpudl.ops.sgd_step). inplace: update params and buffers in place, else write new
    tensors and leave the inputs untouched.
    Returns (params, buffers): lists of the updated tensors (buffers all None when momentum == 0).
    """
    params, grads = list(params), list(grads)
    use_momentum = momentum != 0
    buffers = list(momentum_buffers) if use_momentum else [None] * len(params)
    if not inplace:
        params = [p.detach().clone() for p in params]
        buffers = [None if b is None else b.clone() for b in buffers]
    first_step = [b is None for b in buffers]
    if use_momentum:
        buffers = [torch.empty_like(p) if b is None else b for p, b in zip(params, buffers)]
    torch.ops.gpudl.sgd_step_(params, grads, buffers if use_momentum else [], first_step if use_momentum else [],
                              lr, momentum, dampening, weight_decay, nesterov, maximize)
    return params, buffers


# --------------------------------------------------------------------------- registration
def _make_case(shapes, momentum, dampening, weight_decay, nesterov, maximize, first_step, lr=0.1):
    def make(dtype, device):
        params = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
        grads = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
        buffers = [None if first_step else torch.randn(s, dtype=dtype, device=device) for s in shapes]
        # inplace=False: the harness hands the same lists to the kernel and the reference.
        return (params, grads, buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, False)

    return make


# Ragged sizes, a tiny bias, an empty tensor, exactly one block (no tail), and one tensor over
# two chunks (16 full blocks, then 1 full block and a masked tail).
_SHAPES = [(33, 17), (5,), (1000,), (4, 3, 3, 3), (0, 3), (64, 64), (70000,)]


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
    variants = []
    for dtype in (torch.float32, torch.bfloat16):
        for momentum, nesterov in ((False, False), (True, False), (True, True)):
            for weight_decay, aligned in itertools.product((False, True), (True, False)):
                name = (f"sgd-{str(dtype)[6:]}-mom{int(momentum)}-nest{int(nesterov)}-wd{int(weight_decay)}"
                        f"{'' if aligned else '-unaligned'}")
                variants.append(CompileVariant(
                    name=name,
                    kernel=_sgd_multi_tensor_kernel,
                    signature={"table_ptr": "*i64", "chunk_ptr": "*i64", "hyper_ptr": "*fp64",
                               "witness_ptr": triton_dtype(dtype), "num_tensors": "i32", "num_chunks": "i32",
                               "chunk_size": "i32", "COMPUTE_DTYPE": "constexpr", "WEIGHT_DECAY": "constexpr",
                               "MOMENTUM": "constexpr", "NESTEROV": "constexpr", "MAXIMIZE": "constexpr",
                               "ALIGNED": "constexpr", "BLOCK": "constexpr"},
                    constexprs={"COMPUTE_DTYPE": tl.float32, "WEIGHT_DECAY": weight_decay, "MOMENTUM": momentum,
                                "NESTEROV": nesterov, "MAXIMIZE": momentum and not nesterov, "ALIGNED": aligned,
                                "BLOCK": BLOCK},
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
