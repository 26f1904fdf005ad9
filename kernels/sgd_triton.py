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
BLOCK = 4096  # elements per loop iteration: 16 fp32 per thread at 8 warps, 4 x 128-bit accesses
BLOCKS_PER_PROGRAM = 16  # a chunk is 64 Ki elements: few table rows, long streams per program
NUM_WARPS = 8
CHUNK = BLOCK * BLOCKS_PER_PROGRAM

# Rows of the per-tensor table (each row has one int64 per tensor).
_P_IN, _GRAD, _B_IN, _P_OUT, _B_OUT, _NUMEL, _FIRST = range(7)
_TENSOR_ROWS = 7


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
