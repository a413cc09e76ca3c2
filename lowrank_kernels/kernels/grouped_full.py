"""The "full" projection (R = P^T G Q, an r x r R) for many weights: five launches, whatever their number.

The reference's association (reference.project / project_back), each product one grouped launch of the
existing kernels over every weight of the bucket:

1. T = P^T G (r x n)       kernel (a), left, projection only (T in the gradient's dtype)
2. R = T Q, moments, N     kernel (a), right, with the Adam epilogue (R, M, V, N are r x r)
3. Y = P N (m x r)         kernel (b), left, onto a zeroed Y with step size -1: Y = 0 + 1 * (P N), rounded
                           once to the gradient's dtype, as the reference's P @ N
4. W <- W - s (Y Q^T)      kernel (b), right, with the step's scalars (decay after, as always)

plus one zero_ of the Y buffers (views of one allocation). T and Y are scratch the tables own: (r + m)
x r... per weight, i.e. O((m + n) r). G is read once and W read and written once, as in the one-sided
orientations; the other products are small.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import grouped_backproject_update, grouped_project_adam
from ._tables import SCALAR_COLUMNS, problem_hyper, tensor_signature
from .grouped import GroupedTables, _common

__all__ = ["FULL_KEYS", "build_full_tables", "grouped_full_step", "full_tile_configs"]

FULL_KEYS = ("param", "grad", "P", "Q", "exp_avg", "exp_avg_sq", "N")


def _stages(p: dict, T: torch.Tensor, Y: torch.Tensor) -> tuple:
    """The four launches' problems (in each kernel's builder form) of one full problem."""
    return (dict(grad=p["grad"], basis=p["P"], N=T),
            dict(grad=T, basis=p["Q"], exp_avg=p["exp_avg"], exp_avg_sq=p["exp_avg_sq"], N=p["N"]),
            dict(param=Y, basis=p["P"], N=p["N"]),
            dict(param=p["param"], basis=p["Q"], N=Y))


def full_tile_configs(m: int, n: int, r: int, dtype: torch.dtype) -> tuple:
    """The four launches' tile configs for a lone m x n weight of rank r (hashable; see grouped.tile_configs):
    weights sharing them round the same in any launch they share."""
    from .grouped import tile_configs
    return tile_configs("left", m, n, r, dtype)[:1] + tile_configs("right", r, n, r, dtype)[:1] + \
        tile_configs("left", m, r, r, dtype)[1:] + tile_configs("right", m, n, r, dtype)[1:]


def full_signature(problems: list) -> tuple:
    return tuple(tensor_signature(p[k]) for p in problems for k in FULL_KEYS if k != "grad")


@dataclass
class FullTables(GroupedTables):
    """GroupedTables of a "full" bucket (kind "full"): the four launches' tables and the scratch."""
    stages: tuple = ()              # per launch, the problems in its builder's form
    Y_flat: Optional[torch.Tensor] = None
    unit: Optional[torch.Tensor] = None  # (P, 4) scalars of step 3: step size -1, scale 1, no decay

    def matches(self, problems: list) -> bool:
        return full_signature(problems) == self.signature

    def update_grads(self, grads: list) -> bool:
        sig = self.moved_grads(grads)
        if sig is None:
            return False
        grouped_project_adam.refresh_grads(self.kernels["project_t"], "left", self.stages[0], grads)
        self.stages = ([dict(s, grad=g) for s, g in zip(self.stages[0], grads)],) + self.stages[1:]
        self.problems = [dict(p, grad=g) for p, g in zip(self.problems, grads)]
        self.grad_signature = sig
        return True

    def release_grads(self) -> None:
        super().release_grads()
        meta = [p["grad"] for p in self.problems]
        self.stages = ([dict(s, grad=g) for s, g in zip(self.stages[0], meta)],) + self.stages[1:]


