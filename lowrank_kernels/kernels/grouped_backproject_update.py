"""Kernel (b), grouped: the back-projection GEMM with the weight update, for many problems in ONE launch.

Each tile is kernel (b)'s (backproject_update.py), from the same device helpers: U = A B through strides
(left A = P, B = N; right A = N, B = Q^T), then in the epilogue, in fp32 and in galore-torch's order,

    w <- w - (step_size * scale) * u;   then w <- w + w * (-lr * wd)   (skipped where lr * wd == 0)

The operands come from the problem's int64 table row; step_size, scale, lr * wd (and FRUGAL's residual_lr)
from the caller's (P, 4) fp32 device tensor, read at run time, so a CUDA graph replays with each step's values.

The other update rules (constexpr RULE; reference.fira_step / frugal_step / apollo_step's order), with f the
channel factors kernel (s) wrote (grouped_rule_scales.py):

    fira:    U = s P N + f (G - s P R)   (two accumulators sharing the basis' loads); w <- w - step_size U
    frugal:  w <- w - residual_lr sign(G - P R), rounded to W's dtype; then w <- w - step_size s P N
    apollo:  U = f G (no GEMM);  w <- w - step_size U

each followed by the decay, as galore's. They read G (the fourth pass over m x n).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._device import decoupled_update, round_to, tile_coords, tile_matmul, tile_matmul_ext, update_tile_epilogue
from ._grouped_device import problem_row, row_dims, row_pointer, row_strides
from ._tables import SCALAR_STRIDE, TL_DTYPE, KernelTable, Operand, dims_multiple_of_8, launch_layouts

# Row layout (int64): W, A, B addresses; I, J, K (m, n, r); strides (wi, wj), (ai, ak), (bk, bj); the
# gradient's address and strides, the R buffer's address (N's strides) and the fp32 factor buffer's (update
# rules other than galore; 0 otherwise); the problem's index (into the per-problem fp32 tables) and its
# first tile.
COLS = tl.constexpr(19)
_W, _A, _B = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_I, _J, _K = tl.constexpr(3), tl.constexpr(4), tl.constexpr(5)
_S_W, _S_A, _S_B = tl.constexpr(6), tl.constexpr(8), tl.constexpr(10)
_G, _S_G, _X, _FACTOR = tl.constexpr(12), tl.constexpr(13), tl.constexpr(15), tl.constexpr(16)
_INDEX, _FIRST = tl.constexpr(17), tl.constexpr(18)
RULES = {"galore": 0, "fira": 1, "frugal": 2, "apollo": 3, "apollo-mini": 3}


@triton.jit
def _grouped_backproject_update_kernel(
    table_ptr, tile_problem_ptr, scalars_ptr,
    DTYPE: tl.constexpr, W_DTYPE: tl.constexpr,
    W_LAYOUT: tl.constexpr, A_LAYOUT: tl.constexpr, B_LAYOUT: tl.constexpr, ALIGNED: tl.constexpr,
    DIMS8: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_I: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
    RULE: tl.constexpr = 0, G_LAYOUT: tl.constexpr = 0, SECOND: tl.constexpr = 0, CHANNEL_AXIS: tl.constexpr = 0,
    TENSORWISE: tl.constexpr = False,
):
    row = problem_row(table_ptr, tile_problem_ptr, COLS)
    w_ptr = row_pointer(row, _W, W_DTYPE, ALIGNED)
    a_ptr = row_pointer(row, _A, DTYPE, ALIGNED)
    b_ptr = row_pointer(row, _B, DTYPE, ALIGNED)
    I, J, K = row_dims(row, _I, DIMS8)
    stride_wi, stride_wj = row_strides(row, _S_W, W_LAYOUT, ALIGNED)
    stride_ai, stride_ak = row_strides(row, _S_A, A_LAYOUT, ALIGNED)
    stride_bk, stride_bj = row_strides(row, _S_B, B_LAYOUT, ALIGNED)
    scalars = scalars_ptr + tl.load(row + _INDEX) * SCALAR_STRIDE  # [step_size, scale, lr * wd, residual_lr]
    tile = tl.program_id(0) - tl.load(row + _FIRST)

    if RULE == 0:  # galore
        alpha = tl.load(scalars) * tl.load(scalars + 1)
        decay = -tl.load(scalars + 2)
        acc, offs_i, offs_j = tile_matmul(tile, a_ptr, b_ptr, I, J, K, stride_ai, stride_ak, stride_bk, stride_bj,
                                          BLOCK_I, BLOCK_J, BLOCK_K, GROUP_I, PRECISION, INTERPRETER)
        update_tile_epilogue(acc, offs_i, offs_j, I, J, w_ptr, stride_wi, stride_wj, alpha, decay, True,
                             INTERPRETER)
    else:
        _rule_tile(tile, row, scalars, w_ptr, a_ptr, b_ptr, I, J, K, stride_wi, stride_wj, stride_ai, stride_ak,
                   stride_bk, stride_bj, DTYPE, ALIGNED, BLOCK_I, BLOCK_J, BLOCK_K, GROUP_I, PRECISION,
                   INTERPRETER, RULE, G_LAYOUT, SECOND, CHANNEL_AXIS, TENSORWISE)


@triton.jit
def _rule_tile(tile, row, scalars, w_ptr, a_ptr, b_ptr, I, J, K, stride_wi, stride_wj, stride_ai, stride_ak,
               stride_bk, stride_bj, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_I: tl.constexpr,
               BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_I: tl.constexpr, PRECISION: tl.constexpr,
               INTERPRETER: tl.constexpr, RULE: tl.constexpr, G_LAYOUT: tl.constexpr, SECOND: tl.constexpr,
               CHANNEL_AXIS: tl.constexpr, TENSORWISE: tl.constexpr):
    """One tile of the fira (1), frugal (2) or apollo (3) update, in the reference's order (module docstring).
    Reads G (the fourth pass over m x n) and, for fira and frugal, back-projects N and R together."""
    g_ptr = row_pointer(row, _G, DTYPE, ALIGNED)
    stride_gi, stride_gj = row_strides(row, _S_G, G_LAYOUT, ALIGNED)
    step_size = tl.load(scalars)
    scale = tl.load(scalars + 1)
    decay = -tl.load(scalars + 2)
    if RULE == 3:  # apollo: no GEMM, the gradient itself is scaled
        pid_i, pid_j = tile_coords(tile, I, J, BLOCK_I, BLOCK_J, GROUP_I)
        offs_i = (pid_i * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
        offs_j = (pid_j * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)
        acc = 0.0
        acc_r = 0.0
    else:  # P N and P R (left) or N Q^T and R Q^T (right), sharing the basis' loads
        x_ptr = row_pointer(row, _X, DTYPE, ALIGNED)
        acc, acc_r, _, offs_i, offs_j = tile_matmul_ext(tile, a_ptr, b_ptr, x_ptr, I, J, K, stride_ai, stride_ak,
                                                        stride_bk, stride_bj, BLOCK_I, BLOCK_J, BLOCK_K, GROUP_I,
                                                        PRECISION, INTERPRETER, SECOND, 0)
    mask = (offs_i < I)[:, None] & (offs_j < J)[None, :]
    g = tl.load(g_ptr + offs_i[:, None] * stride_gi + offs_j[None, :] * stride_gj, mask=mask, other=0.0)
    g = g.to(tl.float32)
    w_ptrs = w_ptr + offs_i[:, None] * stride_wi + offs_j[None, :] * stride_wj
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    if RULE != 2:  # the channel factors from kernel (s): ratio / limiter (times sqrt(scale) for apollo)
        factor_ptr = tl.load(row + _FACTOR).to(tl.pointer_type(tl.float32))
        if TENSORWISE:
            f = tl.load(factor_ptr)
        elif CHANNEL_AXIS == 0:
            f = tl.load(factor_ptr + offs_i, mask=offs_i < I, other=0.0)[:, None]
        else:
            f = tl.load(factor_ptr + offs_j, mask=offs_j < J, other=0.0)[None, :]
    if RULE == 1:  # fira: U = s P N + f (G - s P R)
        w = decoupled_update(w, scale * acc + f * (g - scale * acc_r), step_size, decay, True)
    elif RULE == 2:  # frugal: the signSGD step on G - P R (scale 1) first, rounded to W as the reference's
        residual = g - round_to(acc_r, DTYPE, INTERPRETER).to(tl.float32)
        sign = tl.where(residual > 0, 1.0, tl.where(residual < 0, -1.0, 0.0))
        w = w - tl.load(scalars + 3) * sign
        w = round_to(w, w_ptr.dtype.element_ty, INTERPRETER).to(tl.float32)
        w = decoupled_update(w, acc, step_size * scale, decay, True)
    else:  # apollo: U = G f
        w = decoupled_update(w, g * f, step_size, decay, True)
    tl.store(w_ptrs, round_to(w, w_ptr.dtype.element_ty, INTERPRETER), mask=mask)


def gemm_dims(side: str, m: int, n: int, r: int) -> tuple:
    """(I, J, K) of U = A B for an m x n weight of rank r, either side."""
    return (m, n, r)


def describe(side: str, problem: dict, grad=None) -> tuple:
    """({W, A, B[, G]: Operand}, (m, n, r)) of one problem: U = P N (left) or N Q^T (right), Q^T read through
    Q's swapped strides; G = ``grad`` when given (an update rule reads it)."""
    W, basis, N = problem["param"], problem["basis"], problem["N"]
    m, n = W.shape
    r = basis.shape[1]
    if side == "left":
        ops = dict(W=Operand.of(W), A=Operand.of(basis), B=Operand.of(N))
    else:
        ops = dict(W=Operand.of(W), A=Operand.of(N), B=Operand.of(basis, transposed=True))
    if grad is not None:
        ops["G"] = Operand.of(grad)
    return ops, gemm_dims(side, m, n, r)


