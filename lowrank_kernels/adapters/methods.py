"""The entry points: ``deep_lora``, ``lora_ga``, ``lora_sb`` (gradient-initialised) and ``lora`` (the baseline).

Each one checks everything (targets, ranks, gradients) and computes every factor before it touches the
model, then wraps the targets in place and returns an :class:`~lowrank_kernels.adapters.core.AdapterSet`.
Gradient SVDs go through :func:`~lowrank_kernels.adapters.core.bucketed_rsvd` (our seeded rsvd, one batch
per shape); target ``i`` (in model order) uses seed ``seed + i``. Formulas: ../shared/research/algorithms.md
§8 (LoRA-GA, LoRA-SB) and §9 (Deep LoRA).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import torch
from torch import nn

from ..linalg import gaussian_test_matrix
from .core import AdapterSet, bucketed_rsvd, check_rank, check_untied, gradients_for, install, select_targets
from .layers import DeepLoraLinear, LoraLinear, LoraSBLinear

__all__ = ["deep_lora", "lora_ga", "lora_sb", "lora", "lora_ga_factors"]

Targets = Union[str, list[str]]


def _seeds(targets, seed: int) -> dict[str, int]:
    return {name: seed + i for i, name in enumerate(targets)}


def deep_lora(model: nn.Module, target_modules: Targets, rank: int, grads: Mapping[str, torch.Tensor], *,
              epsilon: float = 1e-3, gamma: float = 0.0, seed: int = 0, oversample: int = 10, niter: int = 2,
              freeze_base: bool = True, progress: Optional[bool] = None) -> AdapterSet:
    """Compressed Deep LoRA (Yaras et al., ICML 2024): ΔW = L (W3 W2 W1) Rᵀ on the frozen weight.

    ``rank`` = 2h must be even. Inner factors W_i = ``epsilon`` · I (2h x 2h), so ΔW(0) = ε³ L Rᵀ and the
    output at initialisation is the base model's up to ε³. L (out x 2h) and R (in x 2h) are orthonormal:
    L spans the top-h left singular vectors U_h of the gradient G and h random directions, R h random
    directions and the top-h right singular vectors V_h, paired as in the paper's compression
    (R = orth([W1(0)ᵀU_h/ε, V_h]), L = ΔW(0)R/ε³, with the random orthogonal full-width factors replaced by
    seeded Gaussian directions: the same distribution). One rank-h rsvd and two thin QRs per target.
    ``param_groups(lr)``: inner factors at lr, L and R at ``gamma`` · lr (gamma = 0: frozen, the default).
    """
    if not isinstance(rank, int) or rank < 2 or rank % 2:
        raise ValueError(f"deep_lora: rank must be an even int >= 2 (rank = 2h), got {rank!r}")
    if not (epsilon > 0 and gamma >= 0):
        raise ValueError(f"deep_lora: epsilon ({epsilon}) must be > 0 and gamma ({gamma}) >= 0")
    targets = select_targets(model, target_modules)
    check_rank(targets, rank, "deep_lora", lambda r: r)
    g = gradients_for(targets, grads)
    h, seeds = rank // 2, _seeds(targets, seed)
    svds = bucketed_rsvd(g, h, seeds, oversample=oversample, niter=niter, desc="deep_lora rsvd", progress=progress)
    modules = {}
    for name, base in targets.items():
        U, _, V = svds[name]
        m, n = U.shape[0], V.shape[0]
        # Random halves from their own stream (not the rsvd sketch's seed), identical on every device.
        omega = gaussian_test_matrix(m + n, h, seed=seeds[name] + (1 << 40), device=U.device)
        L = torch.linalg.qr(torch.cat([U, omega[:m]], 1)).Q
        R = torch.linalg.qr(torch.cat([omega[m:], V], 1)).Q
        w = base.weight
        eye = epsilon * torch.eye(rank, dtype=w.dtype, device=w.device)
        modules[name] = DeepLoraLinear(base, L.to(w.dtype), R.to(w.dtype), [eye.clone() for _ in range(3)],
                                       train_outer=gamma > 0)
    return install("deep_lora", model, modules, gamma=gamma, freeze_base=freeze_base)


def lora_ga_factors(grad_svd: tuple, rank: int, out_features: int, variant: str, stable_gamma: float):
    """(A r x in, B out x r) in fp32 from the gradient's top-2r SVD, direction "ArB2r", scale "stable".

    ``paper`` (Outsider565/LoRA-GA): A = V[:, :r]ᵀ, B = U[:, r:2r], both times out^{1/4}/√γ.
    ``peft`` (PEFT 0.21 ``lora_ga_init``): A = V[:, :r]ᵀ, B = U[:, r:2r] diag(S[r:2r]) out^{1/4}/√γ.
    """
    U, S, V = grad_svd
    c = out_features ** 0.25 / math.sqrt(stable_gamma)
    A = V[:, :rank].T
    B = U[:, rank:2 * rank]
    if variant == "paper":
        return A * c, B * c
    return A, B * S[rank:2 * rank] * c


def lora_ga(model: nn.Module, target_modules: Targets, rank: int, grads: Mapping[str, torch.Tensor], *,
            variant: str = "paper", alpha: float = 8.0, stable_gamma: float = 16.0, seed: int = 0,
            niter: int = 4, freeze_base: bool = True, peft: bool = False, progress: Optional[bool] = None):
    """LoRA-GA (Wang et al., 2024): LoRA whose first step follows the full gradient's top-2r SVD.

    ΔW = scaling · B A with scaling = ``alpha`` / rank (PEFT's default ``lora_alpha`` is 8). A, B come from
    the rsvd of G with 2·rank singular pairs and 2·rank oversampling, ``niter`` power iterations (the paper's
    and PEFT's ``svd_lowrank(G, q=4r, niter=4)``), direction "ArB2r", scale "stable" (``stable_gamma``);
    ``variant`` picks the scaling convention (:func:`lora_ga_factors`). The base weight is offset,
    W ← W − scaling · B A (in fp32, with A and B rounded to the weight's dtype first, as PEFT does), so the
    output at initialisation is unchanged. Needs 2·rank <= min(out, in).

    ``peft=True`` (needs PEFT): returns a ``peft.PeftModel`` (``init_lora_weights="lora_ga"``) carrying this
    initialisation, so PEFT's save / load / merge and its ``path_initial_model_for_weight_conversion``
    apply. Otherwise an :class:`AdapterSet` whose checkpoints carry the offset factors.
    """
    if variant not in ("paper", "peft"):
        raise ValueError(f"lora_ga: variant must be 'paper' or 'peft', got {variant!r}")
    if not (alpha > 0 and stable_gamma > 0):
        raise ValueError(f"lora_ga: alpha ({alpha}) and stable_gamma ({stable_gamma}) must be > 0")
    if peft:
        from .peft_interop import require_peft
        require_peft()
    targets = select_targets(model, target_modules)
    check_rank(targets, rank, "lora_ga", lambda r: 2 * r)
    check_untied(model, targets, "lora_ga")
    g = gradients_for(targets, grads)
    svds = bucketed_rsvd(g, 2 * rank, _seeds(targets, seed), oversample=2 * rank, niter=niter,
                         desc="lora_ga rsvd", progress=progress)
    scaling = alpha / rank
    factors = {}
    for name, base in targets.items():
        A, B = lora_ga_factors(svds[name], rank, base.out_features, variant, stable_gamma)
        factors[name] = (A.to(base.weight.dtype), B.to(base.weight.dtype))
    if peft:
        from .peft_interop import peft_lora_ga
        return peft_lora_ga(model, factors, rank, alpha)
    modules = {}
    for name, base in targets.items():
        A, B = factors[name]
        modules[name] = module = LoraLinear(base, A, B, scaling, base_offset=True)
        with torch.no_grad():
            w = base.weight
            w.copy_((w.float() - module.offset_weight()).to(w.dtype))
    return install("lora_ga", model, modules, freeze_base=freeze_base)


def lora_sb(model: nn.Module, target_modules: Targets, rank: int, grads: Mapping[str, torch.Tensor], *,
            lr: float, scaling: float = 1.0, seed: int = 0, oversample: int = 10, niter: int = 10,
            freeze_base: bool = True, progress: Optional[bool] = None) -> AdapterSet:
    """LoRA-SB (Ponkshe et al., 2024) on the LoRA-XS architecture: ΔW = scaling · B R A, only R trained.

    The first AdamW update is approximated as ΔW₁ = −``lr`` · sign(G) (``lr``: the fine-tuning learning
    rate); with its rank-r SVD U_r S_r V_rᵀ: B = U_r, A = V_rᵀ (frozen), R = diag(S_r) / ``scaling``. So
    the adapted model starts at W0 + [ΔW₁]_r, the best rank-r approximation of that first update (the base
    weight is not offset). The repository's ``svd_lowrank(q=r, niter=10)`` has no oversampling; we add
    ``oversample`` columns, which only makes the truncation more accurate.
    """
    if not (lr > 0 and scaling > 0):
        raise ValueError(f"lora_sb: lr ({lr}) and scaling ({scaling}) must be > 0")
    targets = select_targets(model, target_modules)
    check_rank(targets, rank, "lora_sb", lambda r: r)
    g = gradients_for(targets, grads)
    first_update = {name: -lr * torch.sign(grad.float()) for name, grad in g.items()}
    svds = bucketed_rsvd(first_update, rank, _seeds(targets, seed), oversample=oversample, niter=niter,
                         desc="lora_sb rsvd", progress=progress)
    modules = {}
    for name, base in targets.items():
        U, S, V = svds[name]
        dt = base.weight.dtype
        modules[name] = LoraSBLinear(base, V.T.to(dt), U.to(dt), torch.diag(S / scaling).to(dt), scaling)
    return install("lora_sb", model, modules, freeze_base=freeze_base)


def lora(model: nn.Module, target_modules: Targets, rank: int, *, alpha: float = 8.0, seed: int = 0,
         freeze_base: bool = True) -> AdapterSet:
    """Plain LoRA (the baseline): A Kaiming-uniform (a = √5, PEFT's default), B = 0, scaling = alpha / rank."""
    targets = select_targets(model, target_modules)
    check_rank(targets, rank, "lora", lambda r: r)
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, base in targets.items():
        A = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
        w = base.weight
        modules[name] = LoraLinear(base, A.to(w), torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device),
                                   alpha / rank)
    return install("lora", model, modules, freeze_base=freeze_base)
