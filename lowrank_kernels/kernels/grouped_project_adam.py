"""Kernel (a), grouped: the projection GEMM with the Adam moment update, for many problems in ONE launch.

The math of each tile is kernel (a)'s (project_adam.py), from the same device helpers: C = A B through
strides (left A = P^T, B = G; right A = G, B = Q), then the moments' update and N in the epilogue. Here the
operands come from the problem's row of an int64 table (addresses, sizes, strides) and beta1, beta2, eps
from a per-problem fp32 table, so problems of any shapes, ranks and hyperparameters share the launch.
The kernel itself does not care about orientation; a table holds one orientation because the tile shape
is chosen for the bucket (the rank on the I axis for left, on J for right).

Options for the update rules (constexprs, all off = the GaLore step): ADAM=False projects only (R to the N
buffer); STORE_R also writes R; NORMS and GNORM write fp32 norm partials (build's docstring), for which
RANK_AXIS says which tile axis is the rank one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._device import adam_tile_epilogue, round_to, tile_coords, tile_matmul_ext
from ._grouped_device import problem_row, row_dims, row_pointer, row_strides
from ._tables import TL_DTYPE, KernelTable, Operand, dims_multiple_of_8, launch_layouts

# Row layout (int64): A, B, M, V, N addresses; I, J, K; strides (ai, ak), (bk, bj), (mi, mj), (vi, vj),
# (ni, nj); the R buffer's address (STORE_R; N's strides) and the fp32 norm-partials buffer's (NORMS, GNORM);
# the problem's index (into the per-problem fp32 tables) and its first tile. constexprs, so the kernel and
# the host read one definition.
COLS = tl.constexpr(22)
_A, _B, _M, _V, _N = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3), tl.constexpr(4)
_I, _J, _K = tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
_S_A, _S_B, _S_M, _S_V, _S_N = tl.constexpr(8), tl.constexpr(10), tl.constexpr(12), tl.constexpr(14), tl.constexpr(16)
_R, _WORK = tl.constexpr(18), tl.constexpr(19)
_INDEX, _FIRST = tl.constexpr(20), tl.constexpr(21)


@triton.jit
def _grouped_project_adam_kernel(
    table_ptr, tile_problem_ptr, hyper_ptr,
    DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr,
    A_LAYOUT: tl.constexpr, B_LAYOUT: tl.constexpr, M_LAYOUT: tl.constexpr, V_LAYOUT: tl.constexpr,
    N_LAYOUT: tl.constexpr, ALIGNED: tl.constexpr, DIMS8: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_I: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
    ADAM: tl.constexpr = True, STORE_R: tl.constexpr = False, NORMS: tl.constexpr = False,
    GNORM: tl.constexpr = False, RANK_AXIS: tl.constexpr = 0,
):
    row = problem_row(table_ptr, tile_problem_ptr, COLS)
    a_ptr = row_pointer(row, _A, DTYPE, ALIGNED)
    b_ptr = row_pointer(row, _B, DTYPE, ALIGNED)
    n_ptr = row_pointer(row, _N, DTYPE, ALIGNED)
    I, J, K = row_dims(row, _I, DIMS8)
    stride_ai, stride_ak = row_strides(row, _S_A, A_LAYOUT, ALIGNED)
    stride_bk, stride_bj = row_strides(row, _S_B, B_LAYOUT, ALIGNED)
    stride_ni, stride_nj = row_strides(row, _S_N, N_LAYOUT, ALIGNED)
    tile = tl.program_id(0) - tl.load(row + _FIRST)

    # GNORM: the gradient's channel sums of squares from the GEMM's own loads (G is B left, A right)
    if GNORM:
        acc, _, g_squares, offs_i, offs_j = tile_matmul_ext(
            tile, a_ptr, b_ptr, a_ptr, I, J, K, stride_ai, stride_ak, stride_bk, stride_bj,
            BLOCK_I, BLOCK_J, BLOCK_K, GROUP_I, PRECISION, INTERPRETER, 0, 2 - RANK_AXIS)
    else:
        acc, _, g_squares, offs_i, offs_j = tile_matmul_ext(
            tile, a_ptr, b_ptr, a_ptr, I, J, K, stride_ai, stride_ak, stride_bk, stride_bj,
            BLOCK_I, BLOCK_J, BLOCK_K, GROUP_I, PRECISION, INTERPRETER, 0, 0)
    if ADAM:
        m_ptr = row_pointer(row, _M, M_DTYPE, ALIGNED)
        v_ptr = row_pointer(row, _V, V_DTYPE, ALIGNED)
        stride_mi, stride_mj = row_strides(row, _S_M, M_LAYOUT, ALIGNED)
        stride_vi, stride_vj = row_strides(row, _S_V, V_LAYOUT, ALIGNED)
        hyper = hyper_ptr + tl.load(row + _INDEX) * 5  # [beta1, 1 - beta1, beta2, 1 - beta2, eps]
        r, n = adam_tile_epilogue(acc, offs_i, offs_j, I, J, m_ptr, v_ptr, n_ptr,
                                  stride_mi, stride_mj, stride_vi, stride_vj, stride_ni, stride_nj,
                                  tl.load(hyper), tl.load(hyper + 1), tl.load(hyper + 2), tl.load(hyper + 3),
                                  tl.load(hyper + 4), INTERPRETER)
    else:  # projection only: R (rounded to the gradient's dtype) goes to the N buffer; no moments
        r = round_to(acc, DTYPE, INTERPRETER)
        mask = (offs_i < I)[:, None] & (offs_j < J)[None, :]
        tl.store(n_ptr + offs_i[:, None] * stride_ni + offs_j[None, :] * stride_nj, r, mask=mask)
        r = r.to(tl.float32)
        n = r
    if STORE_R:  # R as the moments saw it, for the residual rules' back-projection (N's strides)
        r_ptr = row_pointer(row, _R, DTYPE, ALIGNED)
        mask = (offs_i < I)[:, None] & (offs_j < J)[None, :]
        tl.store(r_ptr + offs_i[:, None] * stride_ni + offs_j[None, :] * stride_nj, r.to(DTYPE), mask=mask)
    if NORMS or GNORM:
        # Partials buffer (fp32): [T x C sums of N^2][T x C sums of R^2][C sums of G^2], C the channels (the
        # non-rank axis: J left, I right), T the rank axis' tile count. One writer per entry: deterministic.
        work = tl.load(row + _WORK).to(tl.pointer_type(tl.float32))
        pid_i, pid_j = tile_coords(tile, I, J, BLOCK_I, BLOCK_J, GROUP_I)
        if RANK_AXIS == 0:
            channels = J
            rank_tile = pid_i
            offs_c = offs_j
            T = tl.cdiv(I, BLOCK_I)
        else:
            channels = I
            rank_tile = pid_j
            offs_c = offs_i
            T = tl.cdiv(J, BLOCK_J)
        mask_c = offs_c < channels
        if NORMS:
            mask = (offs_i < I)[:, None] & (offs_j < J)[None, :]
            n2 = tl.where(mask, n * n, 0.0)
            r2 = tl.where(mask, r * r, 0.0)
            base = work + rank_tile.to(tl.int64) * channels + offs_c
            tl.store(base, tl.sum(n2, axis=RANK_AXIS), mask=mask_c)
            tl.store(base + T.to(tl.int64) * channels, tl.sum(r2, axis=RANK_AXIS), mask=mask_c)
        if GNORM:  # every rank tile summed the same channels: the first one stores
            tl.store(work + 2 * T.to(tl.int64) * channels + offs_c, g_squares,
                     mask=mask_c & ((offs_c * 0 + rank_tile) == 0))  # (a vector mask: the interpreter's need)


def gemm_dims(side: str, m: int, n: int, r: int) -> tuple:
    """(I, J, K) of R = A B for an m x n weight of rank r: (r, n, m) left, (m, r, n) right."""
    return (r, n, m) if side == "left" else (m, r, n)


def describe(side: str, problem: dict, grad: torch.Tensor) -> tuple:
    """({A, B, M, V, N: Operand}, (I, J, K)) of one problem: R = A B with A = P^T, B = G (left) or A = G,
    B = Q (right); P^T is read through P's swapped strides, never materialised. Without moments (the
    projection-only mode) M and V name the N buffer, never read."""
    basis = problem["basis"]
    m, n = grad.shape
    r = basis.shape[1]
    ops = dict(M=Operand.of(problem.get("exp_avg", problem["N"])),
               V=Operand.of(problem.get("exp_avg_sq", problem["N"])), N=Operand.of(problem["N"]))
    if side == "left":
        ops.update(A=Operand.of(basis, transposed=True), B=Operand.of(grad))
    else:
        ops.update(A=Operand.of(grad), B=Operand.of(basis))
    return ops, gemm_dims(side, m, n, r)


def _row(ops: dict, dims: tuple, problem: dict) -> list:
    extra = [problem[k].data_ptr() if problem.get(k) is not None else 0 for k in ("R", "work")]
    return ([ops[k].ptr for k in "ABMVN"] + list(dims) + [s for k in "ABMVN" for s in ops[k].strides]
            + extra + [0, 0])  # index and first tile: filled by KernelTable.build


def config(side: str, problems: list, dtype: torch.dtype, device: torch.device, sms=None) -> dict:
    """The launch's tile config (what build uses): follows the largest problem (see _launch.gemm_config)."""
    dims = [gemm_dims(side, *p["grad"].shape, p["basis"].shape[1]) for p in problems]
    big = [max((d[i] for d in dims), default=1) for i in range(3)]
    return _launch.gemm_config(*big, dtype, device, [(I, J) for I, J, _ in dims], sms)


