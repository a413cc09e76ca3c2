"""Loading a checkpoint into GaLoreAdamW: validate all of it, convert galore-torch's format, then load.

:func:`prepare_load` builds the new param groups and state without touching the optimizer, so
``load_state_dict`` either loads everything or raises and loads nothing. It accepts:

* GaLoreAdamW's own ``state_dict()`` (also from an older version: keys added since get their defaults);
* galore-torch's (``galore_torch.GaLoreAdamW``; also HF's old ``transformers.AdamW`` for plain groups): its
  groups gain our defaults (``projector="svd"``, fixed policies, the optimizer's ``seed``), and each
  ``projector`` object becomes ``proj_left`` / ``proj_right`` (galore-torch keeps Q^T), ``rank``,
  ``refreshes`` and ``last_refresh``; training then continues exactly as galore-torch would. (Its
  checkpoints hold that object, so they load only with ``torch.load(..., weights_only=False)``.)

It refuses torch.optim checkpoints (AdamW's full-size moments follow another update rule and cannot
become low-rank ones), group layouts or shapes that differ from the optimizer's, and entries with a
missing or ill-formed ``step``, ``exp_avg``, ``exp_avg_sq``, ``rank``, ``proj_left`` or ``proj_right``.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import torch

from .distributed import fsdp
from .quant import QUANT_KEYS
from .projection import MOMENT_KEYS, STATE_DTYPES, matrix_shape, max_rank, orientation
from .validation import check_hyperparameters, check_loaded_entry, check_projectable, fill_defaults, is_int

__all__ = ["prepare_load", "convert_galore_torch_entry"]

MIGRATE = ("To migrate, load the model's weights only and let GaLoreAdamW start its optimizer state afresh "
           "(its first step computes the bases).")


def _label(group: dict, saved: dict, index: int, position: int, p: torch.Tensor) -> str:
    names = group.get("param_names") or saved.get("param_names")
    name = repr(names[index]) if names and index < len(names) else f"#{position}"
    return f"parameter {name} (shape {tuple(p.shape)})"


def convert_galore_torch_entry(entry: dict, group: dict, shape, label: str) -> dict:
    """galore-torch's state for one projected weight (``projector`` object) in our format."""
    projector = entry["projector"]
    ortho = getattr(projector, "ortho_matrix", None)
    out = {k: v for k, v in entry.items() if k != "projector"}
    step = entry.get("step")
    if ortho is None or not is_int(step) or step < 1:
        return out  # a projector that never projected: a fresh state (checked by the caller)
    m, n = matrix_shape(shape)
    proj_type = getattr(projector, "proj_type", group["proj_type"])
    side = orientation(proj_type, m, n)
    try:
        left, right_t = ortho if side == "full" else (ortho, None) if side == "left" else (None, ortho)
        if left is not None:
            out["proj_left"] = left.clone()  # keeps LAPACK's column-major layout, as ours does
        if right_t is not None:  # galore-torch keeps Q^T (r x n); ours is Q, row-major n x r
            out["proj_right"] = right_t.T.clone(memory_format=torch.contiguous_format)
        out["rank"] = int((left if left is not None else right_t.T).shape[1])
    except (TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"{label}: galore-torch projector's ortho_matrix is not a {side} basis for a "
                         f"{m}x{n} weight ({exc})") from None
    # galore-torch refreshes at the pre-increment steps 0, T, 2T, ... below ``step``.
    gap = getattr(projector, "update_proj_gap", group["update_proj_gap"])
    out["refreshes"] = (step - 1) // gap + 1
    out["last_refresh"] = (step - 1) // gap * gap
    return out


def _load_value(key, value, p: torch.Tensor, state_dtype):
    """A state value for ``p``: tensors follow its device, and its dtype as in torch.optim, except moments
    at an explicit ``state_dtype``; never an alias of the checkpoint's tensor (the loaded state is updated
    in place, and must not write through to the dict it came from)."""
    if not isinstance(value, torch.Tensor):
        return copy.deepcopy(value)
    if key in MOMENT_KEYS and state_dtype is not None and (value.dtype == torch.uint8) == (state_dtype == torch.uint8):
        out = value.to(device=p.device, dtype=state_dtype)
    elif key in QUANT_KEYS or not value.is_floating_point():  # int8 scales stay fp32; seeds, indices keep theirs
        out = value.to(device=p.device)
    elif p.is_floating_point():
        out = value.to(device=p.device, dtype=p.dtype)
    else:
        out = value.to(device=p.device)
    return out.clone() if out is value else out


