"""Kernel (b), grouped: the back-projection GEMM with the weight update, for many problems in ONE launch.

Each tile is kernel (b)'s (backproject_update.py), from the same device helpers: U = A B through strides
(left A = P, B = N; right A = N, B = Q^T), then in the epilogue, in fp32 and in galore-torch's order,

    w <- w - (step_size * scale) * u;   then w <- w + w * (-lr * wd)   (skipped where lr * wd == 0)

The operands come from the problem's int64 table row; step_size, scale and lr * wd from the caller's
(P, 3) fp32 device tensor, read at run time, so a CUDA graph replays with each step's values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._device import tile_matmul, update_tile_epilogue
from ._grouped_device import problem_row, row_dims, row_pointer, row_strides
from ._tables import TL_DTYPE, KernelTable, Operand, dims_multiple_of_8, launch_layouts

# Row layout (int64): W, A, B addresses; I, J, K (m, n, r); strides (wi, wj), (ai, ak), (bk, bj); the
# problem's index (into the per-problem fp32 tables) and its first tile.
COLS = tl.constexpr(14)
_W, _A, _B = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_I, _J, _K = tl.constexpr(3), tl.constexpr(4), tl.constexpr(5)
_S_W, _S_A, _S_B = tl.constexpr(6), tl.constexpr(8), tl.constexpr(10)
_INDEX, _FIRST = tl.constexpr(12), tl.constexpr(13)


@triton.jit
def _grouped_backproject_update_kernel(
    table_ptr, tile_problem_ptr, scalars_ptr,
    DTYPE: tl.constexpr, W_DTYPE: tl.constexpr,
    W_LAYOUT: tl.constexpr, A_LAYOUT: tl.constexpr, B_LAYOUT: tl.constexpr, ALIGNED: tl.constexpr,
    DIMS8: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_I: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    row = problem_row(table_ptr, tile_problem_ptr, COLS)
    w_ptr = row_pointer(row, _W, W_DTYPE, ALIGNED)
    a_ptr = row_pointer(row, _A, DTYPE, ALIGNED)
    b_ptr = row_pointer(row, _B, DTYPE, ALIGNED)
    I, J, K = row_dims(row, _I, DIMS8)
    stride_wi, stride_wj = row_strides(row, _S_W, W_LAYOUT, ALIGNED)
    stride_ai, stride_ak = row_strides(row, _S_A, A_LAYOUT, ALIGNED)
    stride_bk, stride_bj = row_strides(row, _S_B, B_LAYOUT, ALIGNED)
    scalars = scalars_ptr + tl.load(row + _INDEX) * 3  # [step_size, scale, lr * weight_decay]
    alpha = tl.load(scalars) * tl.load(scalars + 1)
    decay = -tl.load(scalars + 2)
    tile = tl.program_id(0) - tl.load(row + _FIRST)

    acc, offs_i, offs_j = tile_matmul(tile, a_ptr, b_ptr, I, J, K, stride_ai, stride_ak, stride_bk, stride_bj,
                                      BLOCK_I, BLOCK_J, BLOCK_K, GROUP_I, PRECISION, INTERPRETER)
    update_tile_epilogue(acc, offs_i, offs_j, I, J, w_ptr, stride_wi, stride_wj, alpha, decay, True, INTERPRETER)


def gemm_dims(side: str, m: int, n: int, r: int) -> tuple:
    """(I, J, K) of U = A B for an m x n weight of rank r, either side."""
    return (m, n, r)


def describe(side: str, problem: dict) -> tuple:
    """({W, A, B: Operand}, (m, n, r)) of one problem: U = P N (left) or N Q^T (right), Q^T read through
    Q's swapped strides."""
    W, basis, N = problem["param"], problem["basis"], problem["N"]
    m, n = W.shape
    r = basis.shape[1]
    if side == "left":
        ops = dict(W=Operand.of(W), A=Operand.of(basis), B=Operand.of(N))
    else:
        ops = dict(W=Operand.of(W), A=Operand.of(N), B=Operand.of(basis, transposed=True))
    return ops, gemm_dims(side, m, n, r)


def build(side: str, problems: list, device: torch.device, dtype: torch.dtype, w_dtype: torch.dtype,
          sms=None) -> KernelTable:
    """The launch's table from validated problems (each with param, basis, N); ``sms``: see
    _launch.gemm_config (0: no SM filling)."""
    described = [describe(side, p) for p in problems]
    dims = [d for _, d in described]
    big = [max((d[i] for d in dims), default=1) for i in range(3)]
    cfg = _launch.gemm_config(*big, dtype, device, [(I, J) for I, J, _ in dims], sms)
    tiles = [triton.cdiv(I, cfg["BLOCK_I"]) * triton.cdiv(J, cfg["BLOCK_J"]) for I, J, _ in dims]
    rows = [[ops[k].ptr for k in "WAB"] + list(d) + [s for k in "WAB" for s in ops[k].strides] + [0, 0]
            for ops, d in described]
    meta = dict(DTYPE=TL_DTYPE[dtype], W_DTYPE=TL_DTYPE[w_dtype], PRECISION=_launch.dot_precision(dtype),
                DIMS8=dims_multiple_of_8(dims), **cfg,
                **launch_layouts({k: [ops[k] for ops, _ in described] for k in "WAB"}))
    return KernelTable.build(rows, tiles, [K for _, _, K in dims], device, meta)


def launch(table: KernelTable, scalars: torch.Tensor) -> None:
    """One launch over every tile of every problem; reads only device tables (no host synchronisation)."""
    if table.num_tiles == 0:
        return
    with _launch.on_device(table.table.device):
        _grouped_backproject_update_kernel[(table.num_tiles,)](
            table.table, table.tile_problem, scalars,
            INTERPRETER=_launch.interpreted(_grouped_backproject_update_kernel), **table.meta)
