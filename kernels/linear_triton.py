"""The linear family's Triton code: one tiled GEMM with a bias-and-activation epilogue, the
elementwise activation-gradient kernel, and the column sum of the bias gradient.

`_matmul_kernel` computes C [M, N] = epilogue(A [M, K] @ B [K, N]): persistent over output tiles
in the grouped order of Triton's matmul tutorials (03, 09), its operand tiles loaded through
tensor descriptors where the layout allows and the products run on tensor cores (pointers
otherwise: kernels/linear.py `_load_path`). Its autotune candidates come from one tile table per
dtype, product precision and GPU (`tile_table`), each audited free of spills. The three products of a linear
layer are this one kernel with different strides (see kernels/linear.py).

The epilogue (bias, then the activation, or the activation's gradient times dy) runs once per
output tile, after the K loop: the loop holds only the two tile loads and `tl.dot`.

Accumulation in fp32, or fp64 for float64 inputs (the float64 gradcheck).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpudl.kernels._common import (
    SHARED_MEMORY_LIMIT,
    activation_grad,
    activation_grad_from_saved,
    apply_activation,
    tuning_configs,
)
from gpudl.kernels._common import (
    gemm_tile as common_gemm_tile,
)


# --------------------------------------------------------------------------- tile tables
def gemm_tile(block_m: int, block_n: int, block_k: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    """A linear GEMM candidate: _common.gemm_tile with the grouped order's GROUP_M."""
    return common_gemm_tile(block_m, block_n, block_k, warps, stages, GROUP_M=group_m)


# The tile tables: one per (dtype, product precision, GPU), each candidate compiled without spills
# in every GEMM of the layer (forward with bias+gelu, gelu's recompute, dgrad, wgrad) on the GPUs
# that may pick it (`python -m gpudl.kernels.audit --op linear`). The first of GEMM_TILES is the
# one the interpreter runs: the largest tile, so tests launch few programs.
#
# bf16/fp16 on sm_90 (warpgroup MMA): up to 128x256x64, the sizes of Triton's matmul tutorials.
HALF_TILES = [
    gemm_tile(128, 256, 64, warps=8, stages=3),
    gemm_tile(128, 128, 32, warps=4, stages=4),
    gemm_tile(64, 128, 32, warps=4, stages=4),
    gemm_tile(64, 64, 32, warps=4, stages=3),
]
# bf16/fp16 on sm_80 (mma.sync, each warp's fp32 accumulator and operand fragments in registers):
# at most 64 accumulators per thread on 128-row tiles. 128x256x64 on 8 warps and 128x128x32 on 4
# (128 accumulators a thread) spill in the dgrad and wgrad GEMMs there (see the audit); the same
# tiles on 8 warps with K steps of 64 / 32 do not.
HALF_TILES_SM80 = [
    gemm_tile(128, 128, 64, warps=8, stages=3),
    gemm_tile(128, 128, 32, warps=8, stages=4),
    HALF_TILES[2],
    HALF_TILES[3],
]
# float32 as TF32 (tensor cores; torch's opt-in switch): 128-row tiles step 16 along K. 128x64x32
# on 4 warps spills in wgrad on sm_80, 64x128x32 on 8 warps under the gelu epilogue (the audit).
TF32_TILES = [
    gemm_tile(128, 128, 16, warps=8, stages=4),
    gemm_tile(128, 64, 16, warps=4, stages=3),
    gemm_tile(64, 128, 32, warps=4, stages=3),
    gemm_tile(64, 64, 32, warps=4, stages=3),
]
# IEEE float32 (torch's default) and float64 run on the FMA units: each thread holds its rows and
# columns of both operand tiles for all of BLOCK_K, so K steps of 8 or 16. BLOCK_K = 32 spills on
# both GPUs at every tile, and so do 64x128x8 and 128x64x8 on 4 warps in dgrad (see the audit).
FMA_TILES = [
    gemm_tile(128, 128, 8, warps=8, stages=3),
    gemm_tile(128, 64, 8, warps=8, stages=3),
    gemm_tile(64, 64, 16, warps=4, stages=3),
]
GEMM_TILES = list({id(c): c for c in HALF_TILES + HALF_TILES_SM80 + TF32_TILES + FMA_TILES}.values())


