"""Param groups for Hugging Face models, selected the way ``transformers`` selects GaLore targets.

``galore_param_groups(model, target_modules, ...)`` returns ``[plain group, projected group]`` for
``GaLoreAdamW(groups, lr=...)``, e.g. passed to ``Trainer(optimizers=(optimizer, None))``. Matching
mirrors ``TrainingArguments.optim_target_modules`` (transformers' ``check_target_module_exists``):

* a ``str`` is a regex that must ``re.fullmatch`` the module name; ``"all-linear"`` (or ``"all_linear"``)
  selects every ``nn.Linear``;
* a list matches a module name by exact equality, by substring, or by ``re.fullmatch``, per entry.

Only ``nn.Linear`` weights are projected; their biases and every other parameter go to the plain group.
A non-Linear module matched by name (not by a regex) is reported with a warning, as transformers does.
"""
from __future__ import annotations

import re
import warnings
from typing import Union

from torch import nn

__all__ = ["galore_param_groups", "target_linear_modules", "target_matches"]


def target_matches(target_modules: Union[str, list[str]], name: str) -> tuple[bool, bool]:
    """(matched, by_regex) for a module name, by transformers' rules."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None, target_modules != name
    if name in target_modules or any(t in name for t in target_modules):
        return True, False
    if any(re.fullmatch(t, name) for t in target_modules):
        return True, True
    return False, False


def target_linear_modules(model: nn.Module, target_modules: Union[str, list[str]],
                          stacklevel: int = 2) -> dict[str, nn.Linear]:
    """``{name: module}`` of the ``nn.Linear`` modules that ``target_modules`` selects, in model order.

    The one selection rule of the package (GaLore groups and gradient-initialised adapters). Raises when
    nothing matches; warns about a non-Linear module matched by name (``stacklevel`` points at the caller).
    """
    if not isinstance(target_modules, (str, list)):
        raise TypeError(f"target_modules must be a regex string, a list of strings or 'all-linear'; "
                        f"got {target_modules!r}")
    all_linear = isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"
    targets = {}
    for name, module in model.named_modules():
        matched, by_regex = target_matches(target_modules, name)
        if not isinstance(module, nn.Linear):
            if matched and not by_regex:
                warnings.warn(f"{name} matched target_modules but is a {type(module).__name__}; only "
                              "nn.Linear modules are selected, so it is left out", stacklevel=stacklevel + 1)
            continue
        if matched or all_linear:
            targets[name] = module
    if not targets:
        raise ValueError(f"no nn.Linear module matches target_modules={target_modules!r}")
    return targets


def galore_param_groups(model: nn.Module, target_modules: Union[str, list[str]], rank: int = 128,
                        update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                        **extra) -> list[dict]:
    """``[{"params": others}, {"params": linear weights, "rank": ..., ...}]`` for GaLoreAdamW.

    ``extra`` adds keys to the projected group (e.g. ``projector="rsvd"``, ``state_dtype="bfloat16"``).
    Defaults are transformers' (``optim_args`` keys rank, update_proj_gap, scale, proj_type). The plain
    group is left out when every parameter is projected.
    """
    targets = {name + ".weight" if name else "weight"
               for name in target_linear_modules(model, target_modules, stacklevel=3)}
    # By name, as transformers does: a weight tied to an earlier parameter (named_parameters lists it once,
    # under the first name) is projected only if that first name is a target.
    named = list(model.named_parameters())
    projected = [p for n, p in named if n in targets]
    plain = [p for n, p in named if n not in targets]
    group = {"params": projected, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
             "proj_type": proj_type, **extra}
    return ([{"params": plain}] if plain else []) + [group]
