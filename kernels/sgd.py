"""Fused multi-tensor SGD step, the op layer: every parameter of one (device, dtype) group in ONE
launch (the kernel and the update's formula are in sgd_triton.py, registration data in sgd_spec.py).

How one launch covers many tensors: the host writes a table of int64 addresses (param, grad,
momentum buffer, their outputs), sizes and first-step flags, the first block of each tensor in
the BLOCK-element blocks of the whole list, and the tensor where each program's share of blocks
begins. Every program takes an equal share of the blocks (the classic multi-tensor design: a
program's share may span several tensors), turns the addresses into typed pointers and streams
them. The table is one small host->device copy per step; nothing is flattened or copied on the
device.
"""

from __future__ import annotations

import bisect
import struct

import torch
from torch import Tensor
from torch.library import wrap_triton

from gpudl.kernels._common import tl_acc
from gpudl.kernels.registry import kernel_op
from gpudl.kernels.sgd_triton import (
    _ALIGNED,
    _B_IN,
    _B_OUT,
    _FIRST,
    _GRAD,
    _NUMEL,
    _P_IN,
    _P_OUT,
    _TENSOR_ROWS,
    BLOCK,
    NUM_WARPS,
    _sgd_multi_tensor_kernel,
)


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


# Programs per SM: 8-warp programs, several resident per SM to hide memory latency.
PROGRAMS_PER_SM = 4
# Programs under the interpreter (no SMs to count): a few, so the tests cross tensor boundaries.
INTERPRETER_PROGRAMS = 4


def _programs(device: torch.device, total_blocks: int) -> int:
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = INTERPRETER_PROGRAMS
    return max(1, min(target, total_blocks))


def _launch(p_in, grads, b_in, p_out, b_out, lr, momentum, dampening, weight_decay, nesterov, maximize):
    """One launch over tensors of one device and dtype. b_in entries may be None (first step);
    with momentum == 0 the buffer lists are ignored."""
    device, dtype = p_in[0].device, p_in[0].dtype
    use_momentum = momentum != 0
    rows = [[] for _ in range(_TENSOR_ROWS)]
    block_start = [0]
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
        addresses = (rows[r][-1] for r in (_P_IN, _GRAD, _B_IN, _P_OUT, _B_OUT))
        rows[_ALIGNED].append(int(all(a % 16 == 0 for a in addresses)))  # 128-bit accesses for this tensor
        block_start.append(block_start[-1] + -(-n // BLOCK))
    num_tensors, total_blocks = len(p_in), block_start[-1]
    if total_blocks == 0:
        return
    programs = _programs(device, total_blocks)
    # The tensor holding each program's first block (the kernel's share formula, p * B // P).
    first_tensor = [bisect.bisect_right(block_start, p * total_blocks // programs) - 1 for p in range(programs)]
    # Hyperparameters travel as float64 bit patterns in the same int64 buffer: one copy per step,
    # full precision for float64 parameters, and a tensor lr needs no separate argument.
    hyper = struct.unpack("<4q", struct.pack("<4d", lr, weight_decay, momentum, 1.0 - dampening))
    host = torch.tensor([v for row in rows for v in row] + block_start + first_tensor + list(hyper), dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    meta = host.to(device, non_blocking=True)
    table, rest = meta[: _TENSOR_ROWS * num_tensors], meta[_TENSOR_ROWS * num_tensors:]
    starts, first, hyper_t = rest[: num_tensors + 1], rest[num_tensors + 1: num_tensors + 1 + programs], rest[-4:]
    witness = next(p for p in p_in if p.numel() > 0)  # an empty tensor may have address 0
    wrap_triton(_sgd_multi_tensor_kernel)[(programs,)](
        table, starts, first, hyper_t.view(torch.float64), witness, num_tensors,
        COMPUTE_DTYPE=tl_acc(dtype),
        WEIGHT_DECAY=weight_decay != 0, MOMENTUM=use_momentum, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
        BLOCK=BLOCK, num_warps=NUM_WARPS,
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