def uses_tensor_cores(element_size: int, precision: str) -> bool:
    """Whether the GEMM's products run on tensor cores: fp16/bf16, and fp32 as TF32 (IEEE fp32 and
    fp64 run on the FMA units)."""
    return element_size == 2 or (element_size == 4 and precision == "tf32")


def tile_table(element_size: int, precision: str, arch: int) -> list[triton.Config]:
    """The candidates for an operand element size, the product's precision ("ieee" or "tf32") and
    the GPU's compute capability x 10 (sm_80, 86 and 89 take sm_80's, sm_90 and later sm_90's)."""
    if element_size == 2:
        return HALF_TILES if arch >= 90 else HALF_TILES_SM80
    return TF32_TILES if uses_tensor_cores(element_size, precision) else FMA_TILES


def tiles_for(configs, element_size: int, precision: str = "ieee", arch: int = 90):
    """The candidates of `configs` in the table of (element size, precision, arch); all of
    `configs` if none is (the interpreter's one)."""
    pool = tile_table(element_size, precision, arch)
    return [c for c in configs if any(c is p for p in pool)] or list(configs)


def estimated_shared_memory(config: triton.Config, element_size: int) -> int:
    """Bytes of the software pipeline's A and B tile buffers (what dominates the kernel's use)."""
    kw = config.kwargs
    return config.num_stages * (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * element_size


def tiles_that_fit(configs, element_size: int, limit: int):
    """The configs whose pipeline buffers fit `limit` bytes of shared memory; never none: the smallest
    tile is the best chance (the autotuner skips a config that then runs out of resources)."""
    fitting = [c for c in configs if estimated_shared_memory(c, element_size) <= limit]
    return fitting or [min(configs, key=lambda c: estimated_shared_memory(c, element_size))]


def _shared_memory_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    return limit or SHARED_MEMORY_LIMIT.get(props.major * 10, min(SHARED_MEMORY_LIMIT.values()))


def _arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _prune_tiles(configs, named_args, **kwargs):
    a = named_args["a_ptr"]
    size = a.element_size()
    tiles = tiles_for(configs, size, kwargs.get("INPUT_PRECISION", "ieee"), _arch(a.device))
    return tiles_that_fit(tiles, size, _shared_memory_limit(a.device))


# --------------------------------------------------------------------------- GEMM
@triton.jit
def _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile `tile` in grouped order: GROUP_M row blocks sweep
    the column blocks together, so the B tiles they share stay in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile % num_pid_in_group) % group_size_m
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _operand_descriptor(ptr, rows, cols, stride_rows, stride_cols,
                        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, MAJOR: tl.constexpr):
    """A tensor descriptor of the [rows, cols] operand: over it as it is when its columns are
    contiguous (MAJOR == "row"), over its transpose when its rows are (MAJOR == "column")."""
    if MAJOR == "row":
        desc = tl.make_tensor_descriptor(ptr, shape=[rows, cols], strides=[stride_rows, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_COLS])
    else:
        desc = tl.make_tensor_descriptor(ptr, shape=[cols, rows], strides=[stride_cols, 1],
                                         block_shape=[BLOCK_COLS, BLOCK_ROWS])
    return desc


