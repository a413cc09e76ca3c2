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

from . import projection
from .projection import MOMENT_KEYS, STATE_DTYPES, lowrank_shape, matrix_shape, orientation

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

    The basis entries come from the optimizer's own refresh (``projection.refresh``) run on a meta
    gradient: an SVD of a meta tensor only computes shapes. The moments are created as
    ``GaLoreAdamW._step_param`` creates them: ``state_dtype`` or the gradient's dtype (the parameter's),
    at the low-rank shape. tests/test_memory.py compares the result with a real step.
    """
    index = 0  # the parameter's position over all groups, as the optimizer numbers it (rsvd seeds)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.device.type != "meta":
                raise ValueError(f"init_state measures parameters on the meta device; got one on {p.device}")
            state = {"step": 0}
            shape = p.shape
            if "rank" in group:
                if group.get("rank_policy", "fixed") != "fixed":
                    raise ValueError("init_state needs rank_policy='fixed': another policy picks the rank "
                                     "from the gradient's values; measure a real step instead")
                m, n = matrix_shape(p.shape)
                side = orientation(group["proj_type"], m, n)
                grad = torch.empty((m, n), dtype=p.dtype, device="meta")
                projection.refresh(state, grad, group, side, group["seed"], index)
                shape = lowrank_shape(side, m, n, state["rank"])
            dtype = STATE_DTYPES[group.get("state_dtype")] or p.dtype
            for key in MOMENT_KEYS:
                state[key] = torch.zeros(shape, dtype=dtype, device="meta")
            state["step"] = 1
            optimizer.state[p] = state
            index += 1