def work_shape(side: str, m: int, n: int, r: int, cfg: dict) -> tuple:
    """(rank tiles T, channels C) of a problem's norm-partials buffer, which holds (2 T + 1) C fp32 values:
    T x C partial sums of N^2 and of R^2 along the rank axis, then C sums of G^2."""
    if side == "left":
        return triton.cdiv(r, cfg["BLOCK_I"]), n
    return triton.cdiv(r, cfg["BLOCK_J"]), m


def build(side: str, problems: list, device: torch.device, dtype: torch.dtype, m_dtype: torch.dtype,
          v_dtype: torch.dtype, sms=None, *, adam: bool = True, store_r: bool = False, norms: bool = False,
          gnorm: bool = False) -> KernelTable:
    """The launch's table from validated problems (each with grad, basis, exp_avg, exp_avg_sq, N); ``sms``:
    see _launch.gemm_config (0: no SM filling).

    Options (all off: the GaLore step): ``adam=False`` projects only (R to the N buffer, no moments; the
    problems need no exp_avg/exp_avg_sq); ``store_r`` also writes R to each problem's ``R`` buffer (N's
    shape and strides); ``norms``/``gnorm`` write the norm partials (work_shape) to each problem's fp32
    ``work`` buffer: sums of N^2 and R^2 along the rank axis per tile, and the gradient's channel sums of
    squares."""
    for i, p in enumerate(problems):
        if store_r and (p.get("R") is None or p["R"].stride() != p["N"].stride() or p["R"].dtype != dtype):
            raise ValueError(f"problem {i}: store_r needs an R buffer with N's shape, strides and dtype")
        if (norms or gnorm) and (p.get("work") is None or p["work"].dtype != torch.float32):
            raise ValueError(f"problem {i}: norms/gnorm need an fp32 work buffer (work_shape)")
    described = [describe(side, p, p["grad"]) for p in problems]
    dims = [d for _, d in described]
    cfg = config(side, problems, dtype, device, sms)
    tiles = [triton.cdiv(I, cfg["BLOCK_I"]) * triton.cdiv(J, cfg["BLOCK_J"]) for I, J, _ in dims]
    meta = dict(DTYPE=TL_DTYPE[dtype], M_DTYPE=TL_DTYPE[m_dtype], V_DTYPE=TL_DTYPE[v_dtype],
                PRECISION=_launch.dot_precision(dtype), DIMS8=dims_multiple_of_8(dims), **cfg,
                **launch_layouts({k: [ops[k] for ops, _ in described] for k in "ABMVN"}, _hinted(problems)))
    flags = dict(ADAM=adam, STORE_R=store_r, NORMS=norms, GNORM=gnorm, RANK_AXIS=0 if side == "left" else 1)
    meta.update({k: v for k, v in flags.items() if v != _DEFAULTS[k]})  # the GaLore launch: as before
    return KernelTable.build([_row(ops, d, p) for (ops, d), p in zip(described, problems)], tiles,
                             [K for _, _, K in dims], device, meta)


_DEFAULTS = dict(ADAM=True, STORE_R=False, NORMS=False, GNORM=False, RANK_AXIS=0)


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
    table.meta.update(launch_layouts({k: [ops[k] for ops, _ in described] for k in "ABMVN"}, _hinted(problems)))


def _hinted(problems: list) -> list:
    """The R buffers (read with N's strides): part of the launch's ALIGNED promise."""
    return [p["R"] for p in problems if p.get("R") is not None]


def launch(table: KernelTable, hyper: torch.Tensor) -> None:
    """One launch over every tile of every problem; reads only device tables (no host synchronisation)."""
    if table.num_tiles == 0:
        return
    with _launch.on_device(table.table.device):
        _grouped_project_adam_kernel[(table.num_tiles,)](
            table.table, table.tile_problem, hyper,
            INTERPRETER=_launch.interpreted(_grouped_project_adam_kernel), **table.meta)
