"""The Triton kernels of max pooling with a saved argmax: forward keeps the index of each window's maximum, backward
gives each input element the gradients of the windows whose maximum it is (a gather in a fixed
order: deterministic, no atomics).

Shapes (the normalized arguments of gpudl.reference.max_pool2d):
    input  x [N, C, H, W]               any strides (NCHW, channels_last or a view)
    output y [N, C, H_out, W_out]       channels_last when x is (as F.max_pool2d does)
    index    [N, C, H_out, W_out] int32, flat ih * W + iw within the H x W plane (as
             F.max_pool2d's return_indices), -1 for a window that lies wholly in the padding
    H_out = (H + 2 pH - dH (kH - 1) - 1 + (sH - 1 if ceil_mode)) // sH + 1, minus one when
            ceil_mode makes the last window start in the bottom padding (torch's rule).
Ties keep the first maximum in (kh, kw) order and NaN wins, as torch does, so gradients land on
the same element as the reference's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gpudl.kernels._common import tuning_configs

# Elementwise over outputs: kH * kW unrolled loads each, 8 contiguous outputs a thread (128-bit
# channels_last accesses in half precision, the audit's 128-bit rule). The first config is the
# interpreter's: one big block, so the test shapes take a program or two.
_FWD_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 512}, num_warps=2),
]
# The NCHW forward: output tiles of one plane, 8 rows x 64 columns (a 3x3 stride-2 tile reads a
# 17 x 129 region: about 6% more than its share of the plane, the halo).
PLANE_TILE_ROWS, PLANE_TILE_COLS, PLANE_TILE_WARPS = 8, 64, 4
# The backward: elementwise over the input, 8 warps. channels_last: 16 bytes of each stream a
# thread (4 fp32, 8 bf16/fp16: 128-bit accesses, the audit's 128-bit rule); NCHW: 4 elements a
# thread (each element gathers windows of its own; 8 a thread spilled 152-424 bytes when compiled
# for sm_80/sm_90, see docs/kernels/convolution.md).
BWD_WARPS = 8


def bwd_block(channels_last: bool, element_size: int) -> int:
    """The backward's BLOCK (elements of dx per program) for a layout and element size."""
    per_thread = max(16 // element_size, 1) if channels_last else 4
    return per_thread * 32 * BWD_WARPS


@triton.jit
def _output_coords(offs, C, H_OUT, W_OUT, CHANNELS_LAST: tl.constexpr):
    """(n, c, oh, ow) of flat output offsets in the output's memory order (NHWC or NCHW)."""
    if CHANNELS_LAST:
        c = offs % C
        ow = (offs // C) % W_OUT
        oh = (offs // (C * W_OUT)) % H_OUT
        n = offs // (C * W_OUT * H_OUT)
    else:
        ow = offs % W_OUT
        oh = (offs // W_OUT) % H_OUT
        c = (offs // (W_OUT * H_OUT)) % C
        n = offs // (W_OUT * H_OUT * C)
    return n, c, oh, ow


@triton.autotune(configs=tuning_configs(_FWD_CONFIGS), key=["TOTAL", "C", "H", "W"])
@triton.jit
def _max_pool2d_fwd_kernel(
    x_ptr, y_ptr, idx_ptr,
    C, H, W, H_OUT, W_OUT, TOTAL,
    sx_n, sx_c, sx_h, sx_w,
    sy_n, sy_c, sy_h, sy_w,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, CHANNELS_LAST: tl.constexpr, STORE_INDEX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """BLOCK outputs of y (and their argmax, when STORE_INDEX); TOTAL = N * C * H_out * W_out.
    The index tensor has y's shape and strides."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TOTAL
    n, c, oh, ow = _output_coords(offs, C, H_OUT, W_OUT, CHANNELS_LAST)
    x_base = x_ptr + n * sx_n + c * sx_c
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    best = tl.full((BLOCK,), float("-inf"), ACC)
    best_idx = tl.full((BLOCK,), -1, tl.int32)
    for kh in tl.static_range(KH):
        ih = ih0 + kh * DIL_H
        row_ok = mask & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = iw0 + kw * DIL_W
            ok = row_ok & (iw >= 0) & (iw < W)
            v = tl.load(x_base + ih * sx_h + iw * sx_w, mask=ok, other=float("-inf")).to(ACC)
            # strict > keeps the first maximum; a NaN always wins (torch's rule).
            take = ok & ((v > best) | (v != v))
            best = tl.where(take, v, best)
            best_idx = tl.where(take, (ih * W + iw).to(tl.int32), best_idx)
    y_offs = n * sy_n + c * sy_c + oh * sy_h + ow * sy_w
    tl.store(y_ptr + y_offs, best.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_INDEX:
        tl.store(idx_ptr + y_offs, best_idx, mask=mask)


@triton.jit
def _max_pool2d_bwd_kernel(
    gy_ptr, idx_ptr, dx_ptr,
    C, H, W, H_OUT, W_OUT, TOTAL,
    sg_n, sg_c, sg_h, sg_w,
    si_n, si_c, si_h, si_w,
    sd_n, sd_c, sd_h, sd_w,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    """BLOCK elements of dx; TOTAL = N * C * H * W. Each input element gathers the gradients of
    the windows whose argmax it is: for every tap (kh, kw) the one window that could hold it at
    that tap, in a fixed order. No atomics, no zeroed buffer: deterministic, and written once in
    dx's dtype.

    channels_last: neighbouring elements are neighbouring channels of one pixel, so they share
    their windows: the index and the gradient are loaded for every valid window (one predicate per
    pixel, so the loads are 16-byte vectors of channels), and the gradient is kept where the
    argmax is this element. NCHW: neighbouring elements have different windows; the gradient is loaded only
    where the argmax is this element."""
    ACC: tl.constexpr = tl.float64 if dx_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TOTAL
    n, c, ih, iw = _output_coords(offs, C, H, W, CHANNELS_LAST)  # coordinates in x's plane
    # Plane coordinates in int32 (H * W < 2**31, see `unsupported`): fewer registers per element.
    ih = ih.to(tl.int32)
    iw = iw.to(tl.int32)
    me = ih * W + iw
    g_base = gy_ptr + n * sg_n + c * sg_c
    i_base = idx_ptr + n * si_n + c * si_c
    acc = tl.zeros((BLOCK,), ACC)
    # Taps in reverse, so the windows come in ascending (oh, ow) order: the order in which a
    # scatter over the outputs (PyTorch's CPU kernel) adds them, hence bit-identical sums.
    for tap_h in tl.static_range(KH):
        kh = KH - 1 - tap_h
        oh_s = ih + PAD_H - kh * DIL_H  # = oh * STRIDE_H for the window holding ih at tap kh
        oh = oh_s // STRIDE_H
        row_ok = mask & (oh_s >= 0) & (oh_s % STRIDE_H == 0) & (oh < H_OUT)
        oh = oh.to(tl.int64)
        for tap_w in tl.static_range(KW):
            kw = KW - 1 - tap_w
            ow_s = iw + PAD_W - kw * DIL_W
            ow = ow_s // STRIDE_W
            ok = row_ok & (ow_s >= 0) & (ow_s % STRIDE_W == 0) & (ow < W_OUT)
            ow = ow.to(tl.int64)
            argmax = tl.load(i_base + oh * si_h + ow * si_w, mask=ok, other=-1)
            if CHANNELS_LAST:
                g = tl.load(g_base + oh * sg_h + ow * sg_w, mask=ok, other=0.0)
                acc += tl.where(argmax == me, g.to(ACC), 0.0)
            else:
                acc += tl.load(g_base + oh * sg_h + ow * sg_w, mask=ok & (argmax == me), other=0.0).to(ACC)
    dx_offs = n * sd_n + c * sd_c + ih.to(tl.int64) * sd_h + iw.to(tl.int64) * sd_w
    tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _max_pool2d_fwd_plane_kernel(
    x_ptr, y_ptr, idx_ptr,
    C, H, W, H_OUT, W_OUT,
    sx_n, sx_c, sx_h, sx_w,
    sy_n, sy_c, sy_h, sy_w,
    PAD_H, PAD_W,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, STORE_INDEX: tl.constexpr,
    BLOCK_OH: tl.constexpr, BLOCK_OW: tl.constexpr, BLOCK_IH: tl.constexpr, BLOCK_IW: tl.constexpr,
):
    """A [BLOCK_OH, BLOCK_OW] tile of one (n, c) plane of y (program_id(0) = n * C + c), for
    inputs whose rows are contiguous (NCHW). The input region the tile's windows cover is loaded
    once, as one [BLOCK_IH, BLOCK_IW] tile (overlapping windows share its elements in registers, so
    each input element is read once per program, plus the halo rows and columns shared with the
    neighbouring tiles); the windows are then reduced separably: the max over kw of each region row
    (a gather along the columns), then the max over kh of those (a gather along the rows). Strict >
    on each axis keeps the first maximum in (kh, kw) order, and a NaN replaces any earlier value,
    as the elementwise kernel does."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    plane = tl.program_id(0).to(tl.int64)
    n = plane // C
    c = plane % C
    oh0 = tl.program_id(1) * BLOCK_OH
    ow0 = tl.program_id(2) * BLOCK_OW
    ih0 = oh0 * STRIDE_H - PAD_H
    iw0 = ow0 * STRIDE_W - PAD_W
    # The rows and columns the tile's valid outputs read (no more: they are the traffic).
    rows = (tl.minimum(BLOCK_OH, H_OUT - oh0) - 1) * STRIDE_H + (KH - 1) * DIL_H + 1
    cols = (tl.minimum(BLOCK_OW, W_OUT - ow0) - 1) * STRIDE_W + (KW - 1) * DIL_W + 1
    r = tl.arange(0, BLOCK_IH)
    q = tl.arange(0, BLOCK_IW)
    ih = ih0 + r
    iw = iw0 + q
    ok = ((r < rows) & (ih >= 0) & (ih < H))[:, None] & ((q < cols) & (iw >= 0) & (iw < W))[None, :]
    x_plane = x_ptr + n * sx_n + c * sx_c
    region = tl.load(x_plane + (ih.to(tl.int64) * sx_h)[:, None] + (iw.to(tl.int64) * sx_w)[None, :], mask=ok,
                     other=float("-inf")).to(ACC)

    # Across kw: row_best[r, j] = the first maximum of region[r, j * sW + kw * dW] over kw.
    j = tl.arange(0, BLOCK_OW)
    row_best = tl.full((BLOCK_IH, BLOCK_OW), float("-inf"), ACC)
    row_arg = tl.full((BLOCK_IH, BLOCK_OW), -1, tl.int32)
    for kw in tl.static_range(KW):
        col = tl.broadcast_to((j * STRIDE_W + kw * DIL_W)[None, :], (BLOCK_IH, BLOCK_OW))
        v = tl.gather(region, col, axis=1)
        take = (v > row_best) | (v != v)
        row_best = tl.where(take, v, row_best)
        row_arg = tl.where(take, col, row_arg)
    # Across kh: best[i, j] = the first maximum of row_best[i * sH + kh * dH, j] over kh.
    i = tl.arange(0, BLOCK_OH)
    best = tl.full((BLOCK_OH, BLOCK_OW), float("-inf"), ACC)
    best_idx = tl.full((BLOCK_OH, BLOCK_OW), -1, tl.int32)
    for kh in tl.static_range(KH):
        row = tl.broadcast_to((i * STRIDE_H + kh * DIL_H)[:, None], (BLOCK_OH, BLOCK_OW))
        v = tl.gather(row_best, row, axis=0)
        arg = tl.gather(row_arg, row, axis=0)
        take = (v > best) | (v != v)
        best = tl.where(take, v, best)
        best_idx = tl.where(take, (ih0 + row) * W + iw0 + arg, best_idx)

    oh = oh0 + i
    ow = ow0 + j
    y_offs = n * sy_n + c * sy_c + (oh.to(tl.int64) * sy_h)[:, None] + (ow.to(tl.int64) * sy_w)[None, :]
    y_mask = (oh < H_OUT)[:, None] & (ow < W_OUT)[None, :]
    tl.store(y_ptr + y_offs, best.to(y_ptr.dtype.element_ty), mask=y_mask)
    if STORE_INDEX:
        tl.store(idx_ptr + y_offs, best_idx, mask=y_mask)
