"""Host side of the grouped kernels: the per-problem device tables and the tile -> problem map.

A grouped launch steps many problems (one weight each) of arbitrary shapes. Each problem is one row of an
int64 table holding its tensors' addresses, sizes and strides; the grid is flat, one program per output
tile over every problem, and a small int32 map sends each program to its problem's row (one load, O(1);
a binary search over a prefix table would add a chain of dependent loads before every tile).

Why a flat grid rather than a persistent loop: the tile count is known on the host when the tables are
built, so the grid is fixed (a CUDA graph replays it), and the hardware block scheduler balances tiles of
unequal cost (problems of different K) dynamically, where a persistent loop would need its own balancing.
Rows are sorted by decreasing reduction length so the longest tiles start first (a shorter tail).

Building a table synchronises (a host-to-device copy); launching reads it and never does. Tables hold
addresses, so they must be rebuilt when a tensor they name is reallocated; ``signature`` is the cheap test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import triton.language as tl

from . import _launch

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
HYPER_COLUMNS = 5  # beta1, 1 - beta1, beta2, 1 - beta2, eps (fp32, by problem index)
SCALAR_COLUMNS = 4  # step_size, scale, lr * weight_decay, residual_lr (fp32, by problem index)
SCALAR_STRIDE = tl.constexpr(SCALAR_COLUMNS)  # the kernels' row stride in that table


def tensor_signature(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


@dataclass(frozen=True)
class Operand:
    """A 2-D operand as a kernel reads it: address, shape and strides (A = P^T is P, strides swapped)."""
    ptr: int
    shape: tuple
    strides: tuple

    @classmethod
    def of(cls, t: torch.Tensor, transposed: bool = False) -> "Operand":
        shape, strides = tuple(t.shape), tuple(t.stride())
        if transposed:
            shape, strides = shape[::-1], strides[::-1]
        return cls(t.data_ptr(), shape, strides)


def layout(ops: list) -> int:
    """The unit stride every operand shares: 1 if each has stride 1 along its second dimension, 2 along its
    first, 0 (generic) otherwise. A size-1 dimension's stride is never used, so it counts as unit."""
    if all(o.strides[1] == 1 or o.shape[1] <= 1 for o in ops):
        return 1
    if all(o.strides[0] == 1 or o.shape[0] <= 1 for o in ops):
        return 2
    return 0


def aligned(ops: list, unit: int) -> bool:
    """Every address 16-byte aligned and every stride the kernel loads (all but the unit one of layout
    ``unit``) a multiple of 8 elements: the kernels may then promise the compiler so (tl.multiple_of) and
    vectorise their loads. Odd shapes run unhinted."""
    loaded = [d for d in (0, 1) if d != 2 - unit]  # layout 1: dim 1 is the unit one; layout 2: dim 0
    return all(o.ptr % 16 == 0 and all(o.strides[d] % 8 == 0 for d in loaded) for o in ops)


def launch_layouts(operands: dict, also: Optional[list] = None) -> dict:
    """{name: [Operand per problem]} -> the launch's constexprs NAME_LAYOUT and ALIGNED. ``also``: tensors
    the kernel addresses with another operand's strides (a buffer of N's layout): their addresses must
    be 16-byte aligned too for ALIGNED."""
    meta = {f"{name}_LAYOUT": layout(ops) for name, ops in operands.items()}
    meta["ALIGNED"] = all(aligned(ops, meta[f"{name}_LAYOUT"]) for name, ops in operands.items())
    meta["ALIGNED"] = meta["ALIGNED"] and all(t.data_ptr() % 16 == 0 for t in also or ())
    return meta


def dims_multiple_of_8(dims: list) -> int:
    """The launch's DIMS8 from every problem's (I, J, K): bit 1, 2, 4 set where that dimension is a multiple
    of 8 in all of them. The kernels' bounds masks then stay vectorisable, which their K loops need to be
    pipelined (_grouped_device.row_dims); a problem with an odd dimension costs the launch only that hint."""
    return sum(bit for axis, bit in enumerate((1, 2, 4)) if all(d[axis] % 8 == 0 for d in dims))


def hyper_rows(values: list) -> torch.Tensor:
    """(P, 5) fp32 rows [beta1, 1 - beta1, beta2, 1 - beta2, eps] from (beta1, beta2, eps) triples. 1 - beta
    is computed in double and rounded once, as the per-parameter launchers pass it."""
    return torch.tensor([[b1, 1.0 - b1, b2, 1.0 - b2, eps] for b1, b2, eps in values], dtype=torch.float32)


