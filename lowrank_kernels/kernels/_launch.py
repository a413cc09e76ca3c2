"""Launch-time choices shared by the kernel launchers: tile configs, dot precision, input checks.

No kernel lives here; each kernel file owns its kernel and launcher and takes its settings from these
helpers so the two GEMMs follow one rule for dtypes and tiles.
"""
from __future__ import annotations

import contextlib

import torch
from triton.runtime.jit import JITFunction

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreted(kernel) -> bool:
    """Does ``kernel`` run under the interpreter? Asked of the kernel, not of TRITON_INTERPRET: triton.jit
    decides when the kernel is defined, and the variable may have changed since.

    The kernels take this as their INTERPRETER constexpr and then work around two interpreter defects
    (triton 3.9): tl.dot on bf16 operands returns garbage (it multiplies bf16's raw 16-bit storage;
    relative error ~1e9), so dot operands are cast to fp32 first, exactly; and fp32 -> bf16 casts
    truncate, so values are rounded to nearest first (_device.round_to). fp16 and fp32 are right there.
    """
    return not isinstance(kernel, JITFunction)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots honour torch's fp32 matmul setting, so the kernels round as the reference's matmuls do.

    torch's default ("highest") keeps fp32 matmuls exact; "high"/"medium" let them use TF32, and so do
    ours. The precision is ignored for 16-bit operands.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _pow2_at_least(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def block(extent: int, cap: int) -> int:
    """The tile edge for a dimension: the next power of two, between 16 (tl.dot's minimum) and cap."""
    return max(16, min(cap, _pow2_at_least(extent)))


def gemm_config(I: int, J: int, K: int, dtype: torch.dtype, device: torch.device,
                extents: list | None = None, sms: int | None = None) -> dict:
    """Fixed tile config for an I x J output with reduction length K (no autotuning: the kernels update
    their outputs in place, so a timing sweep would apply the step several times).

    A grouped launch passes its largest I, J, K and, as ``extents``, every problem's (I, J): the grid that
    must cover the SMs is then all problems' tiles together.

    Tiles are 128 x 128 (64 x 64 for fp32, whose operands take twice the shared memory) and shrink to fit
    small dimensions; on a GPU the wider edge halves (down to 32) until the grid covers the SMs, because
    the reduction is never split (the epilogues are nonlinear) and idle SMs are the only other waste.
    """
    cap = 64 if dtype == torch.float32 else 128
    bi, bj = block(I, cap), block(J, cap)
    if sms is None and device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    if sms:  # (``sms`` given: the config a GPU with that many SMs would get, for compile-only tools)
        extents = extents or [(I, J)]
        while sum(-(-i // bi) * -(-j // bj) for i, j in extents) < sms and max(bi, bj) > 32:
            if bi >= bj:
                bi //= 2
            else:
                bj //= 2
    bk = block(K, 32 if dtype == torch.float32 else 64)
    return dict(BLOCK_I=bi, BLOCK_J=bj, BLOCK_K=bk, GROUP_I=8,
                num_warps=8 if bi * bj >= 128 * 64 else 4, num_stages=3)


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device for the launch."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_devices(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_operands(**tensors: torch.Tensor) -> None:
    """Every operand on one device and in a kernel dtype."""
    check_devices(**tensors)
    for name, t in tensors.items():
        check_float(name, t)


def one_sided_basis(kernel: str, P, Q, dtype_from: str, **operands: torch.Tensor) -> torch.Tensor:
    """The checks both GEMM launchers share; returns the basis (exactly one of P, left, or Q, right).

    All operands and the basis on one device, in a kernel dtype and 2-D; the basis in the dtype of the
    operand named ``dtype_from`` (the other factor of the dot, which must share its dtype).
    """
    if (P is None) == (Q is None):
        raise ValueError(f"{kernel} projects one side: pass exactly one of P (left) or Q (right)")
    basis = P if P is not None else Q
    operands = {**operands, "basis": basis}
    check_operands(**operands)
    not_2d = {name: tuple(t.shape) for name, t in operands.items() if t.dim() != 2}
    if not_2d:
        raise ValueError(f"{kernel}: operands must be 2-D, got shapes {not_2d}")
    other = operands[dtype_from]
    if basis.dtype != other.dtype:
        raise TypeError(f"basis dtype {basis.dtype} differs from {dtype_from}'s {other.dtype}")
    return basis
