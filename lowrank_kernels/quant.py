"""8-bit blockwise moments (``state_dtype="int8"``), following bitsandbytes' 8-bit optimizers.

Layout (bitsandbytes ``optim/optimizer.py``, block size fixed at 256): each moment is stored as one uint8
code per entry plus one fp32 ``absmax`` per block of 256 consecutive entries (flattened row-major):
``exp_avg`` with the signed dynamic map, ``exp_avg_sq`` with the unsigned one, the scales under
``exp_avg_absmax`` / ``exp_avg_sq_absmax``. About 1.016 bytes per moment entry, tensors only, so
checkpoints load with ``torch.load(weights_only=True)``.

Quantisation of a block: ``absmax = max |x|``, ``y = x * (1 / absmax)`` clamped to [-1, 1], code = the
nearest map entry, found by bucketing ``y`` between the midpoints of consecutive entries (a value exactly
on a midpoint takes the lower code). That is bitsandbytes' device-independent reference kernel
(``backends/default/ops.py::quantize_blockwise``, "same assumption as CUDA kernel"); its CUDA kernels
round at the same midpoints, its CPU kernel (0.50) through a 65536-bin lookup table that cannot resolve
values closer than 2/65535 to a midpoint (tests/test_quant.py measures both). Two departures, both in
degenerate inputs: a short last block whose max |x| is below 1e-38 (all zeros, or subnormals) stores that
max (bitsandbytes' reference stores 1e-38; its codes are the same, as both scale by the clamped max), and no sign fix-up of the first moment (bitsandbytes' CUDA optimizer kernel moves a negative
value that rounds to the code 0.0 one code down; its CPU optimizer and ``quantize_blockwise`` do not).

The step runs in bitsandbytes' order (:func:`float_moments`): dequantise, update the moments and compute
the step in fp32, then requantise for storage; the step never sees the requantised moments.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import torch

__all__ = ["BLOCK", "QUANT_KEYS", "dynamic_map", "quantize", "dequantize", "zeros", "is_quantized",
           "float_moments", "moment_rule", "recast", "blocks"]

BLOCK = 256
SIGNED = {"exp_avg": True, "exp_avg_sq": False}  # the first moment has a sign, the second does not
QUANT_KEYS = ("exp_avg_absmax", "exp_avg_sq_absmax")


@lru_cache(maxsize=None)
def _map(signed: bool) -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``, value for value.

    Dynamic exponent 10^(-6+i) times the midpoints of a linear fraction grid in [0.1, 1], plus 0 and 1:
    256 sorted fp32 entries. Computed as bitsandbytes does (fp32 linspace and products), so
    the entries are bit-identical (tests/test_quant.py).
    """
    data = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()  # an fp32 product, as theirs
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@lru_cache(maxsize=None)
def _on(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    code = _map(signed).to(device)
    return code, (code[:-1] + code[1:]) / 2


def dynamic_map(signed: bool, device="cpu") -> torch.Tensor:
    """The 256-entry map (signed: the first moment's; unsigned: the second moment's)."""
    return _on(signed, torch.device(device))[0]


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def blocks(n: int) -> int:
    """How many absmax scales quantised moments of ``n`` entries keep (checkpoint validation)."""
    return _blocks(n)


def quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes of ``x``'s shape, fp32 absmax per block of 256 flattened entries)."""
    n = x.numel()
    if x.device.type == "meta":
        return (torch.empty(x.shape, dtype=torch.uint8, device="meta"),
                torch.empty(_blocks(n), dtype=torch.float32, device="meta"))
    code, bounds = _on(signed, x.device)
    flat = x.reshape(-1).float()
    pad = _blocks(n) * BLOCK - n
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)  # zeros never raise a block's max
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).reshape(-1)[:n]
    if pad:  # bitsandbytes' reference divides in a short last block (and multiplies elsewhere)
        full = n - (BLOCK - pad)
        scaled[full:] = flat[full:] / absmax[-1].clamp(min=1e-38)
    scaled = scaled.clamp_(-1, 1)
    codes = torch.bucketize(scaled, bounds).to(torch.uint8)
    return codes.view(x.shape), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 values of ``codes`` (any shape) with their per-block ``absmax``."""
    n = codes.numel()
    if codes.device.type == "meta":
        return torch.empty(codes.shape, dtype=torch.float32, device="meta")
    values = _on(signed, codes.device)[0][codes.reshape(-1).long()]
    values = torch.nn.functional.pad(values, (0, _blocks(n) * BLOCK - n)).view(-1, BLOCK) * absmax.unsqueeze(1)
    return values.reshape(-1)[:n].view(codes.shape)


def zeros(shape, device) -> dict:
    """A fresh pair of quantised zero moments (the state entries, keys as in the optimizer state)."""
    state = {}
    for key, signed in SIGNED.items():
        state[key], state[f"{key}_absmax"] = quantize(torch.zeros(shape, device=device), signed)
    return state


def is_quantized(state: dict) -> bool:
    return "exp_avg_absmax" in state


def recast(state: dict, dtype: torch.dtype) -> None:
    """Move a state's moments to ``dtype`` (``torch.uint8``: quantised), values kept: a ``state_dtype``
    edited into or out of "int8" dequantises or quantises them (a plain ``.to`` would read codes as
    values, or truncate values to codes)."""
    if is_quantized(state):
        for key, signed in SIGNED.items():
            state[key] = dequantize(state[key], state.pop(f"{key}_absmax"), signed)
    for key, signed in SIGNED.items():
        if dtype == torch.uint8:
            state[key], state[f"{key}_absmax"] = quantize(state[key], signed)
        else:
            state[key] = state[key].to(dtype)


@contextmanager
def float_moments(state: dict) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the moments as tensors a step updates in place.

    Quantised state: fp32 dequantised copies, requantised into the state when the block exits normally
    (an exception leaves the stored codes untouched). Otherwise the state's own tensors.
    """
    if not is_quantized(state):
        yield state["exp_avg"], state["exp_avg_sq"]
        return
    moments = {key: dequantize(state[key], state[f"{key}_absmax"], signed) for key, signed in SIGNED.items()}
    yield moments["exp_avg"], moments["exp_avg_sq"]
    for key, signed in SIGNED.items():
        state[key], state[f"{key}_absmax"] = quantize(moments[key], signed)


def moment_rule(rule, state: dict, *args) -> None:
    """Run a moments-at-a-switch rule (projection.MOMENT_RULES) on quantised moments.

    Dequantise, run the rule on fp32 moments, requantise what it replaced. A moment the rule leaves as it
    was (``keep`` at the same rank) keeps its stored codes: a dequantise-requantise round trip is not
    the identity (the block maximum's code need not be +-1), so it is not done for nothing.
    """
    if not is_quantized(state):
        rule(state, *args)
        return
    stored = {key: (state[key], state[f"{key}_absmax"]) for key in SIGNED}
    floats = {key: dequantize(*stored[key], signed) for key, signed in SIGNED.items()}
    state.update(floats)
    rule(state, *args)
    for key, signed in SIGNED.items():
        if state[key] is floats[key]:
            state[key] = stored[key][0]
        else:
            state[key], state[f"{key}_absmax"] = quantize(state[key], signed)
