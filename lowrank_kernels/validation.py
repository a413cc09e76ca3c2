"""Hyperparameter checks shared by construction and every step (a step validates before it mutates)."""
from __future__ import annotations

import math

import torch

from .projection import (BASIS_SOURCES, MOMENT_RULES, PROJ_TYPES, RANK_POLICIES, REFRESH_POLICIES,
                         STATE_DTYPES)
from .update_rules import UPDATE_RULES

__all__ = ["check_hyperparameters", "is_int", "is_real"]


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_hyperparameters(group: dict) -> None:
    """Raise ValueError naming the first invalid value; shared by construction and every step."""
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    if isinstance(lr, torch.Tensor):
        lr = lr.item() if lr.numel() == 1 else float("nan")
    if not is_real(lr) or lr < 0.0:
        raise ValueError(f"Invalid learning rate: {group['lr']!r} (must be a finite number >= 0)")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    for i, b in enumerate(betas):
        if not is_real(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r} (must be in [0, 1))")
    if not is_real(eps) or eps < 0.0:
        raise ValueError(f"Invalid epsilon value: {eps!r} (must be a finite number >= 0)")
    if not is_real(wd) or wd < 0.0:
        raise ValueError(f"Invalid weight_decay value: {wd!r} (must be a finite number >= 0)")
    if group.get("state_dtype") not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {group['state_dtype']!r} (must be one of {tuple(STATE_DTYPES)})")
    if "rank" not in group:
        if group.get("update", "galore") != "galore":
            raise ValueError(f"update={group['update']!r} needs a projected group (one with 'rank'); groups "
                             "without 'rank' are plain AdamW")
        return
    if not is_int(group["rank"]) or group["rank"] < 1:
        raise ValueError(f"Invalid rank: {group['rank']!r} (must be an integer >= 1)")
    gap = group["update_proj_gap"]
    if not is_int(gap) or gap < 1:
        raise ValueError(f"Invalid update_proj_gap: {gap!r} (must be an integer >= 1)")
    if not is_real(group["scale"]) or group["scale"] <= 0.0:
        raise ValueError(f"Invalid scale: {group['scale']!r} (must be a finite number > 0)")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"Invalid proj_type: {group['proj_type']!r} (must be one of {PROJ_TYPES})")
    for key, choices in (("projector", BASIS_SOURCES), ("rank_policy", RANK_POLICIES),
                         ("moments_on_refresh", MOMENT_RULES), ("refresh_policy", REFRESH_POLICIES),
                         ("update", UPDATE_RULES)):
        if group[key] not in choices:
            raise ValueError(f"Invalid {key}: {group[key]!r} (must be one of {tuple(choices)})")
    allowed = UPDATE_RULES[group["update"]].proj_types
    if group["proj_type"] not in allowed:
        raise ValueError(f"update={group['update']!r} is defined for proj_type in {allowed}, not "
                         f"{group['proj_type']!r} (its reference implementation defines no other)")
    if group["update"] == "frugal":
        if not is_real(group["inactive_lr_scale"]) or group["inactive_lr_scale"] < 0.0:
            raise ValueError(f"Invalid inactive_lr_scale: {group['inactive_lr_scale']!r} (must be a finite "
                             "number >= 0)")
    if group["update"] in ("apollo", "apollo-mini"):
        for key in ("scale_front", "disable_nl"):
            if not isinstance(group[key], bool):
                raise ValueError(f"Invalid {key}: {group[key]!r} (must be True or False)")
    if group["projector"] == "random" and group["rank_policy"] != "fixed":
        raise ValueError(f"rank_policy={group['rank_policy']!r} needs singular values; projector='random' "
                         "has none: use rank_policy='fixed'")
    if group["rank_policy"] == "energy":
        xi, low, high = group["energy_threshold"], group["min_rank"], group["max_rank"]
        if not is_real(xi) or not 0.0 <= xi < 1.0:
            raise ValueError(f"Invalid energy_threshold: {xi!r} (must be in [0, 1))")
        if not is_int(low) or low < 1:
            raise ValueError(f"Invalid min_rank: {low!r} (must be an integer >= 1)")
        if high is not None and (not is_int(high) or high < low):
            raise ValueError(f"Invalid max_rank: {high!r} (must be None or an integer >= min_rank={low})")
    if group["refresh_policy"] == "lazy":
        if not is_real(group["similarity_threshold"]) or not 0.0 <= group["similarity_threshold"] <= 1.0:
            raise ValueError(f"Invalid similarity_threshold: {group['similarity_threshold']!r} (must be in [0, 1])")
        for key in ("patience", "gap_growth"):
            if not is_int(group[key]) or group[key] < 1:
                raise ValueError(f"Invalid {key}: {group[key]!r} (must be an integer >= 1)")
    if group["refresh_policy"] == "converged":
        tol = group["convergence_tol"]
        if not is_real(tol) or tol < 0.0:
            raise ValueError(f"Invalid convergence_tol: {tol!r} (must be a finite number >= 0)")
