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

Backends: the per-parameter fused kernels run only "galore" (projection.fused_supported). The whole-model
step of backend "triton" (and "auto" on CUDA) runs every rule in its grouped kernels (lowrank_kernels/
kernels/grouped.py) for left/right projections with float moments and a basis the kernels read (svd, rsvd,
warm; Fira also needs orthonormal columns): :func:`grouped_supported`. Fira and FRUGAL read G a second time
in the back-projection kernel (four passes over m x n instead of GaLore's three); APOLLO's update needs no
back-projection GEMM. Everything else (int8 moments with these rules, "full" projections with frugal,
Fira with random bases, backend "torch", whose bucketed path is GaLore's) runs this reference math per
parameter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from . import quant, reference
from .backends import step_function
from .projection import FUSED_PROJECTORS, PROJ_TYPES, fused_supported, max_rank

__all__ = ["UPDATE_RULES", "Rule", "run_step", "grouped_supported", "ORTHONORMAL_PROJECTORS"]

# Bases with orthonormal columns: Fira's grouped limiter computes ||S|| in closed form from them (||P r|| =
# ||r||); a basis without (APOLLO's "random") keeps Fira on the reference.
ORTHONORMAL_PROJECTORS = ("svd", "rsvd", "warm", "dct")


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


def grouped_supported(group: dict, side: Optional[str] = None, shape: Optional[tuple] = None) -> bool:
    """Can the whole-model step's grouped kernels (backend "triton") run this group's step?

    Without ``side``: what the group alone decides (float moments; a basis the kernels read; any rule).
    With ``side`` and the weight's 2-D ``shape``, for the rules other than "galore": a left or right
    projection (the rules' kernels are one-sided), Fira on an orthonormal basis, and a rank below the
    non-rank dimension, so that reference.norm_ratio's axis is the rank axis (the optimizer's 1 <= r <
    min(m, n) guarantees it; checked anyway). Everything else takes the reference per parameter.
    """
    rule = group.get("update", "galore")
    if group.get("state_dtype") == "int8" and rule != "galore":
        return False  # the rules' norms come from the projection's epilogue, which int8 moments move out of
    if "rank" not in group:
        return True
    projector = group.get("projector", "svd")
    if projector not in FUSED_PROJECTORS or (rule == "fira" and projector not in ORTHONORMAL_PROJECTORS):
        return False
    if rule == "galore" or side is None:
        return True
    if side not in ("left", "right"):
        return False
    m, n = shape
    # norm_ratio reduces dim 0 if N.shape[0] < N.shape[1] else 1: left N is r x n, right N is m x r
    return max_rank(group) < n if side == "left" else max_rank(group) <= m
