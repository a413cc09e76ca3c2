"""Checks shared by construction, every step and checkpoint loading (a step validates before it mutates).

* hyperparameters of a group (:func:`check_hyperparameters`), after :func:`fill_defaults` has given the
  group the keys its current choices read;
* whether a parameter can sit in a projected group (:func:`check_projectable`);
* whether a parameter's optimizer state still fits the parameter (:func:`check_state_fits`, every step)
  and whether a loaded checkpoint entry is complete and well-formed (:func:`check_loaded_entry`).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import quant
from .projection import (BASIS_KEYS, BASIS_SOURCES, MOMENT_KEYS, MOMENT_RULES, POLICY_DEFAULTS,
                         PROJ_TYPES, PROJECTED_DEFAULTS, RANK_POLICIES, REFRESH_POLICIES, STATE_DTYPES,
                         COMPACT_KEYS, lowrank_shape, matrix_shape, orientation)
from .update_rules import UPDATE_RULES

__all__ = ["check_hyperparameters", "check_loaded_entry", "check_projectable", "check_state_fits",
           "expected_side", "fill_defaults", "is_int", "is_real", "stored_side"]


UNSUPPORTED_TORCH_FLAGS = ("maximize", "amsgrad", "capturable", "differentiable", "fused")


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fill_defaults(group: dict, defaults: dict) -> None:
    """Give ``group`` every key its current choices read: the optimizer's defaults, the projected keys
    when it has ``rank``, and the keys of the policies it selects.

    Runs at construction, before every step and on loading, so a policy switched later in
    ``param_groups`` (``rank_policy="energy"`` set by hand) gets its keys' defaults as at construction.
    """
    for key, value in defaults.items():
        group.setdefault(key, value)
    if "rank" not in group:
        return
    for key, value in PROJECTED_DEFAULTS.items():
        group.setdefault(key, value)
    for (key, choice), extra in POLICY_DEFAULTS.items():
        if isinstance(group[key], str) and group[key] == choice:
            for name, value in extra.items():
                group.setdefault(name, value)


_LR_VALUES = WeakIdKeyDictionary()  # tensor lr -> ((version, address, dtype, device), its float): lr_value


def lr_value(lr) -> float:
    """``float(lr)`` for a Python number or a 1-element tensor lr, reading the tensor only when it changed.

    An ordinary step must not read a tensor value on the host (no _local_scalar_dense: on CUDA a blocking
    read). A tensor lr is read once, then again only when its version counter (bumped by every in-place
    write: ``fill_``, as torch's LR schedulers do, ``copy_``, ``mul_``), its storage, dtype or device
    changed, so validation and the step sizes see every change, and an unchanged lr costs no read.
    (Writes through ``lr.data``, which has a counter of its own, are not seen: change the tensor itself.)
    """
    if not isinstance(lr, torch.Tensor):
        return float(lr)
    if lr.is_inference():  # no version counter to tell a change by: read it every time
        return lr.item()
    key = (lr._version, lr.data_ptr(), lr.dtype, lr.device)
    cached = _LR_VALUES.get(lr)
    if cached is None or cached[0] != key:
        cached = _LR_VALUES[lr] = (key, lr.item())
    return cached[1]


def check_hyperparameters(group: dict) -> None:
    """Raise ValueError naming the first invalid value; shared by construction and every step."""
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        lr = lr_value(lr)  # read only when it changed since the last read (no host read per step)
    if not is_real(lr) or lr < 0.0:
        raise ValueError(f"Invalid learning rate: {group['lr']!r} (must be a finite number >= 0)")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    # torch.optim.AdamW also takes tensors here; the step reads them as host numbers, so say so plainly
    # rather than "must be in [0, 1)" for a tensor(0.9)
    for key, value in (("beta1", betas[0]), ("beta2", betas[1]), ("eps", eps), ("weight_decay", wd),
                       ("scale", group.get("scale"))):
        if isinstance(value, torch.Tensor):
            raise ValueError(f"Invalid {key}: {value!r} (must be a Python number; only lr may be a tensor)")
    for i, b in enumerate(betas):
        if not is_real(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r} (must be in [0, 1))")
    if not is_real(eps) or eps < 0.0:
        raise ValueError(f"Invalid epsilon value: {eps!r} (must be a finite number >= 0)")
    if not is_real(wd) or wd < 0.0:
        raise ValueError(f"Invalid weight_decay value: {wd!r} (must be a finite number >= 0)")
    # torch.optim's per-group flags change the update (maximize, amsgrad) or promise an implementation
    # (capturable, differentiable, fused) this optimizer does not have; set in a group they were silently
    # ignored (a maximize=True group minimised). False is what we do, so it passes; foreach is only a speed hint.
    for key in UNSUPPORTED_TORCH_FLAGS:
        if group.get(key):
            raise ValueError(f"Invalid {key}: {group[key]!r} (GaLoreAdamW has no {key}; torch.optim's flag is "
                             f"not supported{'; negate the loss instead' if key == 'maximize' else ''})")
    for key in ("correct_bias", "check_finite"):
        if key in group and not isinstance(group[key], bool):
            raise ValueError(f"Invalid {key}: {group[key]!r} (must be True or False)")
    if "seed" in group and not is_int(group["seed"]):
        raise ValueError(f"Invalid seed: {group['seed']!r} (must be an integer)")
    state_dtype = group.get("state_dtype")
    if not (state_dtype is None or isinstance(state_dtype, str)) or state_dtype not in STATE_DTYPES:
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
        if not isinstance(group[key], str) or group[key] not in choices:
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
        if high is None and low > group["rank"]:  # the bounds would contradict: [min_rank, rank]
            raise ValueError(f"Invalid min_rank: {low!r} (must be <= max_rank, which defaults to "
                             f"rank={group['rank']})")
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


def check_projectable(p: torch.Tensor, rank: int, label) -> None:
    """Can ``p`` sit in a projected group whose policy may choose ranks up to ``rank``? (ValueError;
    ``label`` names the parameter and its shape)"""
    problem = _projectable_problem(p.shape, p.dtype, rank)
    if problem:
        raise ValueError(problem.format(label=label))


@functools.lru_cache(maxsize=4096)
def _projectable_problem(shape: torch.Size, dtype: torch.dtype, rank: int) -> Optional[str]:
    """The error template for ``check_projectable``, or None; cached: it runs for every weight at every
    step, and shapes and ranks rarely change."""
    if len(shape) < 2:
        return (f"{{label}} sits in a projected group (rank={rank}) but has {len(shape)} dimension(s): "
                "GaLore projects weights with 2 or more dimensions; put 1-D parameters (biases, norms) in a "
                "group without 'rank'")
    if dtype.is_complex:
        return "{label} is complex; GaLoreAdamW supports real parameters only"
    if not dtype.is_floating_point:
        return f"{{label}} is {dtype}; GaLoreAdamW optimises floating-point parameters only"
    m, n = matrix_shape(shape)
    if rank >= min(m, n):
        return (f"rank={rank} is too large for {{label}} (as a {m}x{n} matrix): "
                f"need 1 <= rank < min(m, n) = {min(m, n)}; use a plain AdamW group for this weight")
    return None


# ---- optimizer state ----------------------------------------------------------------------------------
def stored_side(entry: dict) -> Optional[str]:
    """The side a state entry's basis projects ("left", "right", "full"), None without a basis."""
    # A regenerated basis ("random", "dct") is stored as proj_left_<suffix> / proj_right_<suffix> only.
    left = any(k == "proj_left" or k.startswith("proj_left_") for k in entry)
    right = any(k == "proj_right" or k.startswith("proj_right_") for k in entry)
    return "full" if left and right else "left" if left else "right" if right else None


def expected_side(group: dict, shape) -> Optional[str]:
    """The side ``group`` projects a parameter of ``shape`` on (None: a plain AdamW group)."""
    if "rank" not in group:
        return None
    return _side_of(group["proj_type"], shape)


@functools.lru_cache(maxsize=4096)
def _side_of(proj_type: str, shape: torch.Size) -> str:
    return orientation(proj_type, *matrix_shape(shape))


def _expected_shapes(entry: dict, shape) -> dict:
    """Shapes of the entry's tensors for a parameter of ``shape``, in the layout the entry was made for."""
    side = stored_side(entry)
    if side is None:
        return {key: tuple(shape) for key in MOMENT_KEYS}
    m, n = matrix_shape(shape)
    r = entry.get("rank")
    shapes = {key: lowrank_shape(side, m, n, r) for key in MOMENT_KEYS}
    if "proj_left" in entry:
        shapes["proj_left"] = (m, r)
    if "proj_right" in entry:
        shapes["proj_right"] = (n, r)
    return shapes


def check_state_fits(entry: dict, shape: torch.Size, label) -> object:
    """RuntimeError unless the moments and basis in ``entry`` fit a parameter of ``shape``; returns the
    side the entry's basis projects (None: a plain AdamW state; False: no moments or basis yet).

    They were sized when the state was created; a parameter resized since (``p.data = bigger``) no longer
    matches them, and stepping it would fail half-way or mix unrelated numbers. Runs for every parameter
    at every step, so the common case is a few shape comparisons.
    """
    M, V = entry.get("exp_avg"), entry.get("exp_avg_sq")
    P, Q = entry.get("proj_left"), entry.get("proj_right")
    # A regenerated basis ("random", "dct") keeps only proj_*_seed / proj_*_index.
    side = stored_side(entry) if P is None and Q is None and "rank" in entry else None
    if P is None and Q is None and side is None:
        if M is None and V is None:
            return False
        fits = (M is None or M.shape == shape) and (V is None or V.shape == shape)
    else:  # inline arithmetic: this is the per-parameter, per-step path
        if side is None:
            side = "full" if P is not None and Q is not None else "left" if P is not None else "right"
        m = shape[0]
        n = shape.numel() // m if m else matrix_shape(shape)[1]
        r = entry.get("rank")
        low = (r, n) if side == "left" else (m, r) if side == "right" else (r, r)
        fits = ((P is None or P.shape == (m, r)) and (Q is None or Q.shape == (n, r))
                and (M is None or M.shape == low) and (V is None or V.shape == low))
    if not fits:
        for key, want in _expected_shapes(entry, shape).items():
            value = entry.get(key)
            if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(want):
                raise RuntimeError(
                    f"{label}: its optimizer state {key!r} has shape {tuple(value.shape)}, but a parameter "
                    f"of this shape needs {tuple(want)}; the parameter was resized after its state was "
                    "created. Nothing was updated; to restart this parameter's optimizer state, "
                    "`del optimizer.state[param]`"
                )
    return side


def _nonneg_int(entry: dict, key: str, label: str, required: bool) -> None:
    if key not in entry:
        if required:
            raise ValueError(f"{label}: checkpoint state has no {key!r}")
        return
    value = entry[key]
    if not is_int(value) or value < 0:
        hint = (" (a tensor step is torch.optim's format; GaLoreAdamW writes plain ints)"
                if key == "step" and isinstance(value, torch.Tensor) else "")
        raise ValueError(f"{label}: checkpoint state {key!r} must be an integer >= 0, got {value!r}{hint}")


def check_loaded_entry(entry: dict, group: dict, shape, label: str) -> None:
    """ValueError naming ``label`` and the key unless ``entry`` is a complete, well-formed state for a
    parameter of ``shape`` in ``group`` (the checkpoint's group, which replaces the current one)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{label}: checkpoint state must be a dict, got {type(entry).__name__}")
    if not entry:
        return
    _nonneg_int(entry, "step", label, required=True)
    side, want_side = stored_side(entry), expected_side(group, shape)
    required = list(MOMENT_KEYS)
    if want_side is not None:
        m, n = matrix_shape(shape)
        compact = any(k in entry for k in COMPACT_KEYS)  # random, dct: a seed or indices, not the basis
        required += [k for k, s in (("proj_left", ("left", "full")), ("proj_right", ("right", "full")))
                     if want_side in s and not compact]
        for key in ("rank", "refreshes", "last_refresh"):
            _nonneg_int(entry, key, label, required=True)
        if not 1 <= entry["rank"] < min(m, n):
            raise ValueError(f"{label}: checkpoint state 'rank' = {entry['rank']} is outside "
                             f"[1, min(m, n) = {min(m, n)}) for a {m}x{n} weight")
    for key in required:
        if key not in entry:
            raise ValueError(f"{label}: checkpoint state has no {key!r}")
    if side != want_side:
        extra = [k for k in BASIS_KEYS if k in entry and k not in required]
        if want_side is None:
            raise ValueError(f"{label}: checkpoint state has {extra} but its param group has no 'rank' "
                             "(a plain AdamW group keeps no basis)")
        raise ValueError(f"{label}: checkpoint state has {extra}, but proj_type={group['proj_type']!r} "
                         f"projects the {want_side} side of this {m}x{n} weight")
    for key, want in _expected_shapes(entry, shape).items():
        value = entry[key]
        int8_codes = key in MOMENT_KEYS and group.get("state_dtype") == "int8"
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or
                                                       (int8_codes and value.dtype == torch.uint8)):
            got = f"a tensor of {value.dtype}" if isinstance(value, torch.Tensor) else repr(type(value).__name__)
            raise ValueError(f"{label}: checkpoint state {key!r} must be a real floating-point tensor, got {got}")
        if tuple(value.shape) != tuple(want):
            raise ValueError(f"{label}: checkpoint state {key!r} has shape {tuple(value.shape)}, expected "
                             f"{tuple(want)} (is the checkpoint from a model with other shapes or settings?)")
    for key in ("moment_start", "streak"):
        _nonneg_int(entry, key, label, required=False)
    for key in ("moment_start", "last_refresh"):  # counts of steps taken before: never past ``step``
        if entry.get(key, 0) > entry["step"]:
            raise ValueError(f"{label}: checkpoint state {key!r} = {entry[key]} is past its 'step' = {entry['step']}")
    _check_quantized(entry, group, label)
    if want_side is not None:
        _check_compact(entry, want_side, (m, n), label)
    norm = entry.get("limiter_norm")
    if norm is not None and not (isinstance(norm, torch.Tensor) and norm.is_floating_point() and norm.dim() == 0):
        got = f"a tensor of {norm.dtype}, shape {tuple(norm.shape)}" if isinstance(norm, torch.Tensor) else repr(norm)
        raise ValueError(f"{label}: checkpoint state 'limiter_norm' must be a 0-d floating-point tensor, got {got}")
    if "gap" in entry and (not is_int(entry["gap"]) or entry["gap"] < 1):
        raise ValueError(f"{label}: checkpoint state 'gap' must be an integer >= 1, got {entry['gap']!r}")
    norm = entry.get("proj_norm", 0.0)
    if not isinstance(norm, (int, float)) or isinstance(norm, bool):
        raise ValueError(f"{label}: checkpoint state 'proj_norm' must be a number, got {norm!r}")


def _check_quantized(entry: dict, group: dict, label: str) -> None:
    """int8 moments (quant.py): uint8 codes, each with its fp32 absmax per 256-entry block, in an int8
    group only; float moments in an int8 group are quantised at the next step (a state_dtype edited just
    before the checkpoint), so they load as they are."""
    for key in MOMENT_KEYS:
        codes, absmax = entry[key], entry.get(f"{key}_absmax")
        if codes.dtype != torch.uint8:
            if absmax is not None:
                raise ValueError(f"{label}: checkpoint state has {key + '_absmax'!r}, but its {key!r} is "
                                 f"{codes.dtype}, not int8 codes (uint8)")
            continue
        want = (quant.blocks(codes.numel()),)
        if not (isinstance(absmax, torch.Tensor) and absmax.dtype == torch.float32 and tuple(absmax.shape) == want):
            got = ("nothing" if absmax is None else f"a tensor of {absmax.dtype}, shape {tuple(absmax.shape)}"
                   if isinstance(absmax, torch.Tensor) else repr(absmax))
            raise ValueError(f"{label}: checkpoint state {key!r} holds int8 codes, so {key + '_absmax'!r} must be "
                             f"a float32 tensor of shape {want} (one scale per {quant.BLOCK} entries), got {got}")


def _check_compact(entry: dict, side: str, dims: tuple, label: str) -> None:
    """A regenerated basis (projector "random": an int seed; "dct": r distinct int64 column numbers below
    the projected dimension), the only basis of its side."""
    for key, dim in zip(BASIS_KEYS, dims):
        seed, index = entry.get(f"{key}_seed"), entry.get(f"{key}_index")
        if sum(x is not None for x in (entry.get(key), seed, index)) > 1:
            raise ValueError(f"{label}: checkpoint state holds more than one of {key!r}, {key + '_seed'!r}, "
                             f"{key + '_index'!r}: one basis per side")
        if seed is not None and not (is_int(seed) and -2 ** 63 <= seed < 2 ** 64):
            raise ValueError(f"{label}: checkpoint state {key + '_seed'!r} must be an integer seed, got {seed!r}")
        if index is None:
            continue
        r = entry["rank"]
        if not (isinstance(index, torch.Tensor) and index.dtype == torch.int64 and tuple(index.shape) == (r,)):
            got = f"a tensor of {index.dtype}, shape {tuple(index.shape)}" if isinstance(index, torch.Tensor) \
                else repr(type(index).__name__)
            raise ValueError(f"{label}: checkpoint state {key + '_index'!r} must be an int64 tensor of shape "
                             f"({r},) (rank column numbers), got {got}")
        if index.device.type != "meta" and r and (int(index.min()) < 0 or int(index.max()) >= dim
                                                  or len(set(index.tolist())) != r):
            raise ValueError(f"{label}: checkpoint state {key + '_index'!r} must hold {r} distinct column numbers "
                             f"in [0, {dim}) for this weight, got {index.tolist()} (is the checkpoint from a "
                             "model with other shapes?)")
