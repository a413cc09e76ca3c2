"""8-bit blockwise Adam moments (``state_dtype="int8"``) for many problems in ONE launch.

The math of :mod:`lowrank_kernels.quant` (bitsandbytes' rules, block 256) on the device, in bitsandbytes'
order: per 256-entry block of a moment flattened row-major, dequantise M (signed map) and V (unsigned map)
with their absmax, update them in fp32 from the input (_device.adam_moments, the one copy of Adam's
formula), compute N = M / (sqrt(V) + eps) from these UNREQUANTISED moments, then requantise: absmax = the
block's max |x| (0 for an all-zero block), y = x * (1 / absmax) (a short last block divides, as
quant.quantize does), clamped to [-1, 1], code = the number of map midpoints strictly below y (a value on
a midpoint takes the lower code: torch.bucketize), found by an 8-step binary search in a device table.
Reciprocal and division are correctly rounded (div_rn), so the codes equal quant.quantize's, and so
bitsandbytes', on the same fp32 moments; and adam_moments rounds as torch does, so those moments are the
reference's bit for bit.

Blocks are independent of any GEMM tile: a grouped launch walks every problem's moments flat, BLOCKS
quantisation blocks per program, an int32 map sending each program to its problem's int64 row (_tables).

Two modes (one per table):

* ``"projected"``: input R (the low-rank projected gradient, r x n or m x r, in the gradient dtype: the
  projection kernel's ADAM=False output), output N in R's dtype for the back-projection kernel.
  Problem: ``dict(R=, N=, exp_avg=, exp_avg_sq=, exp_avg_absmax=, exp_avg_sq_absmax=)``.
* ``"unprojected"``: the whole AdamW step of a tensor kept unprojected: input G, N rounded to G's dtype,
  then W <- W - step_size * scale * N and the decoupled decay (_device.decoupled_update), exactly
  multi_tensor_adamw's update. Problem: ``dict(param=, grad=, exp_avg=, exp_avg_sq=, exp_avg_absmax=,
  exp_avg_sq_absmax=)``.

Either may carry ``beta1=, beta2=, eps=`` (Python floats, every problem or none). Codes are uint8 tensors of
the input's shape, absmax fp32 of length ceil(numel / 256) (quant.quantize's layout); every tensor must be
contiguous (the codes' blocks run over the row-major flattening), and one dtype per key.

API (kernels/grouped.py's conventions)::

    tables = build_int8_tables(problems, "projected")   # may synchronise (host -> device copies)
    int8_adam_step(tables, beta1=.9, beta2=.999, eps=1e-8)   # projected: no scalars
    int8_adam_step(tables, scalars, grads=[...])        # unprojected; never synchronises

``tables.matches(problems)`` says whether the tables still name the problems' tensors (rebuild if not: a
state reallocated by a load or a rank change); ``scalars`` is grouped.py's (P, 4) fp32 device tensor
[step_size, scale, lr * weight_decay]. On a GPU, N's sqrt and division are _device.adam_moments' (the
compiled fast ones, as in every fused kernel), so N may differ from the reference's by an ulp there; the
codes do not depend on N.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import quant
from . import _launch
from ._device import adam_moments, decoupled_update, round_to
from ._grouped_device import problem_row, row_pointer
from ._tables import SCALAR_STRIDE, TL_DTYPE, KernelTable, check_problems, check_scalars, common_dtype, problem_hyper, \
    tensor_signature
from .grouped import GroupedTables

__all__ = ["MODES", "build_int8_tables", "int8_adam_step", "int8_signature", "launch"]

QBLOCK = tl.constexpr(quant.BLOCK)
MODES = ("projected", "unprojected")
STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")
KEYS = {"projected": ("R", "N") + STATE_KEYS, "unprojected": ("param", "grad") + STATE_KEYS}
BLOCKS_PER_PROGRAM = 4  # quantisation blocks per program (1024 entries, multi_tensor_adamw's BLOCK)

# Row layout (int64): input (R or G), output (N or W), M codes, V codes, M absmax, V absmax; numel; the
# problem's index (into the per-problem fp32 tables) and its first program.
COLS = tl.constexpr(9)
_X, _Y, _MC, _VC, _MA, _VA = (tl.constexpr(i) for i in range(6))
_NUMEL, _INDEX, _FIRST = tl.constexpr(6), tl.constexpr(7), tl.constexpr(8)


@triton.jit
def dequantize(codes, absmax, map_ptr):
    return tl.load(map_ptr + codes.to(tl.int32)) * absmax


@triton.jit
def requantize(x, full, bounds_ptr):
    """(codes, absmax) of x (BLOCKS x 256 fp32, zero where masked) per row, as quant.quantize."""
    absmax = tl.max(tl.abs(x), axis=1)
    safe = tl.maximum(absmax, 1e-38)[:, None]  # quant.quantize's clamp; an all-zero row gives y = 0
    y = tl.where(full[:, None], x * tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe),
                 tl.math.div_rn(x, safe))
    y = tl.minimum(tl.maximum(tl.where(absmax[:, None] > 0, y, 0.0), -1.0), 1.0)
    # code = #{midpoints < y}: binary lifting over the 255 sorted midpoints. Before the step s the index
    # is a multiple of 2s, at most 256 - 2s, so every probe (index + s - 1) is at most 254.
    code = tl.zeros(y.shape, dtype=tl.int32)
    for i in tl.static_range(8):
        below = tl.load(bounds_ptr + code + ((128 >> i) - 1)) < y
        code = tl.where(below, code + (128 >> i), code)
    return code.to(tl.uint8), absmax


@triton.jit
def _grouped_int8_adam_kernel(
    table_ptr, tile_problem_ptr, hyper_ptr, scalars_ptr, maps_ptr,
    X_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr, PROJECTED: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCKS: tl.constexpr, INTERPRETER: tl.constexpr,
):
    row = problem_row(table_ptr, tile_problem_ptr, COLS)
    x_ptr = row_pointer(row, _X, X_DTYPE, ALIGNED)
    y_ptr = row_pointer(row, _Y, Y_DTYPE, ALIGNED)
    mc_ptr = row_pointer(row, _MC, tl.uint8, ALIGNED)
    vc_ptr = row_pointer(row, _VC, tl.uint8, ALIGNED)
    ma_ptr = row_pointer(row, _MA, tl.float32, False)  # absmax: one fp32 per block, any 4-byte address
    va_ptr = row_pointer(row, _VA, tl.float32, False)
    numel = tl.load(row + _NUMEL)
    index = tl.load(row + _INDEX)
    hyper = hyper_ptr + index * 5  # [beta1, 1 - beta1, beta2, 1 - beta2, eps]

    # int64 offsets: an embedding can have more than 2^31 entries.
    blocks = (tl.program_id(0) - tl.load(row + _FIRST)).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    offs = blocks[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    mask = offs < numel
    has_block = blocks * QBLOCK < numel
    full = (blocks + 1) * QBLOCK <= numel

    # maps: [signed map | unsigned map | signed midpoints | unsigned midpoints], 256 fp32 each
    # Padding lanes are zeros (quant.quantize pads so: they must not reach a block's absmax).
    m_absmax = tl.load(ma_ptr + blocks, mask=has_block, other=0.0)[:, None]
    v_absmax = tl.load(va_ptr + blocks, mask=has_block, other=0.0)[:, None]
    m = tl.where(mask, dequantize(tl.load(mc_ptr + offs, mask=mask, other=0), m_absmax, maps_ptr), 0.0)
    v = tl.where(mask, dequantize(tl.load(vc_ptr + offs, mask=mask, other=0), v_absmax, maps_ptr + QBLOCK), 0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m, v, n = adam_moments(x, m, v, tl.load(hyper), tl.load(hyper + 1), tl.load(hyper + 2), tl.load(hyper + 3),
                           tl.load(hyper + 4), tl.float32, tl.float32, INTERPRETER)
    m_codes, m_absmax = requantize(m, full, maps_ptr + 2 * QBLOCK)
    v_codes, v_absmax = requantize(v, full, maps_ptr + 3 * QBLOCK)
    tl.store(mc_ptr + offs, m_codes, mask=mask)
    tl.store(vc_ptr + offs, v_codes, mask=mask)
    tl.store(ma_ptr + blocks, m_absmax, mask=has_block)
    tl.store(va_ptr + blocks, v_absmax, mask=has_block)

    if PROJECTED:
        tl.store(y_ptr + offs, round_to(n, Y_DTYPE, INTERPRETER), mask=mask)
    else:
        # multi_tensor_adamw's update: N rounded to the gradient's dtype, then the decoupled step.
        scalars = scalars_ptr + index * SCALAR_STRIDE  # [step_size, scale, lr * weight_decay, residual_lr]
        n = round_to(n, X_DTYPE, INTERPRETER).to(tl.float32)
        w = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = decoupled_update(w, n, tl.load(scalars) * tl.load(scalars + 1), -tl.load(scalars + 2), True)
        tl.store(y_ptr + offs, round_to(w, Y_DTYPE, INTERPRETER), mask=mask)


@functools.lru_cache(maxsize=None)
def _maps(device: torch.device) -> torch.Tensor:
    """(4, 256) fp32 on ``device``: quant's signed and unsigned maps and their midpoints (255, padded)."""
    rows = []
    for signed in (True, False):
        rows.append(quant.dynamic_map(signed))
    for signed in (True, False):
        rows.append(torch.nn.functional.pad(quant._on(signed, torch.device("cpu"))[1], (0, 1)))
    return torch.stack(rows).to(device).contiguous()


