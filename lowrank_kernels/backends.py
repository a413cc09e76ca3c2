"""Which implementation runs a parameter's step.

Every backend exposes the same function, ``galore_step`` with the signature of
:func:`lowrank_kernels.reference.galore_step`, so the optimizer chooses per parameter and nothing else
changes:

* ``"torch"``: the reference (plain PyTorch), any device.
* ``"triton"``: the fused Triton kernels. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
  (the interpreter, for tests); anything else raises.
* ``"auto"``: the Triton kernels for CUDA tensors of the kernels' dtypes (fp32, bf16, fp16) when triton
  imports, the reference otherwise (CPU tensors, fp64, no triton).
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from . import reference

BACKENDS = ("torch", "triton", "auto")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_status() -> tuple[bool, str]:
    """(True, "ok") when the Triton kernels import; else (False, why)."""
    try:
        from . import kernels  # noqa: F401
    except ImportError as exc:
        return False, f"triton kernels unavailable: {exc}"
    return True, "ok"


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def step_function(backend: str, tensor: torch.Tensor) -> Callable:
    """The ``galore_step`` to use for a parameter living where ``tensor`` lives."""
    if backend == "torch":
        return reference.galore_step
    if backend == "auto":
        if tensor.is_cuda and tensor.dtype in KERNEL_DTYPES and triton_status()[0]:
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
        from .kernels import galore_step
        return galore_step
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
