"""Which implementation runs a parameter's step.

Every backend exposes the same function, ``galore_step`` with the signature of
:func:`lowrank_kernels.reference.galore_step`, so the optimizer chooses per parameter and nothing else
changes:

* ``"auto"`` (the default): the Triton kernels for CUDA tensors of the kernels' dtypes (fp32, bf16,
  fp16) when triton imports, the reference otherwise (CPU tensors, fp64, no triton).
* ``"torch"``: the reference (plain PyTorch), any device and dtype.
* ``"triton"``: the fused Triton kernels. CUDA tensors of the kernels' dtypes, or CPU tensors under
  ``TRITON_INTERPRET=1`` (the interpreter, for tests); anything else raises.

The optimizer asks :func:`step_function` while it plans a step, before anything changes, so a backend
that cannot run a parameter raises before any parameter is updated.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable

import torch

from . import reference

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(True, "ok") when the Triton kernels import; else (False, why)."""
    try:
        importlib.import_module(f"{__package__}.kernels")
    except ImportError as exc:
        return False, f"triton kernels unavailable: {exc}"
    return True, "ok"


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def step_function(backend: str, tensor: torch.Tensor, *others: torch.Tensor) -> Callable:
    """The ``galore_step`` for a parameter living where ``tensor`` lives (``others``: its gradient etc.,
    whose dtypes the kernels must also take). Raises if ``backend`` cannot run them."""
    tensors = (tensor, *others)
    if backend == "torch":
        return reference.galore_step
    if backend == "auto":
        if tensor.is_cuda and all(t.is_cuda and t.dtype in KERNEL_DTYPES for t in tensors) and triton_status()[0]:
            from .kernels import galore_step
            return galore_step
        return reference.galore_step
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"backend='triton': {why}")
        if not tensor.is_cuda and not (tensor.device.type == "cpu" and interpreter_on()):
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got a {tensor.device.type} tensor); CPU tensors run "
                "only under TRITON_INTERPRET=1, for testing. Use backend='auto' or 'torch' instead."
            )
        bad = sorted({str(t.dtype) for t in tensors if t.dtype not in KERNEL_DTYPES})
        if bad:
            raise TypeError(
                f"backend='triton' runs float32, bfloat16 and float16 tensors, got {', '.join(bad)}; "
                "use backend='auto' (the reference for other dtypes) or 'torch'"
            )
        from .kernels import galore_step
        return galore_step
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
