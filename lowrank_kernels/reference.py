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

The other update rules (group key ``update``, :mod:`lowrank_kernels.update_rules`) reuse steps 1-2 and
change what is applied in step 4 (N = M / (sqrt(V) + eps), R the projected gradient; "rank axis" is the
axis of R of length r, so a ratio along it gives one factor per row (right side) or column (left side)):

* Fira (``fira`` package): U = scale * back(N) + S with S = (G - scale * back(R)) * (||N|| / ||R||) along
  the rank axis, then Fira's norm-growth limiter on S. The package subtracts ``scale * back(R)``, not the
  paper's P P^T G (the same only at scale = 1): followed here.
* FRUGAL: U = scale * back(N), plus the state-free signSGD step ``residual_lr * sign(G - back(R))``.
* APOLLO (``apollo-torch``): U = sqrt(scale) * G * (||N|| / ||R||), the ratio along the rank axis
  ("channel") or over the whole tensor ("tensor", APOLLO-Mini), with the norm-growth limiter. The package
  multiplies by sqrt(scale) (before the limiter with ``scale_front``, else after): followed here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["adam_step_size", "project", "adam_normalize", "project_back", "apply_update", "galore_step",
           "norm_ratio", "limit_norm_growth", "fira_step", "frugal_step", "apollo_step"]


def adam_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """lr with both bias corrections folded in; ``step`` counts from 1."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def right_factor(Q: torch.Tensor) -> torch.Tensor:
    """Q as the right operand of the projection G Q, read as the peer's Q^T.t() is.

    An svd basis's Q is a row-major n x r copy; galore-torch's is the view Vh[:r].T of LAPACK's
    column-major Vh, whose rows lie min(m, n) >= 2 apart. From r = 2 on, the GEMM rounds the same for any
    row stride, but at r = 1 a unit-stride column (strides (1, 1)) takes another BLAS path in torch's CPU
    matmul that rounds differently, so it is read through a strided copy (n entries), as galore-torch's
    is. APOLLO's random Q (its r x n draw transposed, strides (1, n)) is already read as APOLLO reads it.
    """
    if Q.shape[1] == 1 and Q.shape[0] > 1 and Q.stride() == (1, 1) and Q.device.type == "cpu":
        return torch.empty((Q.shape[0], 2), dtype=Q.dtype)[:, :1].copy_(Q)
    return Q


def project(grad: torch.Tensor, P: Optional[torch.Tensor], Q: Optional[torch.Tensor]) -> torch.Tensor:
    R = grad
    if P is not None:
        R = P.T @ R
    if Q is not None:
        R = R @ right_factor(Q)
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


# ---- the other update rules ------------------------------------------------------------------------------
def norm_ratio(N: torch.Tensor, R: torch.Tensor, tensorwise: bool = False) -> torch.Tensor:
    """||N|| / (||R|| + 1e-8) along the rank axis (a column or row of factors), or over the whole tensor.

    The rank axis is the shorter one (r < the other dimension), as Fira's and APOLLO's code pick it; the
    factors keep the other axis, so they broadcast against the full-size m x n matrix.
    """
    if tensorwise:
        return torch.linalg.vector_norm(N) / (torch.linalg.vector_norm(R) + 1e-8)
    dim = 0 if N.shape[0] < N.shape[1] else 1
    return torch.norm(N, dim=dim, keepdim=True) / (torch.norm(R, dim=dim, keepdim=True) + 1e-8)


def limit_norm_growth(S: torch.Tensor, previous: Optional[torch.Tensor], gamma: float = 1.01):
    """Fira's norm-growth limiter: (S limited, the norm to remember).

    With the previous step's norm ``previous``: S <- S / (max(||S|| / (previous + 1e-8), gamma) / gamma),
    so ||S|| grows by at most the factor gamma per step. The first step only records ||S||. Tensor ops
    only (no host sync); the norm stays a 0-d tensor in S's dtype, as in the fira and apollo-torch packages.
    """
    norm = torch.norm(S)
    if previous is None:
        return S, norm
    limiter = torch.clamp(norm / (previous + 1e-8), min=gamma) / gamma
    return S / limiter, norm / limiter


@torch.no_grad()
def fira_step(param, grad, P, Q, exp_avg, exp_avg_sq, limiter_norm, *, beta1: float, beta2: float, eps: float,
              step_size: float, scale: float, lr: float, weight_decay: float):
    """Fira: the GaLore step plus the scaled, norm-limited residual. Returns the limiter's new norm."""
    R = project(grad, P, Q)
    N = adam_normalize(R, exp_avg, exp_avg_sq, beta1, beta2, eps)
    S = (grad - project_back(R, P, Q, scale)) * norm_ratio(N, R)
    S, norm = limit_norm_growth(S, limiter_norm)
    apply_update(param, project_back(N, P, Q, scale) + S, step_size, lr, weight_decay)
    return norm


@torch.no_grad()
def frugal_step(param, grad, P, Q, exp_avg, exp_avg_sq, *, beta1: float, beta2: float, eps: float,
                step_size: float, scale: float, lr: float, weight_decay: float, residual_lr: float) -> None:
    """FRUGAL: the GaLore step on the projected part, signSGD at ``residual_lr`` on the residual."""
    R = project(grad, P, Q)
    N = adam_normalize(R, exp_avg, exp_avg_sq, beta1, beta2, eps)
    residual = grad - project_back(R, P, Q, 1.0)
    param.add_(torch.sign(residual), alpha=-residual_lr)  # before apply_update: its decay sees both parts
    apply_update(param, project_back(N, P, Q, scale), step_size, lr, weight_decay)


@torch.no_grad()
def apollo_step(param, grad, P, Q, exp_avg, exp_avg_sq, limiter_norm, *, beta1: float, beta2: float, eps: float,
                step_size: float, scale: float, lr: float, weight_decay: float, tensorwise: bool,
                scale_front: bool, limit: bool):
    """APOLLO (``tensorwise``: APOLLO-Mini): the raw gradient scaled by the low-rank Adam's norm ratio.

    Returns the limiter's new norm (None when ``limit`` is off).
    """
    R = project(grad, P, Q)
    N = adam_normalize(R, exp_avg, exp_avg_sq, beta1, beta2, eps)
    U = grad * norm_ratio(N, R, tensorwise)
    root = math.sqrt(scale)
    if scale_front:
        U = U * root
    norm = None
    if limit:
        U, norm = limit_norm_growth(U, limiter_norm)
    if not scale_front:
        U = U * root
    apply_update(param, U, step_size, lr, weight_decay)
    return norm
