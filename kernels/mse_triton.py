"""Mean-squared error's Triton kernel: the loss and its gradient in one pass.

One program reads BLOCK elements of input and target once and writes the loss (per element, or
one partial sum per program) and the saved gradient d loss / d input = 2 (input - target)
(/ n for 'mean'). REDUCTION is the reduction's name.
"""

from __future__ import annotations

import triton
import triton.language as tl

# One config for every launch, as for the BCE kernels: 4096 elements per program at 8 warps.
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _mse_fwd_kernel(
    x_ptr, t_ptr,  # input, target [n], contiguous
    out_ptr,  # [n] elementwise loss ("none") or [num_programs] partial sums
    g_ptr,  # [n] saved d loss / d input (1/n included for mean)
    n,
    REDUCTION: tl.constexpr,  # "none", "mean" or "sum"
    GRAD: tl.constexpr,
    ACC: tl.constexpr,  # fp32, or fp64 for float64 inputs
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INDEX_64:
        idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    diff = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC) - tl.load(t_ptr + idx, mask=mask, other=0.0).to(ACC)
    loss = diff * diff  # masked lanes are 0 - 0: nothing to mask before the sum
    if REDUCTION == "none":
        tl.store(out_ptr + idx, loss.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid, tl.sum(loss, axis=0))
    if GRAD:
        g = 2.0 * diff
        if REDUCTION == "mean":
            g = g / n
        tl.store(g_ptr + idx, g.to(g_ptr.dtype.element_ty), mask=mask)
