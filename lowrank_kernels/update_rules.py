"""Update rules, group key ``update``: what a projected step applies to the weight.

Each rule is one reference function (lowrank_kernels/reference.py: the math) plus what the optimizer
needs to know about it: the ``proj_type`` values it defines, and how its state and group keys map to
the function's arguments. Defaults (galore-torch's numbers) are unchanged: ``update="galore"``.

=============  ======================================================  ==========================  ================
``update``     applied update (N = low-rank Adam, R = projected grad)  proj_type                   follows
=============  ======================================================  ==========================  ================
"galore"       scale * P N                                             all                         galore-torch
"fira"         scale * P N + limited (G - scale * P R) * ratio         std, reverse_std,           ``fira`` 1.0.2
                                                                       left, right
"frugal"       scale * P N, plus signSGD on G - P R at                 all                         FRUGAL's code
               lr * scale * inactive_lr_scale
"apollo"       sqrt(scale) * limited G * channel ratio                 std                         ``apollo-torch``
"apollo-mini"  sqrt(scale) * limited G * tensor ratio                  std                         1.0.3
=============  ======================================================  ==========================  ================

(ratio = ||N|| / ||R|| along the rank axis or over the tensor; "limited" = Fira's norm-growth limiter,
gamma 1.01, whose last norm is the state entry ``limiter_norm``.) The proj_type sets are where the
reference packages' rules are defined: Fira's code handles std, reverse_std, left and right; apollo-torch
picks its scaling axis from the weight's shape, which is the rank axis only under std (reverse_std
breaks its broadcast); neither defines "full" (one r x r R has no channel axis of G).

Backends: only "galore" on float moments has fused kernels (projection.fused_supported); every other
rule, and ``state_dtype="int8"``, runs this reference math whatever the backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import quant, reference
from .backends import step_function
from .projection import PROJ_TYPES, fused_supported

__all__ = ["UPDATE_RULES", "Rule", "run_step"]


@dataclass(frozen=True)
class Rule:
    proj_types: tuple
    run: Callable  # (step_fn, weight, grad, P, Q, exp_avg, exp_avg_sq, state, group, **hyper) -> None


def _galore(step_fn, weight, grad, P, Q, m, v, state, group, **hyper):
    step_fn(weight, grad, P, Q, m, v, **hyper)


def _fira(step_fn, weight, grad, P, Q, m, v, state, group, **hyper):
    state["limiter_norm"] = reference.fira_step(weight, grad, P, Q, m, v, state.get("limiter_norm"), **hyper)


def _frugal(step_fn, weight, grad, P, Q, m, v, state, group, **hyper):
    residual_lr = hyper["lr"] * hyper["scale"] * group["inactive_lr_scale"]
    reference.frugal_step(weight, grad, P, Q, m, v, **hyper, residual_lr=residual_lr)


def _apollo(tensorwise: bool):
    def run(step_fn, weight, grad, P, Q, m, v, state, group, **hyper):
        norm = reference.apollo_step(weight, grad, P, Q, m, v, state.get("limiter_norm"), **hyper,
                                     tensorwise=tensorwise, scale_front=group["scale_front"],
                                     limit=not group["disable_nl"])
        if norm is not None:
            state["limiter_norm"] = norm
    return run


UPDATE_RULES: dict[str, Rule] = {
    "galore": Rule(PROJ_TYPES, _galore),
    "fira": Rule(("std", "reverse_std", "left", "right"), _fira),
    "frugal": Rule(PROJ_TYPES, _frugal),
    "apollo": Rule(("std",), _apollo(tensorwise=False)),
    "apollo-mini": Rule(("std",), _apollo(tensorwise=True)),
}


def run_step(backend: str, group: dict, state: dict, weight, grad, P, Q, **hyper) -> None:
    """One parameter's step under its group's rule; ``hyper`` are galore_step's keyword arguments.

    Groups the fused kernels do not support run the reference on every backend. int8 moments are
    dequantised, updated with the step computed in fp32, and requantised (quant.float_moments).
    """
    step_fn = step_function(backend if fused_supported(group) else "torch", weight)
    rule = UPDATE_RULES[group.get("update", "galore")]
    with quant.float_moments(state) as (m, v):
        rule.run(step_fn, weight, grad, P, Q, m, v, state, group, **hyper)
