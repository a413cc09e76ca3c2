"""Is the optimizer configured alike on every rank? A hash each rank computes for the same comparison.

Ranks whose optimizers differ (a rank, a gap, a checkpoint loaded on some ranks only) would issue
collectives of different sizes or in a different order: gloo answers by aborting the process, NCCL by
hanging. DDP's hook (ddp.py) and the FSDP2 path (fsdp.py) compare this hash across ranks first, so that
every rank raises a clear error instead.
"""
from __future__ import annotations

import hashlib

import torch

__all__ = ["plain", "fingerprint", "OPTIONS_EXCLUDED"]

OPTIONS_EXCLUDED = ("params",)


def plain(value):
    """``value`` as the same text on every rank: tensors by their numbers (not their device), sequences
    element by element, other objects than numbers and strings by their type (a default repr holds a
    per-process address)."""
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else type(value).__name__


def fingerprint(obj, bits: int = 62) -> int:
    """A ``bits``-bit hash of ``plain(obj)``'s text (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(repr(plain(obj)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - bits)


def options(group: dict) -> list:
    """A param group's options (everything but its parameters), in a fixed order."""
    return sorted((k, plain(v)) for k, v in group.items() if k not in OPTIONS_EXCLUDED)


STATE_KEYS = ("step", "refreshes", "rank")  # what decides a parameter's next collectives
