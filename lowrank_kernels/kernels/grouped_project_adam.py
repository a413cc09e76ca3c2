"""Kernel (a), grouped: the projection GEMM with the Adam moment update, for many problems in ONE launch.

The math of each tile is kernel (a)'s (project_adam.py), from the same device helpers: C = A B through
strides (left A = P^T, B = G; right A = G, B = Q), then the moments' update and N in the epilogue. Here the
operands come from the problem's row of an int64 table (addresses, sizes, strides) and beta1, beta2, eps
from a per-problem fp32 table, so problems of any shapes, ranks and hyperparameters share the launch.
The kernel itself does not care about orientation; a table holds one orientation because the tile shape
is chosen for the bucket (the rank on the I axis for left, on J for right).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._device import adam_tile_epilogue, tile_matmul
from ._grouped_device import problem_row, row_dims, row_pointer, row_strides
from ._tables import TL_DTYPE, KernelTable, Operand, dims_multiple_of_8, launch_layouts

# Row layout (int64): A, B, M, V, N addresses; I, J, K; strides (ai, ak), (bk, bj), (mi, mj), (vi, vj),
# (ni, nj); the problem's index (into the per-problem fp32 tables) and its first tile. constexprs, so the
# kernel and the host read one definition.
COLS = tl.constexpr(20)
_A, _B, _M, _V, _N = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3), tl.constexpr(4)
_I, _J, _K = tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
_S_A, _S_B, _S_M, _S_V, _S_N = tl.constexpr(8), tl.constexpr(10), tl.constexpr(12), tl.constexpr(14), tl.constexpr(16)
_INDEX, _FIRST = tl.constexpr(18), tl.constexpr(19)


@triton.jit
def _grouped_project_adam_kernel(
    table_ptr, tile_problem_ptr, hyper_ptr,
    DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr,
    A_LAYOUT: tl.constexpr, B_LAYOUT: tl.constexpr, M_LAYOUT: tl.constexpr, V_LAYOUT: tl.constexpr,
    N_LAYOUT: tl.constexpr, ALIGNED: tl.constexpr, DIMS8: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_I: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    row = problem_row(table_ptr, tile_problem_ptr, COLS)
    a_ptr = row_pointer(row, _A, DTYPE, ALIGNED)
    b_ptr = row_pointer(row, _B, DTYPE, ALIGNED)
    m_ptr = row_pointer(row, _M, M_DTYPE, ALIGNED)
    v_ptr = row_pointer(row, _V, V_DTYPE, ALIGNED)
    n_ptr = row_pointer(row, _N, DTYPE, ALIGNED)
    I, J, K = row_dims(row, _I, DIMS8)
    stride_ai, stride_ak = row_strides(row, _S_A, A_LAYOUT, ALIGNED)
    stride_bk, stride_bj = row_strides(row, _S_B, B_LAYOUT, ALIGNED)
    stride_mi, stride_mj = row_strides(row, _S_M, M_LAYOUT, ALIGNED)
    stride_vi, stride_vj = row_strides(row, _S_V, V_LAYOUT, ALIGNED)
    stride_ni, stride_nj = row_strides(row, _S_N, N_LAYOUT, ALIGNED)
    hyper = hyper_ptr + tl.load(row + _INDEX) * 5  # [beta1, 1 - beta1, beta2, 1 - beta2, eps]
    tile = tl.program_id(0) - tl.load(row + _FIRST)

    acc, offs_i, offs_j = tile_matmul(tile, a_ptr, b_ptr, I, J, K, stride_ai, stride_ak, stride_bk, stride_bj,
                                      BLOCK_I, BLOCK_J, BLOCK_K, GROUP_I, PRECISION, INTERPRETER)
    adam_tile_epilogue(acc, offs_i, offs_j, I, J, m_ptr, v_ptr, n_ptr,
                       stride_mi, stride_mj, stride_vi, stride_vj, stride_ni, stride_nj,
                       tl.load(hyper), tl.load(hyper + 1), tl.load(hyper + 2), tl.load(hyper + 3),
                       tl.load(hyper + 4), INTERPRETER)


def gemm_dims(side: str, m: int, n: int, r: int) -> tuple:
    """(I, J, K) of R = A B for an m x n weight of rank r: (r, n, m) left, (m, r, n) right."""
    return (r, n, m) if side == "left" else (m, r, n)


def describe(side: str, problem: dict, grad: torch.Tensor) -> tuple:
    """({A, B, M, V, N: Operand}, (I, J, K)) of one problem: R = A B with A = P^T, B = G (left) or A = G,
    B = Q (right); P^T is read through P's swapped strides, never materialised."""
    basis = problem["basis"]
    m, n = grad.shape
    r = basis.shape[1]
    ops = dict(M=Operand.of(problem["exp_avg"]), V=Operand.of(problem["exp_avg_sq"]), N=Operand.of(problem["N"]))
    if side == "left":
        ops.update(A=Operand.of(basis, transposed=True), B=Operand.of(grad))
    else:
        ops.update(A=Operand.of(grad), B=Operand.of(basis))
    return ops, gemm_dims(side, m, n, r)


