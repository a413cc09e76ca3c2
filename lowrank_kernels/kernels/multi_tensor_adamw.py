"""The unprojected AdamW step for many tensors of any shapes in ONE launch (a multi-tensor apply).

Per element, the math of adamw.py (the same device helper, _device.adamw_elements): galore-torch's AdamW
with the bias correction folded into the step size, eps added to the uncorrected sqrt(v), decay after the
update. Each tensor is walked flat in BLOCK-element blocks; an int32 map sends each program to its tensor's
int64 row (addresses, numel, first block, problem index). beta1, beta2, eps come from a per-problem fp32
table, step_size, scale and lr * wd from the caller's (P, 3) fp32 device tensor.

Flat walking needs param, grad and moments to share one dense layout (contiguous, or e.g. all
channels_last); the tables refuse anything else, so the caller copies such a gradient first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._device import adamw_elements
from ._grouped_device import problem_row, row_pointer
from ._tables import SCALAR_STRIDE, TL_DTYPE, KernelTable

BLOCK = 1024
# Row layout (int64): W, G, M, V addresses; numel; the problem's index and its first block.
COLS = tl.constexpr(7)
_W, _G, _M, _V, _NUMEL = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3), tl.constexpr(4)
_INDEX, _FIRST = tl.constexpr(5), tl.constexpr(6)


@triton.jit
def _multi_tensor_adamw_kernel(
    table_ptr, tile_problem_ptr, hyper_ptr, scalars_ptr,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, INTERPRETER: tl.constexpr,
):
    row = problem_row(table_ptr, tile_problem_ptr, COLS)
    w_ptr = row_pointer(row, _W, W_DTYPE, ALIGNED)
    g_ptr = row_pointer(row, _G, G_DTYPE, ALIGNED)
    m_ptr = row_pointer(row, _M, M_DTYPE, ALIGNED)
    v_ptr = row_pointer(row, _V, V_DTYPE, ALIGNED)
    index = tl.load(row + _INDEX)
    hyper = hyper_ptr + index * 5  # [beta1, 1 - beta1, beta2, 1 - beta2, eps]
    scalars = scalars_ptr + index * SCALAR_STRIDE  # [step_size, scale, lr * weight_decay, ...]
    # int64 offsets: an embedding can have more than 2^31 elements.
    offs = (tl.program_id(0) - tl.load(row + _FIRST)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    adamw_elements(w_ptr + offs, g_ptr + offs, m_ptr + offs, v_ptr + offs, offs < tl.load(row + _NUMEL),
                   tl.load(hyper), tl.load(hyper + 1), tl.load(hyper + 2), tl.load(hyper + 3), tl.load(hyper + 4),
                   tl.load(scalars) * tl.load(scalars + 1), -tl.load(scalars + 2), True, INTERPRETER)


def dense_layout(t: torch.Tensor) -> bool:
    """Does ``t`` cover its storage span densely (contiguous in some dimension order)? Then its elements
    can be walked flat from its address."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return True


def check_layout(i: int, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor) -> None:
    tensors = dict(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"problem {i}: {name} has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
    if not dense_layout(param) or any(t.stride() != param.stride() for t in tensors.values()):
        strides = {name: t.stride() for name, t in tensors.items()}
        raise ValueError(f"problem {i}: the multi-tensor AdamW walks tensors flat, so param, grad and moments "
                         f"must share one dense layout; got strides {strides} (copy the gradient with "
                         f"grad.contiguous(memory_format=...) or step this parameter on its own)")


def build(problems: list, device: torch.device, dtypes: dict) -> KernelTable:
    """The launch's table from validated problems (param, grad, exp_avg, exp_avg_sq each)."""
    rows, tiles = [], []
    for p in problems:
        rows.append([p[k].data_ptr() for k in ("param", "grad", "exp_avg", "exp_avg_sq")]
                    + [p["param"].numel(), 0, 0])
        tiles.append(triton.cdiv(p["param"].numel(), BLOCK))
    meta = dict(W_DTYPE=TL_DTYPE[dtypes["param"]], G_DTYPE=TL_DTYPE[dtypes["grad"]],
                M_DTYPE=TL_DTYPE[dtypes["exp_avg"]], V_DTYPE=TL_DTYPE[dtypes["exp_avg_sq"]],
                ALIGNED=aligned(problems), BLOCK=BLOCK, num_warps=4)
    # equal work per block: keep the caller's order
    return KernelTable.build(rows, tiles, [0] * len(rows), device, meta)


def aligned(problems: list, grads=None) -> bool:
    grads = grads or [p["grad"] for p in problems]
    return all(t.data_ptr() % 16 == 0 for p, g in zip(problems, grads)
               for t in (p["param"], g, p["exp_avg"], p["exp_avg_sq"]))


def refresh_grads(table: KernelTable, problems: list, grads: list) -> None:
    """Point the table at new gradients (same shapes, dtype and layout); never blocks the host."""
    for i, (p, g) in enumerate(zip(problems, grads)):
        check_layout(i, p["param"], g, p["exp_avg"], p["exp_avg_sq"])
    table.rewrite({(slot, _G.value): grads[p].data_ptr()
                   for slot, p in enumerate(table.order)})
    table.meta["ALIGNED"] = aligned(problems, grads)


def launch(table: KernelTable, hyper: torch.Tensor, scalars: torch.Tensor) -> None:
    """One launch over every block of every tensor; reads only device tables (no host synchronisation)."""
    if table.num_tiles == 0:
        return
    with _launch.on_device(table.table.device):
        _multi_tensor_adamw_kernel[(table.num_tiles,)](
            table.table, table.tile_problem, hyper, scalars,
            INTERPRETER=_launch.interpreted(_multi_tensor_adamw_kernel), **table.meta)
