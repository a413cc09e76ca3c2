"""Training memory, measured from optimizer objects: state bytes, gradient bytes, state without an SVD.

* :func:`state_bytes` sums every tensor an optimizer holds in ``optimizer.state`` (any optimizer;
  galore-torch's basis inside its projector object included).
* :func:`init_state` gives a :class:`~lowrank_kernels.GaLoreAdamW` on ``meta`` parameters the state its
  first step would create (same keys, shapes, dtypes), with no gradient values and no arithmetic, so a
  7B model's optimizer is measured on any machine. tests/test_memory.py checks it against a real step
  and against the analytic count.
* :func:`gradient_bytes`: full-size gradients of all parameters, or with layer-wise updates
  (lowrank_kernels.layerwise) the largest single one, since each gradient is freed right after its step.
"""
from __future__ import annotations

from typing import Iterable

import torch


__all__ = ["state_bytes", "init_state", "gradient_bytes", "tensor_bytes"]


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _walk_bytes(obj, seen: set) -> int:
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:  # a tensor reachable twice is stored once
            return 0
        seen.add(id(obj))
        return tensor_bytes(obj)
    if isinstance(obj, dict):
        return sum(_walk_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_walk_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        # galore-torch keeps its basis (ortho_matrix) in a GaLoreProjector object inside the state.
        return sum(_walk_bytes(v, seen) for v in vars(obj).values())
    return 0


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in ``optimizer.state`` (moments, bases, step tensors)."""
    seen: set = set()
    return sum(_walk_bytes(state, seen) for state in optimizer.state.values())


def gradient_bytes(params: Iterable[torch.Tensor], layerwise: bool = False) -> int:
    """Full-size gradient memory of ``params`` (in the parameters' dtype); ``layerwise``: the largest one."""
    sizes = [tensor_bytes(p) for p in params if p.requires_grad]
    return (max(sizes) if layerwise else sum(sizes)) if sizes else 0


def init_state(optimizer) -> None:
    """Give a GaLoreAdamW on ``meta`` parameters the state its first step creates, without arithmetic.

    It is the optimizer's own first step, run on meta gradients: every op (the SVD included) only computes
    shapes and dtypes, so the state has exactly the keys, shapes and dtypes a real step would create.
    tests/test_memory.py compares the result with a real step.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for group in optimizer.param_groups:
        if "rank" in group and group.get("rank_policy", "fixed") != "fixed":
            raise ValueError("init_state needs rank_policy='fixed': another policy picks the rank from the "
                             "gradient's values; measure a real step instead")
    for p in params:
        if p.device.type != "meta":
            raise ValueError(f"init_state measures parameters on the meta device; got one on {p.device}")
        p.grad = torch.empty_like(p)
    try:
        optimizer.step()
    finally:
        for p in params:
            p.grad = None