@triton.jit
def _load_tile(desc, row, col, MAJOR: tl.constexpr):
    """The [BLOCK_ROWS, BLOCK_COLS] tile at (row, col) of an operand described by _operand_descriptor;
    out-of-bounds elements read as zero."""
    if MAJOR == "row":
        tile = desc.load([row, col])
    else:
        tile = desc.load([col, row]).T
    return tile


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, dy_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    EPILOGUE: tl.constexpr,
    LOADS: tl.constexpr,
    A_MAJOR: tl.constexpr,
    B_MAJOR: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """With z = A [M, K] @ B [K, N] + bias [N]:
    EPILOGUE == "activation":       C [M, N] = activation(z)
    EPILOGUE == "activation_grad":  C [M, N] = activation'(z) * dy [M, N] (dy with C's strides);
    the second recomputes a pre-activation the forward did not keep and turns it straight into dz.

    Persistent: the grid is at most one program per SM, and program p computes output tiles
    p, p + grid, p + 2 grid, ... in grouped order (Triton's persistent-matmul tutorial, 09): no
    launch wave tails, and the tiles a wave computes together share their A and B blocks in L2.
    LOADS == "descriptor": A and B tiles come through tensor descriptors (TMA on sm_90: one
    instruction per tile, no per-element address arithmetic in the K loop; out-of-bounds rows,
    columns and the K tail read as zero). A_MAJOR / B_MAJOR say which of the operand's two dims is
    contiguous ("row": its second). LOADS == "pointer": masked pointer loads, for any strides.
    The epilogue runs once per tile, after its K loop."""
    TRANSCENDENTAL: tl.constexpr = ACTIVATION == "tanh" or ACTIVATION == "sigmoid" or ACTIVATION == "gelu"
    EPILOGUE_QUARTERS: tl.constexpr = TRANSCENDENTAL and BLOCK_N >= 64
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_steps = tl.cdiv(K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    if LOADS == "descriptor":
        a_desc = _operand_descriptor(a_ptr, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_MAJOR)
        b_desc = _operand_descriptor(b_ptr, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_MAJOR)

    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        if LOADS == "descriptor":
            row, col = pid_m * BLOCK_M, pid_n * BLOCK_N
            for k in range(0, k_steps):
                a = _load_tile(a_desc, row, k * BLOCK_K, A_MAJOR)
                b = _load_tile(b_desc, k * BLOCK_K, col, B_MAJOR)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        else:
            # int64 row/column offsets: M * stride can pass 2**31 on large activations.
            offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_m = offs_m < M
            mask_n = offs_n < N
            a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
            b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
            for k in range(0, k_steps):
                k_left = K - k * BLOCK_K  # the last block is partial when K is not a multiple of BLOCK_K
                a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
                b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                a_ptrs += BLOCK_K * stride_ak
                b_ptrs += BLOCK_K * stride_bk
        _store_tile(acc, pid_m, pid_n, M, N, bias_ptr, dy_ptr, c_ptr, stride_cm, stride_cn,
                    HAS_BIAS, ACTIVATION, EPILOGUE, ACC_DTYPE, BLOCK_M, BLOCK_N, EPILOGUE_QUARTERS)


@triton.jit
def _store_tile(acc, pid_m, pid_n, M, N, bias_ptr, dy_ptr, c_ptr, stride_cm, stride_cn,
                HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, EPILOGUE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EPILOGUE_QUARTERS: tl.constexpr):
    """The epilogue of one output tile: whole, or in four column quarters for transcendental
    activations (the whole 128x256 fp32 tile with erf/exp live spills on sm_80, see the audit)."""
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    if EPILOGUE_QUARTERS:
        # [m, a, b, j] = acc[m, a * BLOCK_N / 2 + b * BLOCK_N / 4 + j]; split b, then a.
        q = tl.permute(tl.reshape(acc, (BLOCK_M, 2, 2, BLOCK_N // 4)), (0, 3, 1, 2))
        b0, b1 = tl.split(q)
        q00, q10 = tl.split(b0)
        q01, q11 = tl.split(b1)
        offs_q = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N // 4)
        _epilogue(q00, offs_m, offs_q, M, N, bias_ptr, dy_ptr, c_ptr, stride_cm, stride_cn,
                  HAS_BIAS, ACTIVATION, EPILOGUE, ACC_DTYPE)
        _epilogue(q01, offs_m, offs_q + BLOCK_N // 4, M, N, bias_ptr, dy_ptr, c_ptr, stride_cm, stride_cn,
                  HAS_BIAS, ACTIVATION, EPILOGUE, ACC_DTYPE)
        _epilogue(q10, offs_m, offs_q + BLOCK_N // 2, M, N, bias_ptr, dy_ptr, c_ptr, stride_cm, stride_cn,
                  HAS_BIAS, ACTIVATION, EPILOGUE, ACC_DTYPE)
        _epilogue(q11, offs_m, offs_q + 3 * (BLOCK_N // 4), M, N, bias_ptr, dy_ptr, c_ptr, stride_cm, stride_cn,
                  HAS_BIAS, ACTIVATION, EPILOGUE, ACC_DTYPE)
    else:
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        _epilogue(acc, offs_m, offs_n, M, N, bias_ptr, dy_ptr, c_ptr, stride_cm, stride_cn,
                  HAS_BIAS, ACTIVATION, EPILOGUE, ACC_DTYPE)


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, bias_ptr, dy_ptr, c_ptr, stride_cm, stride_cn,
              HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, EPILOGUE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Bias, then the activation or its gradient, and the store of one [rows, columns] piece of C."""
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    c_offs = offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if EPILOGUE == "activation_grad":
        dy = tl.load(dy_ptr + c_offs, mask=mask, other=0.0).to(ACC_DTYPE)
        out = activation_grad(acc, dy, ACTIVATION)
    else:
        out = apply_activation(acc, ACTIVATION)
    tl.store(c_ptr + c_offs, out.to(c_ptr.dtype.element_ty), mask=mask)


matmul = triton.autotune(
    configs=tuning_configs(GEMM_TILES),
    # Strides are in the key: forward, grad-input and grad-weight of one layer share M, N, K
    # permutations but not layouts (dW reads dz transposed), and want their own tiles.
    # The precision too: TF32 and IEEE fp32 products have their own tile tables.
    key=["M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "ACTIVATION", "EPILOGUE", "LOADS",
         "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_tiles},
)(_matmul_kernel)


# --------------------------------------------------------------------------- backward helpers
# One [32, 128] tile per program, 4 warps: 32 elements per thread.
ELEMENTWISE_TILE = {"BLOCK_M": 32, "BLOCK_N": 128}
ELEMENTWISE_WARPS = 4
# [32, 128] per step: 64 rows spill on sm_80 (the audit).
COLUMN_SUM_TILE = {"BLOCK_M": 32, "BLOCK_N": 128}
COLUMN_SUM_WARPS = 4


@triton.jit
def _activation_backward_kernel(
    dy_ptr, saved_ptr, dz_ptr,
    M, N,
    stride_dym, stride_dyn, stride_sm, stride_sn,
    ACTIVATION: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dz [M, N] (contiguous) = act'(.) * dy [M, N] from the saved output y [M, N] (relu, leaky_relu,
    tanh, sigmoid: see activation_grad_from_saved)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=mask, other=0.0)
    saved = tl.load(saved_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
    dz = activation_grad_from_saved(saved.to(COMPUTE_DTYPE), dy.to(COMPUTE_DTYPE), ACTIVATION)
    tl.store(dz_ptr + offs_m[:, None] * N + offs_n[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _column_sum_kernel(
    x_ptr, out_ptr,
    M, N,
    stride_m, stride_n,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out [N] = x [M, N].sum(0): the bias gradient (x = dz)."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # A 2-D accumulator, reduced once at the end: no cross-thread reduction in the loop.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (offs_m < M)[:, None] & mask_n[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n, mask=mask, other=0.0)
        acc += x.to(ACC_DTYPE)
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n)