def _io(mode: str) -> tuple:
    return ("R", "N") if mode == "projected" else ("grad", "param")


def int8_signature(problems: list, mode: str) -> tuple:
    """What the tables depend on besides gradients: every tensor's address, shape, strides and dtype."""
    return tuple(tensor_signature(p[k]) for p in problems for k in KEYS[mode] if k != "grad")


class Int8Tables(GroupedTables):
    """grouped.GroupedTables for the int8 kernel (kind "int8-projected" / "int8-unprojected")."""

    @property
    def mode(self) -> str:
        return self.kind.split("-", 1)[1]

    def matches(self, problems: list) -> bool:
        return int8_signature(problems, self.mode) == self.signature

    def update_grads(self, grads: list) -> bool:
        if self.mode != "unprojected":
            raise TypeError("projected int8 tables read R, a buffer they own; there are no gradients to update")
        sig = self.moved_grads(grads, contiguous=True)
        if sig is None:
            return False
        table = self.kernels["int8_adam"]
        table.rewrite({(slot, _X.value): grads[p].data_ptr() for slot, p in enumerate(table.order)})
        table.meta["ALIGNED"] = _aligned(self.problems, self.mode, grads)
        self.problems = [dict(p, grad=g) for p, g in zip(self.problems, grads)]
        self.grad_signature = sig
        return True

    def release_grads(self) -> None:
        if self.mode == "unprojected":
            super().release_grads()