def check_scalars(scalars, num_problems: int, device: torch.device) -> None:
    """The step scalars' metadata (no values are read: that would synchronise)."""
    if not isinstance(scalars, torch.Tensor):
        raise TypeError(f"scalars must be a device tensor, got {type(scalars).__name__}")
    if (scalars.dtype != torch.float32 or tuple(scalars.shape) != (num_problems, SCALAR_COLUMNS)
            or not scalars.is_contiguous() or (num_problems and scalars.device != device)):
        raise ValueError(f"scalars must be a contiguous float32 tensor of shape ({num_problems}, "
                         f"{SCALAR_COLUMNS}) on {device}; got {scalars.dtype} {tuple(scalars.shape)} "
                         f"on {scalars.device}{'' if scalars.is_contiguous() else ', non-contiguous'}")


@dataclass
class KernelTable:
    """One grouped launch: the rows (host copy and device copy), the tile map and the launch constants."""
    rows: torch.Tensor            # (P, COLS) int64, host
    table: torch.Tensor           # the same, on the device
    tile_problem: torch.Tensor    # (tiles,) int32, on the device: program id -> row
    num_tiles: int
    order: list                   # order[slot] = the problem index in that row
    meta: dict = field(default_factory=dict)  # constexprs and launch options

    @classmethod
    def build(cls, rows: list, tiles: list, work: list, device: torch.device, meta: dict) -> "KernelTable":
        """``rows[p]`` is problem p's row with its index and first-tile columns still to fill (the last two);
        ``tiles[p]`` its tile count; ``work[p]`` its per-tile cost, for the order."""
        order = sorted(range(len(rows)), key=lambda p: -work[p])
        host, first, tile_rows = [], 0, []
        for slot, p in enumerate(order):
            host.append(list(rows[p][:-2]) + [p, first])
            tile_rows.append(torch.full((tiles[p],), slot, dtype=torch.int32))
            first += tiles[p]
        host = torch.tensor(host, dtype=torch.int64).reshape(len(rows), -1)
        tile_problem = torch.cat(tile_rows) if tile_rows else torch.zeros(0, dtype=torch.int32)
        return cls(host, host.to(device), tile_problem.to(device), first, order, meta)

    def rewrite(self, columns: dict) -> None:
        """Replace columns of some rows ({(slot, column): value}) and refresh the device copy without
        blocking the host: a fresh pinned buffer per refresh (the caching host allocator keeps it until the
        copy is done), so a refresh never overwrites a buffer a pending copy still reads."""
        for (slot, col), value in columns.items():
            self.rows[slot, col] = value
        if self.table.device.type == "cuda":
            self.table.copy_(self.rows.pin_memory(), non_blocking=True)
        else:
            self.table.copy_(self.rows)


def common_dtype(problems: list, key: str) -> torch.dtype:
    dtypes = {p[key].dtype for p in problems}
    if len(dtypes) > 1:
        raise TypeError(f"every problem's {key} must share one dtype in a grouped launch; got "
                        f"{sorted(map(str, dtypes))} (bucket the problems by dtype)")
    dtype = dtypes.pop()
    _launch.check_float(key, problems[0][key])
    return dtype


def check_problems(problems: list, keys: tuple) -> torch.device:
    """Every problem a dict with tensors under ``keys``, all on one device; returns it."""
    if not isinstance(problems, (list, tuple)):
        raise TypeError(f"problems must be a list of dicts, got {type(problems).__name__}")
    device = None
    for i, prob in enumerate(problems):
        missing = [k for k in keys if not isinstance(prob.get(k), torch.Tensor)]
        if missing:
            raise ValueError(f"problem {i} lacks tensor(s) {missing}; each needs {list(keys)}")
        for k in keys:
            if device is None:
                device = prob[k].device
            elif prob[k].device != device:
                raise ValueError(f"all tensors must be on one device; problem {i}'s {k} is on "
                                 f"{prob[k].device}, not {device}")
    return device if device is not None else torch.device("cpu")


def problem_hyper(problems: list):
    """The per-problem (beta1, beta2, eps) table if the problems carry them (all or none), else None."""
    keys = ("beta1", "beta2", "eps")
    has = [all(k in p for k in keys) for p in problems]
    partial = [i for i, p in enumerate(problems) if any(k in p for k in keys) and not has[i]]
    if partial or (any(has) and not all(has)):
        raise ValueError("beta1, beta2 and eps must be given for every problem or for none "
                         f"(problems {partial or [i for i, h in enumerate(has) if not h]} differ)")
    if not problems or not all(has):
        return None
    for i, p in enumerate(problems):
        if not all(isinstance(p[k], (int, float)) for k in keys):
            raise TypeError(f"problem {i}: beta1, beta2 and eps must be Python numbers")
    return hyper_rows([(p["beta1"], p["beta2"], p["eps"]) for p in problems])