def _row(ops: dict, dims: tuple) -> list:
    return ([ops[k].ptr for k in "ABMVN"] + list(dims) + [s for k in "ABMVN" for s in ops[k].strides]
            + [0, 0])  # index and first tile: filled by KernelTable.build


def build(side: str, problems: list, device: torch.device, dtype: torch.dtype, m_dtype: torch.dtype,
          v_dtype: torch.dtype, sms=None) -> KernelTable:
    """The launch's table from validated problems (each with grad, basis, exp_avg, exp_avg_sq, N); ``sms``:
    see _launch.gemm_config (0: no SM filling)."""
    described = [describe(side, p, p["grad"]) for p in problems]
    dims = [d for _, d in described]
    big = [max((d[i] for d in dims), default=1) for i in range(3)]
    cfg = _launch.gemm_config(*big, dtype, device, [(I, J) for I, J, _ in dims], sms)
    tiles = [triton.cdiv(I, cfg["BLOCK_I"]) * triton.cdiv(J, cfg["BLOCK_J"]) for I, J, _ in dims]
    meta = dict(DTYPE=TL_DTYPE[dtype], M_DTYPE=TL_DTYPE[m_dtype], V_DTYPE=TL_DTYPE[v_dtype],
                PRECISION=_launch.dot_precision(dtype), DIMS8=dims_multiple_of_8(dims), **cfg,
                **launch_layouts({k: [ops[k] for ops, _ in described] for k in "ABMVN"}))
    return KernelTable.build([_row(ops, d) for ops, d in described], tiles, [K for _, _, K in dims], device, meta)


def refresh_grads(table: KernelTable, side: str, problems: list, grads: list) -> None:
    """Point the table at new gradients (same shapes and dtype, any strides); never blocks the host."""
    described = [describe(side, p, g) for p, g in zip(problems, grads)]
    key, col = ("B", _B.value) if side == "left" else ("A", _A.value)
    scol = (_S_B if side == "left" else _S_A).value
    updates = {}
    for slot, p in enumerate(table.order):
        op = described[p][0][key]
        updates[slot, col], updates[slot, scol], updates[slot, scol + 1] = op.ptr, *op.strides
    table.rewrite(updates)
    table.meta.update(launch_layouts({k: [ops[k] for ops, _ in described] for k in "ABMVN"}))


def launch(table: KernelTable, hyper: torch.Tensor) -> None:
    """One launch over every tile of every problem; reads only device tables (no host synchronisation)."""
    if table.num_tiles == 0:
        return
    with _launch.on_device(table.table.device):
        _grouped_project_adam_kernel[(table.num_tiles,)](
            table.table, table.tile_problem, hyper,
            INTERPRETER=_launch.interpreted(_grouped_project_adam_kernel), **table.meta)
