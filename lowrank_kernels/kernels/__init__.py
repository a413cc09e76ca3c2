"""Fused Triton kernels for the projected step, and ``galore_step``, the dispatcher the optimizer calls.

* :mod:`.project_adam`       kernel (a): R = P^T G or G Q, Adam moments in the epilogue, writes N
* :mod:`.backproject_update` kernel (b): W <- W - a (P N or N Q^T), decoupled decay in the epilogue
* :mod:`.adamw`              the unprojected (plain AdamW) step as one elementwise kernel

``galore_step`` has exactly :func:`lowrank_kernels.reference.galore_step`'s signature and picks the
orientation from which basis is given. Importing this package imports triton; backends.py reports
an ImportError here as "triton unavailable".
"""
from __future__ import annotations

from typing import Optional

import torch

from .adamw import adamw_update
from .backproject_update import backproject_update as _backproject_update
from .project_adam import project_adam as _project_adam

__all__ = ["galore_step"]


@torch.no_grad()
def galore_step(param: torch.Tensor, grad: torch.Tensor, P: Optional[torch.Tensor], Q: Optional[torch.Tensor],
                exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, beta1: float, beta2: float, eps: float,
                step_size: float, scale: float, lr: float, weight_decay: float) -> None:
    """One step in place on ``param``, ``exp_avg`` and ``exp_avg_sq``: the fused version of the reference."""
    update = dict(step_size=step_size, scale=scale, lr=lr, weight_decay=weight_decay)
    adam = dict(beta1=beta1, beta2=beta2, eps=eps)
    if P is None and Q is None:
        adamw_update(param, grad, exp_avg, exp_avg_sq, **adam, **update)
    elif P is None or Q is None:
        _backproject_update(param, _project_adam(grad, P, Q, exp_avg, exp_avg_sq, **adam), P, Q, **update)
    else:
        # full: the r x n and m x r intermediates are small, so plain matmuls make them; the association
        # R = (P^T G) Q and U = (P N) Q^T is the reference's, so the intermediates round as they do there.
        N = _project_adam(P.T @ grad, None, Q, exp_avg, exp_avg_sq, **adam)
        _backproject_update(param, P @ N, None, Q, **update)
