"""The whole-model step's device step scalars in ONE launch (engine._DeviceScalars.advance, triton buckets).

Per problem i, as torch.optim's ``capturable=True`` keeps them: the step count ``steps[i] += 1`` (float64),
then column 0 of the fp32 scalar table, the step size ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)`` (lr without
bias correction), in float64 and rounded once. With torch ops the same takes about ten launches per step,
more than the grouped kernels of a one-dtype model themselves.

``beta^t`` is ``exp(t log beta)`` in float64: a relative error of ~1e-14 at t = 1e5, far below the fp32
rounding of the result (tests/test_engine_triton.py compares it with the torch-op path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

BLOCK = 256
HYPER_COLUMNS = tl.constexpr(5)  # engine._DeviceScalars.hyper: lr, beta1, beta2, bias correction (0/1), scale


@triton.jit
def _power(beta, t):
    """beta^t for 0 <= beta < 1, t >= 1 (beta = 0 gives 0, with no log of 0)."""
    return tl.where(beta > 0.0, tl.exp(t * tl.log(tl.maximum(beta, 1e-300))), 0.0)


@triton.jit
def _advance_step_scalars_kernel(steps_ptr, hyper_ptr, table_ptr, n, TABLE_STRIDE: tl.constexpr,
                                 BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(steps_ptr + offs, mask=mask, other=0.0) + 1.0
    tl.store(steps_ptr + offs, t, mask=mask)
    row = hyper_ptr + offs * HYPER_COLUMNS
    lr = tl.load(row, mask=mask, other=0.0)
    beta1 = tl.load(row + 1, mask=mask, other=0.5)
    beta2 = tl.load(row + 2, mask=mask, other=0.5)
    correct = tl.load(row + 3, mask=mask, other=0.0)
    corrected = lr * tl.sqrt(1.0 - _power(beta2, t)) / (1.0 - _power(beta1, t))
    step_size = tl.where(correct > 0, corrected, lr)
    tl.store(table_ptr + offs * TABLE_STRIDE, step_size.to(tl.float32), mask=mask)


def advance_step_scalars(steps: torch.Tensor, hyper: torch.Tensor, table: torch.Tensor) -> None:
    """``steps`` (n,) float64, ``hyper`` (n, 5) float64, ``table`` (n, C) float32 contiguous, one device:
    counts + 1 and step sizes into ``table[:, 0]``, in place; never synchronises."""
    n = steps.numel()
    if (steps.dtype != torch.float64 or hyper.dtype != torch.float64 or table.dtype != torch.float32
            or tuple(hyper.shape) != (n, HYPER_COLUMNS.value) or table.dim() != 2 or table.shape[0] != n
            or not (steps.is_contiguous() and hyper.is_contiguous() and table.is_contiguous())):
        raise ValueError("advance_step_scalars: steps (n,) float64, hyper (n, 5) float64 and table (n, C) "
                         "float32, all contiguous")
    if n == 0:
        return
    with _launch.on_device(steps.device):
        _advance_step_scalars_kernel[(triton.cdiv(n, BLOCK),)](steps, hyper, table, n,
                                                              TABLE_STRIDE=table.shape[1], BLOCK=BLOCK)