def _aligned(problems: list, mode: str, grads=None) -> bool:
    grads = grads or [p[_io(mode)[0]] for p in problems]
    out = _io(mode)[1]
    return all(t.data_ptr() % 16 == 0 for p, g in zip(problems, grads)
               for t in (g, p[out], p["exp_avg"], p["exp_avg_sq"]))


def _check(problems: list, mode: str) -> None:
    x, y = _io(mode)
    for i, p in enumerate(problems):
        shape = tuple(p[x].shape)
        for k in (y, "exp_avg", "exp_avg_sq"):
            _launch.check_shape(f"problem {i}: {k}", p[k], shape)
        blocks = -(-p[x].numel() // quant.BLOCK)
        for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
            _launch.check_shape(f"problem {i}: {k}", p[k], (blocks,))
            if p[k].dtype != torch.float32:
                raise TypeError(f"problem {i}: {k} must be float32, got {p[k].dtype}")
        for k in ("exp_avg", "exp_avg_sq"):
            if p[k].dtype != torch.uint8:
                raise TypeError(f"problem {i}: {k} must hold uint8 codes, got {p[k].dtype}")
        not_dense = [k for k in KEYS[mode] if not p[k].is_contiguous()]
        if not_dense:
            raise ValueError(f"problem {i}: {not_dense} must be contiguous (the 256-entry blocks run over the "
                             f"row-major flattening); copy the gradient with .contiguous()")


def build_int8_tables(problems: list, mode: str, *, blocks_per_program: int = BLOCKS_PER_PROGRAM) -> Int8Tables:
    """Tables for one bucket (one mode, one dtype per key) of int8-moment problems; see the module
    docstring. Everything is checked before anything is built. ``blocks_per_program``: a power of two
    (the blocks a program steps; the results do not depend on it)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if blocks_per_program < 1 or blocks_per_program & (blocks_per_program - 1):
        raise ValueError(f"blocks_per_program must be a power of two, got {blocks_per_program}")
    keys = KEYS[mode]
    device = check_problems(problems, keys)
    x, y = _io(mode)
    dtypes = {k: common_dtype(problems, k) for k in (x, y)} if problems else {}
    _check(problems, mode)
    if mode == "projected" and problems and dtypes["N"] != dtypes["R"]:
        raise TypeError(f"N dtype {dtypes['N']} differs from R's {dtypes['R']}")
    hyper = problem_hyper(problems)
    kernels = {}
    if problems:
        blocks = blocks_per_program
        rows, tiles = [], []
        for p in problems:
            rows.append([p[k].data_ptr() for k in (x, y) + STATE_KEYS] + [p[x].numel(), 0, 0])
            tiles.append(triton.cdiv(triton.cdiv(p[x].numel(), quant.BLOCK), blocks))
        meta = dict(X_DTYPE=TL_DTYPE[dtypes[x]], Y_DTYPE=TL_DTYPE[dtypes[y]], PROJECTED=mode == "projected",
                    ALIGNED=_aligned(problems, mode), BLOCKS=blocks, num_warps=4)
        # equal work per block: keep the caller's order
        kernels["int8_adam"] = KernelTable.build(rows, tiles, [0] * len(rows), device, meta)
    grad_sig = tuple((p["grad"].data_ptr(), p["grad"].stride()) for p in problems) if mode == "unprojected" else ()
    return Int8Tables(f"int8-{mode}", None, device, len(problems), int8_signature(problems, mode), list(problems),
                      kernels, None if hyper is None else hyper.to(device), grad_sig)


def int8_adam_step(tables: Int8Tables, scalars: Optional[torch.Tensor] = None, *, beta1: Optional[float] = None,
                   beta2: Optional[float] = None, eps: Optional[float] = None,
                   grads: Optional[list] = None) -> None:
    """One step of every problem in one launch: codes and absmax updated in place, then N written
    (projected) or the weights updated (unprojected, with ``scalars``). Never synchronises the host."""
    if not isinstance(tables, Int8Tables):
        raise TypeError("int8_adam_step needs tables from build_int8_tables")
    if tables.mode == "unprojected":
        check_scalars(scalars, tables.num_problems, tables.device)
    elif scalars is not None:
        raise ValueError("projected int8 tables take no scalars (the back-projection kernel applies them)")
    hyper = tables.hyper_table(beta1, beta2, eps)
    if grads is not None:
        tables.update_grads(grads)
    if not tables.num_problems:
        return
    launch(tables.kernels["int8_adam"], hyper, scalars)


def launch(table: KernelTable, hyper: torch.Tensor, scalars: Optional[torch.Tensor] = None) -> None:
    """One launch over every block of every problem (``scalars``: unprojected tables only); reads only
    device tables (no host synchronisation). grouped.grouped_projected_step calls it for int8 buckets,
    between the projection-only launch and the back-projection."""
    if table.num_tiles == 0:
        return
    device = table.table.device
    with _launch.on_device(device):
        _grouped_int8_adam_kernel[(table.num_tiles,)](
            table.table, table.tile_problem, hyper, hyper if scalars is None else scalars, _maps(device),
            INTERPRETER=_launch.interpreted(_grouped_int8_adam_kernel), **table.meta)
