"""The step math in plain PyTorch: the oracle every kernel is tested against, and the CPU fallback.

One projected step of a 2-D weight ``W`` (m x n) with gradient ``G``, following galore-torch's exact
order of operations (../shared/research/galore_reference.md):

1. project:      R = P^T G (left), R = G Q (right), R = P^T G Q (full); no basis: R = G (plain AdamW)
2. low-rank Adam: M <- b1 M + (1 - b1) R;  V <- b2 V + (1 - b2) R^2;  N = M / (sqrt(V) + eps), the
   last in fp32 from the moments as stored, rounded once to R's dtype
3. back-project:  U = scale * (P N | N Q^T | P N Q^T)
4. update:        W <- W - step_size * U, then W <- W - lr * wd * W (decay after the update)

``step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)``: bias correction is folded into the step size and eps
is added to the uncorrected sqrt(V), as galore-torch (HF's old AdamW) does.

P is m x r and Q is n x r; they may be views with any strides (galore keeps Q^T contiguous).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["adam_step_size", "project", "adam_normalize", "project_back", "apply_update", "galore_step"]


def adam_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """lr with both bias corrections folded in; ``step`` counts from 1."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def project(grad: torch.Tensor, P: Optional[torch.Tensor], Q: Optional[torch.Tensor]) -> torch.Tensor:
    R = grad
    if P is not None:
        R = P.T @ R
    if Q is not None:
        R = R @ Q
    return R


def adam_normalize(R, exp_avg, exp_avg_sq, beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """Update the moments in place; return N = M / (sqrt(V) + eps) in R's dtype."""
    exp_avg.mul_(beta1).add_(R, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)
    # The one eps rule of every backend: N from the moments as stored, computed in fp32 and rounded once
    # to R's dtype (the back-projection runs in the basis dtype, as galore-torch's does). In a 16-bit
    # dtype eps itself could round away (fp16 flushes eps < 6e-8 to 0, and then M / 0 = inf); for fp32
    # moments this is exactly galore-torch's M / (sqrt(V) + eps).
    return (exp_avg.float() / exp_avg_sq.float().sqrt().add_(eps)).to(R.dtype)


def project_back(N, P: Optional[torch.Tensor], Q: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    U = N
    if P is not None:
        U = P @ U
    if Q is not None:
        U = U @ Q.T
    # Projected updates are always scaled (galore-torch multiplies even by 1.0, which is exact); the
    # unprojected AdamW path skips a full-size multiply by 1.
    return U if (P is None and Q is None and scale == 1.0) else U * scale


def apply_update(param: torch.Tensor, update: torch.Tensor, step_size: float, lr: float,
                 weight_decay: float) -> None:
    param.add_(update, alpha=-step_size)
    if weight_decay > 0.0:
        param.add_(param, alpha=-lr * weight_decay)


@torch.no_grad()
def galore_step(param, grad, P, Q, exp_avg, exp_avg_sq, *, beta1: float, beta2: float, eps: float,
                step_size: float, scale: float, lr: float, weight_decay: float) -> None:
    """One full step, in place on ``param``, ``exp_avg`` and ``exp_avg_sq``.

    With ``P = Q = None`` and ``scale = 1`` this is galore-torch's plain AdamW step (no projection).
    Every backend implements exactly this signature.
    """
    R = project(grad, P, Q)
    N = adam_normalize(R, exp_avg, exp_avg_sq, beta1, beta2, eps)
    apply_update(param, project_back(N, P, Q, scale), step_size, lr, weight_decay)