def prepare_load(opt: torch.optim.Optimizer, state_dict) -> tuple[list, dict]:
    """Validate ``state_dict`` against ``opt`` and return (param_groups, state) to install; ValueError
    naming the group, parameter and key at the first problem. Mutates neither."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError("an optimizer state_dict is a dict with 'state' and 'param_groups'")
    groups = opt.param_groups
    saved_groups = copy.deepcopy(state_dict["param_groups"])
    if len(groups) != len(saved_groups):
        raise ValueError(f"loaded state dict has a different number of parameter groups "
                         f"({len(saved_groups)} in the checkpoint, {len(groups)} here)")
    for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
        if len(saved.get("params", ())) != len(group["params"]):
            raise ValueError(f"loaded state dict contains a parameter group that doesn't match the size of "
                             f"optimizer's group: group {gi} has {len(saved.get('params', ()))} parameters in "
                             f"the checkpoint, {len(group['params'])} here")
    saved_ids = [i for saved in saved_groups for i in saved["params"]]
    if len(set(saved_ids)) != len(saved_ids):
        raise ValueError("the checkpoint's param groups list a parameter index twice")

    where = {}  # checkpoint index -> (parameter, its group from the checkpoint, label)
    position = 0
    for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
        labels = [_label(group, saved, i, position + i, p) for i, p in enumerate(group["params"])]
        first = labels[0] if labels else "no parameters"
        if "correct_bias" not in saved:
            keys = sorted(k for k in saved if k not in ("params", "param_names"))
            raise ValueError(
                f"checkpoint param group {gi} ({first}, ...) has no 'correct_bias': it is not from GaLoreAdamW "
                f"or galore-torch (its keys {keys} look like a torch.optim optimizer's). A "
                f"torch.optim AdamW keeps full-size moments under another update rule, which cannot resume "
                f"a GaLoreAdamW run. {MIGRATE}")
        if ("rank" in saved) != ("rank" in group):
            has, hasnt = ("the checkpoint", "this optimizer") if "rank" in saved else ("this optimizer", "the checkpoint")
            raise ValueError(f"param group {gi} ({first}, ...) is projected ('rank') in {has} but not in "
                             f"{hasnt}: the checkpoint comes from another group layout")
        fill_defaults(saved, opt.defaults)
        try:
            check_hyperparameters(saved)
        except ValueError as exc:
            raise ValueError(f"checkpoint param group {gi}: {exc}") from None
        for i, (index, p, label) in enumerate(zip(saved["params"], group["params"], labels)):
            if "rank" in saved:
                check_projectable(p, max_rank(saved), label)
            where[index] = (p, saved, label)
        position += len(group["params"])

    state = defaultdict(dict)
    for key, entry in state_dict["state"].items():
        if key not in where and not is_int(key):
            # torch.optim's rule: a key that is no parameter index (put in optimizer.state by a state_dict
            # hook, say) is carried over as it is (a copy: the caller's dict is never aliased)
            state[key] = copy.deepcopy(entry)
            continue
        if key not in where:
            raise ValueError(f"the checkpoint has optimizer state for parameter index {key!r}, which none of "
                             "its param groups lists")
        p, saved, label = where[key]
        if isinstance(entry, dict) and "projector" in entry:
            if "rank" not in saved:
                raise ValueError(f"{label}: checkpoint state has a galore-torch 'projector' but its group has no 'rank'")
            entry = convert_galore_torch_entry(entry, saved, p.shape, label)
        if not fsdp.is_dtensor(p):  # FSDP2 state has its own fixed-shape layout (distributed/fsdp.py)
            check_loaded_entry(entry, saved, p.shape, label)
        dtype = STATE_DTYPES[saved.get("state_dtype")]
        state[p] = {k: _load_value(k, v, p, dtype) for k, v in entry.items()}

    for group, saved in zip(groups, saved_groups):  # torch.optim's rule: the checkpoint's settings win
        saved["params"] = group["params"]
        if "param_names" in group and "param_names" not in saved:
            saved["param_names"] = group["param_names"]
    return saved_groups, state
