"""The SGD family's Triton code: the multi-tensor SGD step kernel (the op layer is in sgd.py).

The update is torch.optim.SGD's, per element, with g the gradient:
    g = -g if maximize;  g = g + weight_decay * p
    b = g (first step) or momentum * b + (1 - dampening) * g
    g = g + momentum * b (nesterov) or b
    p = p - lr * g
computed in fp32 (fp64 for float64 parameters) and stored in the parameter's dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

# One fixed launch configuration, no autotuning: the kernel updates its tensors in place, and an
# autotuner's benchmark runs would apply the step several times (its restore_value cannot reach
# tensors addressed through a pointer table).
BLOCK = 4096  # elements per loop step: 16 fp32 per thread at 8 warps, 4 x 128-bit accesses
NUM_WARPS = 8

# Rows of the per-tensor table (each row has one int64 per tensor).
_P_IN, _GRAD, _B_IN, _P_OUT, _B_OUT, _NUMEL, _FIRST, _ALIGNED = range(8)
_TENSOR_ROWS = 8


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
def _sgd_blocks(p_in, g_in, b_in, p_out, b_out, block, first, stop, numel, has_buffer, lr, weight_decay, momentum,
                one_minus_dampening, COMPUTE_DTYPE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Blocks [block, stop) of one tensor whose first block is `first`: whole blocks unmasked (a
    runtime bound in a mask blocks vector accesses), then its partial last block if in range. The
    loop counts blocks from 0: a hint on a range() induction variable with a runtime start is lost."""
    whole_stop = tl.minimum(stop, first + numel // BLOCK)
    base = (block - first) * BLOCK
    for i in range(0, whole_stop - block):
        offsets = base + i * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        _sgd_block(p_in, g_in, b_in, p_out, b_out, offsets, None, None, has_buffer, lr, weight_decay,
                   momentum, one_minus_dampening, COMPUTE_DTYPE, WEIGHT_DECAY, MOMENTUM, NESTEROV, MAXIMIZE)
    if whole_stop < stop:
        offsets = (whole_stop - first) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        _sgd_block(p_in, g_in, b_in, p_out, b_out, offsets, offsets < numel, 0.0, has_buffer, lr,
                   weight_decay, momentum, one_minus_dampening, COMPUTE_DTYPE, WEIGHT_DECAY, MOMENTUM,
                   NESTEROV, MAXIMIZE)


@triton.jit
def _sgd_multi_tensor_kernel(
    table_ptr,  # int64 [8, T]: addresses of param, grad, buffer, param out, buffer out; numel; first-step
                # flag; all five addresses 16-byte aligned
    block_start_ptr,  # int64 [T + 1]: first block of each tensor in the blocks of the whole list; the total
    first_tensor_ptr,  # int64 [P]: the tensor holding each program's first block
    hyper_ptr,  # float64 [4]: lr, weight_decay, momentum, 1 - dampening
    witness_ptr,  # any parameter of the group: its pointer type gives the element type
    num_tensors,
    COMPUTE_DTYPE: tl.constexpr,  # fp32, or fp64 for float64 parameters
    WEIGHT_DECAY: tl.constexpr,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One SGD step over a list of tensors, equal work per program.

    Each tensor is cut into BLOCK-element blocks (its last one partial), numbered one after the
    other over the whole list: tensor t owns blocks [block_start[t], block_start[t + 1]). Program p
    of P takes the blocks [p * B / P, (p + 1) * B / P) of the B in all, crossing from one tensor to
    the next as its range does, so every program streams the same number of blocks whatever the
    tensors' sizes (a 64-element bias costs one block, as in any per-tensor scheme). A block starts
    at a multiple of BLOCK inside its tensor, so the whole blocks of a tensor whose addresses are
    16-byte aligned are unmasked 128-bit accesses; a tensor that is not (a view at an odd offset)
    takes a scalar copy of the same loop, alone; only a tensor's partial last block is masked."""
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0).to(tl.int64)
    elem = witness_ptr.dtype.element_ty
    total_blocks = tl.load(block_start_ptr + num_tensors)
    block = pid * total_blocks // programs
    end_block = (pid + 1) * total_blocks // programs
    t = tl.load(first_tensor_ptr + pid)

    lr = tl.load(hyper_ptr).to(COMPUTE_DTYPE)
    weight_decay = tl.load(hyper_ptr + 1).to(COMPUTE_DTYPE)
    momentum = tl.load(hyper_ptr + 2).to(COMPUTE_DTYPE)
    one_minus_dampening = tl.load(hyper_ptr + 3).to(COMPUTE_DTYPE)

    while block < end_block:
        first = tl.load(block_start_ptr + t)
        stop = tl.minimum(tl.load(block_start_ptr + t + 1), end_block)
        numel = tl.load(table_ptr + 5 * num_tensors + t)
        p_in = tl.load(table_ptr + t).to(tl.pointer_type(elem))
        g_in = tl.load(table_ptr + num_tensors + t).to(tl.pointer_type(elem))
        b_in = tl.load(table_ptr + 2 * num_tensors + t).to(tl.pointer_type(elem))
        p_out = tl.load(table_ptr + 3 * num_tensors + t).to(tl.pointer_type(elem))
        b_out = tl.load(table_ptr + 4 * num_tensors + t).to(tl.pointer_type(elem))
        has_buffer = tl.load(table_ptr + 6 * num_tensors + t) == 0
        if tl.load(table_ptr + 7 * num_tensors + t) != 0:
            # Pointers made from integers carry no alignment facts: without these hints every access
            # would be a scalar one.
            _sgd_blocks(tl.multiple_of(p_in, 16), tl.multiple_of(g_in, 16), tl.multiple_of(b_in, 16),
                        tl.multiple_of(p_out, 16), tl.multiple_of(b_out, 16), block, first, stop, numel,
                        has_buffer, lr, weight_decay, momentum, one_minus_dampening, COMPUTE_DTYPE, WEIGHT_DECAY,
                        MOMENTUM, NESTEROV, MAXIMIZE, BLOCK)
        else:
            _sgd_blocks(p_in, g_in, b_in, p_out, b_out, block, first, stop, numel, has_buffer, lr, weight_decay,
                        momentum, one_minus_dampening, COMPUTE_DTYPE, WEIGHT_DECAY, MOMENTUM, NESTEROV, MAXIMIZE,
                        BLOCK)
        block = stop
        t += 1