def build_full_tables(problems: list, *, fill_sms: bool = False) -> FullTables:
    """Tables for one dtype bucket of full problems: dict(param=W (m x n), grad=G, P (m x r), Q (n x r),
    exp_avg, exp_avg_sq (r x r, any float dtype), N (r x r buffer in the gradient's dtype), [beta1=, beta2=,
    eps=]). ``fill_sms=False`` (default): each launch's tiles follow its largest problem only."""
    device, dtypes = _common(problems, FULL_KEYS)
    for i, p in enumerate(problems):
        if any(p[k].dim() != 2 for k in FULL_KEYS):
            raise ValueError(f"problem {i}: every tensor must be 2-D")
        m, n = p["param"].shape
        r = p["P"].shape[1]
        expected = dict(grad=(m, n), P=(m, r), Q=(n, r), exp_avg=(r, r), exp_avg_sq=(r, r), N=(r, r))
        for k, shape in expected.items():
            if tuple(p[k].shape) != shape:
                raise ValueError(f"problem {i}: {k} has shape {tuple(p[k].shape)}, expected {shape}")
    if problems:
        for k in ("P", "Q", "N"):
            if dtypes[k] != dtypes["grad"]:
                raise TypeError(f"{k} dtype {dtypes[k]} differs from the gradients' {dtypes['grad']}")
    hyper = problem_hyper(problems)
    kernels, stages, Y_flat, unit = {}, ((), (), (), ()), None, None
    if problems:
        dtype, sms = dtypes["grad"], None if fill_sms else 0
        sizes = [p["param"].shape[0] * p["P"].shape[1] for p in problems]
        Y_flat = torch.zeros(sum(sizes), dtype=dtype, device=device)
        Ys = [y.view(p["param"].shape[0], p["P"].shape[1]) for y, p in zip(Y_flat.split(sizes), problems)]
        Ts = [torch.empty(p["P"].shape[1], p["param"].shape[1], dtype=dtype, device=device) for p in problems]
        stages = tuple(map(list, zip(*[_stages(p, T, Y) for p, T, Y in zip(problems, Ts, Ys)])))
        f32 = torch.float32
        kernels["project_t"] = grouped_project_adam.build("left", stages[0], device, dtype, f32, f32, sms,
                                                          adam=False)
        kernels["project_adam"] = grouped_project_adam.build("right", stages[1], device, dtype, dtypes["exp_avg"],
                                                             dtypes["exp_avg_sq"], sms)
        kernels["back_y"] = grouped_backproject_update.build("left", stages[2], device, dtype, dtype, sms)
        kernels["backproject_update"] = grouped_backproject_update.build("right", stages[3], device, dtype,
                                                                         dtypes["param"], sms)
        unit = torch.tensor([[-1.0, 1.0, 0.0, 0.0]] * len(problems), dtype=torch.float32).to(device)
        assert unit.shape[1] == SCALAR_COLUMNS
    return FullTables("full", "full", device, len(problems), full_signature(problems), list(problems), kernels,
                      None if hyper is None else hyper.to(device),
                      tuple((p["grad"].data_ptr(), p["grad"].stride()) for p in problems),
                      stages=stages, Y_flat=Y_flat, unit=unit)


def grouped_full_step(tables: FullTables, scalars: torch.Tensor, *, beta1: Optional[float] = None,
                      beta2: Optional[float] = None, eps: Optional[float] = None,
                      grads: Optional[list] = None) -> None:
    """One step of every full problem: five launches (see the module docstring); never synchronises."""
    if not isinstance(tables, FullTables):
        raise TypeError("grouped_full_step needs tables from build_full_tables")
    hyper = tables.begin_step(scalars, beta1, beta2, eps, grads)
    if hyper is None:
        return
    grouped_project_adam.launch(tables.kernels["project_t"], hyper)
    grouped_project_adam.launch(tables.kernels["project_adam"], hyper)
    tables.Y_flat.zero_()
    grouped_backproject_update.launch(tables.kernels["back_y"], tables.unit)
    grouped_backproject_update.launch(tables.kernels["backproject_update"], scalars)
