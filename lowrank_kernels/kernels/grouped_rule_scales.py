"""Kernel (s), grouped: the update rules' per-channel factors and norm-growth limiter, one program per problem.

Between the two GEMM kernels of a Fira or APOLLO step. Kernel (a) left, per problem, fp32 partial sums of
squares of N and of R along the rank axis (one per channel and rank tile) and of the gradient's channels;
this kernel reduces them (small: (2 T + 1) C values for C channels and T rank tiles, never a pass over
m x n) into

    ratio_c = ||N_c|| / (||R_c|| + 1e-8)              reference.norm_ratio (tensorwise: one ratio)

and Fira's norm-growth limiter (reference.limit_norm_growth, gamma 1.01) with the norm of the limited
matrix in closed form, since it is never materialised:

    apollo: ||U||^2 = sum_c ratio_c^2 ||g_c||^2                      (times scale with scale_front)
    fira:   ||S||^2 = sum_c ratio_c^2 (||g_c||^2 - (2 s - s^2) ||r_c||^2)

(Fira's S_c = ratio_c (g_c - s P r_c) with <g_c, P r_c> = ||r_c||^2 and ||P r_c|| = ||r_c|| for a basis
with orthonormal columns: the engine routes only those here.) It writes the factor kernel (b) multiplies
the channel by (ratio_c / limiter, times sqrt(scale) for apollo) and the limiter's new norm into the
parameter's state tensor ``limiter_norm``. The norms are rounded to the gradient's dtype where the
reference computes them in it (norms, ratio, limiter), so 16-bit runs round as it does at those points.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._device import round_to
from ._grouped_device import problem_row
from ._tables import SCALAR_STRIDE, TL_DTYPE, KernelTable

# Row layout (int64): the partials buffer (fp32), channels C, rank tiles T, the factor buffer (fp32, C
# values; 1 tensorwise), the limiter norm (0-d, gradient dtype), has-a-previous-norm flag; index, first.
COLS = tl.constexpr(8)
_WORK, _C, _T, _FACTOR, _NORM, _HAS_PREV = (tl.constexpr(i) for i in range(6))
_INDEX, _FIRST = tl.constexpr(6), tl.constexpr(7)
RULES = {"fira": 1, "apollo": 2}
GAMMA = 1.01  # reference.limit_norm_growth's default, as both packages use it
BLOCK_C = 256


@triton.jit
def _rnd(x, DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
    return round_to(x, DTYPE, INTERPRETER).to(tl.float32)


@triton.jit
def _ratio(n2, r2, DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
    """reference.norm_ratio from sums of squares, rounded where torch rounds (each op in DTYPE)."""
    nr = _rnd(_rnd(tl.sqrt(r2), DTYPE, INTERPRETER) + 1e-8, DTYPE, INTERPRETER)
    return _rnd(_rnd(tl.sqrt(n2), DTYPE, INTERPRETER) / nr, DTYPE, INTERPRETER)


@triton.jit
def _grouped_rule_scales_kernel(
    table_ptr, tile_problem_ptr, scalars_ptr,
    DTYPE: tl.constexpr, RULE: tl.constexpr, TENSORWISE: tl.constexpr, LIMIT: tl.constexpr,
    SCALE_FRONT: tl.constexpr, GAMMA_: tl.constexpr, BLOCK: tl.constexpr, INTERPRETER: tl.constexpr,
):
    row = problem_row(table_ptr, tile_problem_ptr, COLS)
    work = tl.load(row + _WORK).to(tl.pointer_type(tl.float32))
    factor = tl.load(row + _FACTOR).to(tl.pointer_type(tl.float32))
    C = tl.load(row + _C)
    T = tl.load(row + _T)
    scale = tl.load(scalars_ptr + tl.load(row + _INDEX) * SCALAR_STRIDE + 1)
    coef = 2.0 * scale - scale * scale  # fira: ||g - s P r||^2 = ||g||^2 - (2 s - s^2) ||r||^2
    r2_base = work + T * C
    g2_base = work + 2 * T * C
    offs = tl.arange(0, BLOCK).to(tl.int64)

    norm2 = 0.0
    ratio = 0.0
    if TENSORWISE:  # one ratio over the whole tensor
        n2 = tl.zeros((BLOCK,), dtype=tl.float32)
        r2 = tl.zeros((BLOCK,), dtype=tl.float32)
        g2 = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, T * C, BLOCK):
            mask = start + offs < T * C
            n2 += tl.load(work + start + offs, mask=mask, other=0.0)
            r2 += tl.load(r2_base + start + offs, mask=mask, other=0.0)
        for start in range(0, C, BLOCK):
            g2 += tl.load(g2_base + start + offs, mask=start + offs < C, other=0.0)
        ratio = _ratio(tl.sum(n2, axis=0), tl.sum(r2, axis=0), DTYPE, INTERPRETER)
        norm2 = ratio * ratio * tl.sum(g2, axis=0)
    else:  # one ratio per channel, kept in the factor buffer until the limiter is known
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, C, BLOCK):
            c = start + offs
            mask = c < C
            n2 = tl.zeros((BLOCK,), dtype=tl.float32)
            r2 = tl.zeros((BLOCK,), dtype=tl.float32)
            for t in range(0, T):
                n2 += tl.load(work + t * C + c, mask=mask, other=0.0)
                r2 += tl.load(r2_base + t * C + c, mask=mask, other=0.0)
            ratio_c = _ratio(n2, r2, DTYPE, INTERPRETER)
            g2 = tl.load(g2_base + c, mask=mask, other=0.0)
            if RULE == 1:
                g2 = tl.maximum(g2 - coef * r2, 0.0)  # >= 0 in exact arithmetic; rounding may cross it
            acc += tl.where(mask, ratio_c * ratio_c * g2, 0.0)
            tl.store(factor + c, ratio_c, mask=mask)
        norm2 = tl.sum(acc, axis=0)
    mult = 1.0
    if RULE == 2:  # apollo-torch multiplies by sqrt(scale): before the limiter (scale_front) or after
        mult = tl.sqrt(scale)
        if SCALE_FRONT:
            norm2 = norm2 * scale
    if LIMIT:
        norm_ptr = tl.load(row + _NORM).to(tl.pointer_type(DTYPE))
        norm = _rnd(tl.sqrt(norm2), DTYPE, INTERPRETER)
        previous = _rnd(tl.load(norm_ptr).to(tl.float32) + 1e-8, DTYPE, INTERPRETER)
        growth = _rnd(norm / previous, DTYPE, INTERPRETER)
        limiter = _rnd(tl.maximum(growth, GAMMA_) / GAMMA_, DTYPE, INTERPRETER)
        limiter = tl.where(tl.load(row + _HAS_PREV) != 0, limiter, 1.0)  # the first step only records
        tl.store(norm_ptr, round_to(norm / limiter, DTYPE, INTERPRETER))
        mult = mult / limiter
    if TENSORWISE:
        tl.store(factor, ratio * mult)
    else:
        for start in range(0, C, BLOCK):
            c = start + offs
            mask = c < C
            tl.store(factor + c, tl.load(factor + c, mask=mask, other=0.0) * mult, mask=mask)


def build(problems: list, device: torch.device, dtype: torch.dtype, *, rule: str, tensorwise: bool,
          limit: bool, scale_front: bool) -> KernelTable:
    """One program per problem. Each problem: ``work`` (the partials, see grouped_project_adam.work_shape:
    ``T``, ``C``), ``factor`` (fp32, C values or 1), ``limiter_norm`` (0-d, ``dtype``; with ``limit``) and
    ``has_previous`` (a Python bool: does the state hold a norm from an earlier step)."""
    rows = []
    for i, p in enumerate(problems):
        need = 1 if tensorwise else p["C"]
        if p["factor"].dtype != torch.float32 or p["factor"].numel() < need:
            raise ValueError(f"problem {i}: the factor buffer must be fp32 with {need} values")
        norm = p.get("limiter_norm")
        if limit and (norm is None or norm.dim() != 0 or norm.dtype != dtype):
            raise ValueError(f"problem {i}: the limiter needs a 0-d {dtype} limiter_norm tensor")
        rows.append([p["work"].data_ptr(), p["C"], p["T"], p["factor"].data_ptr(),
                     norm.data_ptr() if limit else 0, int(bool(p.get("has_previous"))), 0, 0])
    meta = dict(DTYPE=TL_DTYPE[dtype], RULE=RULES[rule], TENSORWISE=tensorwise, LIMIT=limit,
                SCALE_FRONT=scale_front, GAMMA_=GAMMA, BLOCK=BLOCK_C, num_warps=4)
    return KernelTable.build(rows, [1] * len(rows), [p["C"] * p["T"] for p in problems], device, meta)


def set_has_previous(table: KernelTable, flags: list) -> None:
    """Rewrite the has-a-previous-norm flags (problem order) without blocking the host."""
    table.rewrite({(slot, _HAS_PREV.value): int(bool(flags[p])) for slot, p in enumerate(table.order)})


def launch(table: KernelTable, scalars: torch.Tensor) -> None:
    if table.num_tiles == 0:
        return
    with _launch.on_device(table.table.device):
        _grouped_rule_scales_kernel[(table.num_tiles,)](
            table.table, table.tile_problem, scalars,
            INTERPRETER=_launch.interpreted(_grouped_rule_scales_kernel), **table.meta)