def build(side: str, problems: list, device: torch.device, dtype: torch.dtype, w_dtype: torch.dtype,
          sms=None, *, rule: str = "galore", tensorwise: bool = False) -> KernelTable:
    """The launch's table from validated problems (each with param, basis, N); ``sms``: see
    _launch.gemm_config (0: no SM filling).

    ``rule`` (update_rules' names; "galore" is the default step): "fira" and "frugal" also need each
    problem's ``grad`` and ``R`` (N's shape and strides, kernel (a)'s store_r), "fira" and "apollo"/
    "apollo-mini" a ``factor`` buffer (kernel (s)'s output; ``tensorwise``: one value per problem)."""
    code = RULES[rule]
    for i, p in enumerate(problems):
        if code in (1, 2) and (p.get("R") is None or p["R"].stride() != p["N"].stride()):
            raise ValueError(f"problem {i}: rule {rule!r} needs an R buffer with N's shape and strides")
        if code in (1, 3) and (p.get("factor") is None or p["factor"].dtype != torch.float32):
            raise ValueError(f"problem {i}: rule {rule!r} needs an fp32 factor buffer")
    described = [describe(side, p, p["grad"] if code else None) for p in problems]
    dims = [d for _, d in described]
    big = [max((d[i] for d in dims), default=1) for i in range(3)]
    cfg = _launch.gemm_config(*big, dtype, device, [(I, J) for I, J, _ in dims], sms)
    tiles = [triton.cdiv(I, cfg["BLOCK_I"]) * triton.cdiv(J, cfg["BLOCK_J"]) for I, J, _ in dims]
    rows = []
    for (ops, d), p in zip(described, problems):
        g = ops.get("G", Operand(0, (0, 0), (0, 0)))
        extra = [g.ptr, *g.strides] + [p[k].data_ptr() if p.get(k) is not None else 0 for k in ("R", "factor")]
        rows.append([ops[k].ptr for k in "WAB"] + list(d) + [s for k in "WAB" for s in ops[k].strides] + extra
                    + [0, 0])
    names = "WABG" if code else "WAB"
    meta = dict(DTYPE=TL_DTYPE[dtype], W_DTYPE=TL_DTYPE[w_dtype], PRECISION=_launch.dot_precision(dtype),
                DIMS8=dims_multiple_of_8(dims), **cfg,
                **launch_layouts({k: [ops[k] for ops, _ in described] for k in names}, _hinted(problems)))
    if code:  # the galore launch keeps its constexprs (and compiled variants) as before
        meta.update(RULE=code, SECOND=2 if side == "left" else 1, CHANNEL_AXIS=1 if side == "left" else 0,
                    TENSORWISE=tensorwise)
    return KernelTable.build(rows, tiles, [K for _, _, K in dims], device, meta)


def refresh_grads(table: KernelTable, side: str, problems: list, grads: list) -> None:
    """Point a rule's table (one that reads G) at new gradients; never blocks the host."""
    updates = {}
    for slot, p in enumerate(table.order):
        op = Operand.of(grads[p])
        updates[slot, _G.value], updates[slot, _S_G.value], updates[slot, _S_G.value + 1] = op.ptr, *op.strides
    table.rewrite(updates)
    ops = [describe(side, p, g)[0] for p, g in zip(problems, grads)]
    table.meta.update(launch_layouts({k: [o[k] for o in ops] for k in "WABG"}, _hinted(problems)))


def _hinted(problems: list) -> list:
    """The R buffers (the X operand, read with N's strides): part of the launch's ALIGNED promise."""
    return [p["R"] for p in problems if p.get("R") is not None]


def launch(table: KernelTable, scalars: torch.Tensor) -> None:
    """One launch over every tile of every problem; reads only device tables (no host synchronisation)."""
    if table.num_tiles == 0:
        return
    with _launch.on_device(table.table.device):
        _grouped_backproject_update_kernel[(table.num_tiles,)](
            table.table, table.tile_problem, scalars,
            INTERPRETER=_launch.interpreted(_grouped_backproject_update_kernel), **table.meta)
