"""The whole-model step's launcher API: grouped kernels over device tables, a constant number of launches.

A *bucket* is a list of problems stepped by one launch per kernel. Build its tables once, reuse them while
no tensor they name is reallocated (``tables.signature``/``tables.matches``), and step with device scalars:

    tables = build_projected_tables(problems, "left")   # may synchronise (host -> device copies)
    grouped_projected_step(tables, scalars)             # 2 launches; never synchronises

Projected problems (one side; a bucket shares the gradient dtype, moment dtypes and param dtype; the tile
shape is chosen per orientation, so left and right are separate buckets):
    dict(param=W (m x n), grad=G (m x n, any strides), basis=P (m x r, left) or Q (n x r, right),
         exp_avg=M, exp_avg_sq=V (r x n left, m x r right, any float dtype),
         N=preallocated low-rank buffer of M's shape in the gradient's dtype,
         [beta1=, beta2=, eps=]  optional per-problem Python floats, for every problem or none)
Unprojected problems (one dtype per key; param, grad and moments in one dense layout):
    dict(param=W, grad=G, exp_avg=M, exp_avg_sq=V, [beta1=, beta2=, eps=])

``scalars``: a float32 tensor of shape (num_problems, 4) on the problems' device, row i for problem i:
    column 0: step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)  (reference.adam_step_size)
    column 1: scale (galore's update scale; 1.0 for unprojected problems)
    column 2: lr * weight_decay (0 skips the decay, as the reference does at wd == 0)
    column 3: residual_lr = lr * scale * inactive_lr_scale (rule "frugal"'s signSGD step; 0 otherwise)
The kernels read it when they run, so the caller updates it in place on the device (a CUDA graph replays
with the new values). Per-problem beta1, beta2, eps live in a (num_problems, 5) fp32 device table
[beta1, 1 - beta1, beta2, 1 - beta2, eps] built from the problems (so a bucket may span param groups), or
from the step's beta1/beta2/eps keywords (one table per distinct triple, built on first use: warm up before
capturing a graph).

Update rules (``build_projected_tables(..., rule=)``, one per bucket; lowrank_kernels.update_rules):
    "galore"       kernel (a), kernel (b): three passes over m x n (read G; read W, write W)
    "fira"         kernel (a) also writes R and the norm partials (sums of squares of N and R along the
                   rank axis per tile, of G's channels from the GEMM's own loads); kernel (s)
                   (grouped_rule_scales.py, one small program per problem) turns them into the channel
                   factors ratio / limiter and the new limiter norm, ||S|| in closed form; kernel (b)
                   back-projects N and R together and adds f (G - s P R): four passes (G read twice)
    "frugal"       kernel (a) also writes R; kernel (b) applies residual_lr * sign(G - P R) first, then
                   the GaLore update (scalars column 3): four passes
    "apollo"(-mini) kernel (a) writes the norm partials; kernel (s); kernel (b) without a GEMM: W -= step
                   * f * G (channel or tensor factor, sqrt(scale) folded in): four passes
No fifth pass: the norms come from small partials. Limiting rules carry each problem's ``limiter_norm``
(its state tensor, written by kernel (s)) and whether it holds a previous norm (``set_has_previous``).

"full" projections (P and Q) have their own builder: kernels/grouped_full.py (five launches per bucket).

Tile configs: a launch's tiles follow its largest problem and, on a GPU, shrink until the grid covers the
SMs, so a problem's rounding (the GEMM's reduction order) can depend on the other problems in its launch.
``build_projected_tables(..., fill_sms=False)`` keeps only the first rule; a caller that groups problems by
``tile_configs`` then gets, for each problem, its own config in every launch, whatever else it holds (the
optimizer's layer-wise steps stay bit-identical to whole-model ones).

Gradients: the tables start from the problems' ``grad``; if gradients are reallocated between steps (as
``zero_grad(set_to_none=True)`` does), pass ``grads=[...]`` (problem order) to the step: their addresses
are compared with the tables' and, if any changed, copied to the device without blocking the host. Under
CUDA graph capture gradients are static: do not pass new ones.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..quant import QUANT_KEYS
from . import _launch, grouped_backproject_update, grouped_project_adam, grouped_rule_scales, multi_tensor_adamw
from ._tables import check_problems, check_scalars, common_dtype, hyper_rows, problem_hyper, \
    tensor_signature

__all__ = ["GroupedTables", "build_projected_tables", "grouped_projected_step", "build_adamw_tables",
           "grouped_adamw_step", "projected_signature", "adamw_signature", "tile_configs"]

PROJECTED_KEYS = ("param", "grad", "basis", "exp_avg", "exp_avg_sq", "N")
ADAMW_KEYS = ("param", "grad", "exp_avg", "exp_avg_sq")
SIDES = ("left", "right")
MOMENTS = ("exp_avg", "exp_avg_sq")


@functools.lru_cache(maxsize=4096)
def tile_configs(side: str, m: int, n: int, r: int, dtype: torch.dtype) -> tuple:
    """Both kernels' tile configs (hashable) for a lone m x n problem of rank r in a ``fill_sms=False``
    launch. Problems sharing them share them in any such launch (see the module docstring)."""
    cpu = torch.device("cpu")  # with sms=0 the device is not consulted
    return tuple(tuple(sorted(_launch.gemm_config(*dims(side, m, n, r), dtype, cpu, sms=0).items()))
                 for dims in (grouped_project_adam.gemm_dims, grouped_backproject_update.gemm_dims))


def projected_signature(problems: list) -> tuple:
    """What the tables depend on besides gradients: every tensor's address, shape, strides and dtype."""
    return tuple(tensor_signature(p[k]) for p in problems for k in PROJECTED_KEYS + ("limiter_norm",) + QUANT_KEYS
                 if k != "grad" and p.get(k) is not None)


def adamw_signature(problems: list) -> tuple:
    return tuple(tensor_signature(p[k]) for p in problems for k in ADAMW_KEYS if k != "grad")


@dataclass
class GroupedTables:
    """A bucket's device tables; built once, reused while ``matches(problems)`` holds."""
    kind: str                       # "projected" or "adamw"
    side: Optional[str]             # "left"/"right" for projected buckets
    device: torch.device
    num_problems: int
    signature: tuple                # projected_signature / adamw_signature at build time
    problems: list                  # the problems (keeps every tensor the tables point at alive)
    kernels: dict                   # kernel name -> KernelTable
    hyper: Optional[torch.Tensor]   # (P, 5) fp32 per-problem table, if the problems carry beta1/beta2/eps
    grad_signature: tuple = ()
    rule: str = "galore"            # the projected problems' update rule (update_rules' names)
    _uniform_hyper: dict = field(default_factory=dict)

    def matches(self, problems: list) -> bool:
        """Are these tables still valid for ``problems``? (Cheap: addresses, shapes, strides; no sync.)"""
        sig = projected_signature(problems) if self.kind == "projected" else adamw_signature(problems)
        return sig == self.signature

    def moved_grads(self, grads: list, contiguous: bool = False) -> Optional[tuple]:
        """The gradients' (address, strides) signature if any moved since the tables last pointed at them,
        else None; each new gradient is checked against the tables' (shape, dtype, device; ``contiguous``)."""
        if len(grads) != self.num_problems:
            raise ValueError(f"expected {self.num_problems} gradients, got {len(grads)}")
        sig = tuple((g.data_ptr(), g.stride()) for g in grads)
        if sig == self.grad_signature:
            return None
        for i, (p, g) in enumerate(zip(self.problems, grads)):
            if (tuple(g.shape) != tuple(p["grad"].shape) or g.dtype != p["grad"].dtype or g.device != self.device
                    or (contiguous and not g.is_contiguous())):
                raise ValueError(f"problem {i}: new gradient {g.dtype} {tuple(g.shape)} on {g.device} differs "
                                 f"from the tables' {p['grad'].dtype} {tuple(p['grad'].shape)} on {self.device}"
                                 + (" or is not contiguous" if contiguous else ""))
        return sig

    def update_grads(self, grads: list) -> bool:
        """Point the tables at ``grads`` (problem order) if any moved; True if the tables changed."""
        sig = self.moved_grads(grads)
        if sig is None:
            return False
        if self.kind == "projected":
            grouped_project_adam.refresh_grads(self.kernels["project_adam"], self.side, self.problems, grads)
            if self.rule != "galore":  # the rules read G again in the back-projection kernel
                grouped_backproject_update.refresh_grads(self.kernels["backproject_update"], self.side,
                                                         self.problems, grads)
        else:
            multi_tensor_adamw.refresh_grads(self.kernels["adamw"], self.problems, grads)
        self.problems = [dict(p, grad=g) for p, g in zip(self.problems, grads)]
        self.grad_signature = sig
        return True

    def release_grads(self) -> None:
        """Drop the references to the gradients (keeping their shapes, dtypes and strides) so that
        ``zero_grad(set_to_none=True)`` or a layer-wise step frees them; the next step must pass ``grads``.
        The tables keep the addresses: a new gradient at the same address needs no rewrite."""
        self.problems = [dict(p, grad=torch.empty_strided(p["grad"].shape, p["grad"].stride(),
                                                           dtype=p["grad"].dtype, device="meta"))
                         for p in self.problems]

    def set_hyper(self, values: list) -> None:
        """Rewrite the per-problem (beta1, beta2, eps) triples (problem order) in place, without blocking the
        host, so a captured CUDA graph replays with them."""
        if self.hyper is None or len(values) != self.num_problems:
            raise ValueError("set_hyper needs tables built with per-problem beta1, beta2, eps, and one triple "
                             "per problem")
        rows = hyper_rows(values)
        self.hyper.copy_(rows.pin_memory() if self.hyper.is_cuda else rows, non_blocking=True)

    def set_has_previous(self, flags: list) -> None:
        """The limiting rules (fira; apollo unless disable_nl): which problems' ``limiter_norm`` holds an
        earlier step's norm (problem order; without one the limiter only records). Rewritten in place
        without blocking the host."""
        if "rule_scales" not in self.kernels or len(flags) != self.num_problems:
            raise ValueError("set_has_previous needs tables of a limiting rule and one flag per problem")
        grouped_rule_scales.set_has_previous(self.kernels["rule_scales"], flags)

    def begin_step(self, scalars: torch.Tensor, beta1, beta2, eps, grads: Optional[list]) -> Optional[torch.Tensor]:
        """A step's common start: check ``scalars``, pick the betas/eps table, re-point moved ``grads``;
        returns that table, or None when there is nothing to launch."""
        check_scalars(scalars, self.num_problems, self.device)
        hyper = self.hyper_table(beta1, beta2, eps)
        if grads is not None:
            self.update_grads(grads)
        return hyper if self.num_problems else None

    def hyper_table(self, beta1, beta2, eps) -> torch.Tensor:
        given = [x is not None for x in (beta1, beta2, eps)]
        if any(given) and not all(given):
            raise ValueError("pass beta1, beta2 and eps together, or none of them")
        if all(given):
            if self.hyper is not None:
                raise ValueError("these tables carry per-problem beta1, beta2, eps; do not pass them to the step")
            key = (float(beta1), float(beta2), float(eps))
            if key not in self._uniform_hyper:  # built once per triple: the copy synchronises
                self._uniform_hyper[key] = hyper_rows([key] * self.num_problems).to(self.device)
            return self._uniform_hyper[key]
        if self.hyper is None:
            raise ValueError("these tables carry no per-problem beta1, beta2, eps: pass them to the step")
        return self.hyper


def _common(problems: list, keys: tuple) -> tuple:
    device = check_problems(problems, keys)
    dtypes = {k: common_dtype(problems, k) for k in keys} if problems else {}
    return device, dtypes


def build_projected_tables(problems: list, side: str, *, fill_sms: bool = True, rule: str = "galore",
                           scale_front: bool = False, limit: bool = True) -> GroupedTables:
    """Tables for one (dtype, orientation) bucket of projected problems (see the module docstring).

    ``fill_sms=False``: tiles follow the largest problem only, never the GPU's SM count (see tile_configs).

    ``rule``: the update rule (lowrank_kernels.update_rules; "galore" by default), one per bucket: "fira",
    "frugal", "apollo", "apollo-mini". Their scratch (R, the norm partials, the channel factors) is
    allocated here. The limiting rules (fira always; apollo and apollo-mini with ``limit``, i.e. not
    disable_nl; ``scale_front`` as apollo-torch's) need each problem's ``limiter_norm`` (a 0-d tensor in
    the gradient's dtype, the parameter's state entry, rewritten by the step) and ``has_previous`` (does it
    hold an earlier step's norm; see GroupedTables.set_has_previous). Fira's closed-form limiter norm
    assumes bases with orthonormal columns (kernels/grouped_rule_scales.py); the rules' channel axis is
    the non-rank one, so r must be below the other dimension (reference.norm_ratio's choice).
    """
    if side not in SIDES:
        raise ValueError(f"side must be 'left' or 'right' (full projections: grouped_full.py); got {side!r}")
    if rule not in grouped_backproject_update.RULES:
        raise ValueError(f"rule must be one of {sorted(grouped_backproject_update.RULES)}; got {rule!r}")
    # int8 moments (uint8 codes + absmax, quant.py): checked by the int8 kernel's builder below
    int8 = bool(problems) and isinstance(problems[0].get("exp_avg"), torch.Tensor) and \
        problems[0]["exp_avg"].dtype == torch.uint8
    device, dtypes = _common(problems, tuple(k for k in PROJECTED_KEYS if not (int8 and k in MOMENTS)))
    if int8:
        dtypes.update(exp_avg=torch.uint8, exp_avg_sq=torch.uint8)
    limiting = rule == "fira" or (rule.startswith("apollo") and limit)
    for i, p in enumerate(problems):
        if any(p[k].dim() != 2 for k in PROJECTED_KEYS):
            raise ValueError(f"problem {i}: every tensor must be 2-D; got shapes "
                             f"{ {k: tuple(p[k].shape) for k in PROJECTED_KEYS} }")
        m, n = p["param"].shape
        r = p["basis"].shape[1]
        _launch.check_shape(f"problem {i}: grad", p["grad"], (m, n))
        _launch.check_shape(f"problem {i}: basis", p["basis"], (m, r) if side == "left" else (n, r))
        low = (r, n) if side == "left" else (m, r)
        for k in ("exp_avg", "exp_avg_sq", "N"):
            _launch.check_shape(f"problem {i}: {k}", p[k], low)
        if rule != "galore" and r >= (n if side == "left" else m):
            raise ValueError(f"problem {i}: rule {rule!r} scales the channels of the non-rank axis; rank {r} "
                             f"must be below {n if side == 'left' else m}")
        norm = p.get("limiter_norm")
        if limiting and (not isinstance(norm, torch.Tensor) or norm.dim() != 0 or norm.dtype != p["grad"].dtype
                         or norm.device != device):
            raise ValueError(f"problem {i}: rule {rule!r} limits the norm growth: it needs limiter_norm, a 0-d "
                             f"{p['grad'].dtype} tensor on {device}")
    if problems:
        for k in ("basis", "N"):
            if dtypes[k] != dtypes["grad"]:
                raise TypeError(f"{k} dtype {dtypes[k]} differs from the gradients' {dtypes['grad']}")
    if int8 and rule != "galore":
        raise ValueError(f"int8 moments run with the galore rule only in the grouped kernels; got rule {rule!r}")
    hyper = problem_hyper(problems)
    kernels = {}
    if problems:
        sms = None if fill_sms else 0
        if rule != "galore":
            problems = _with_scratch(problems, side, rule, device, dtypes["grad"], sms)
        norms = rule in ("fira", "apollo", "apollo-mini")
        if int8:
            from . import grouped_int8_adam  # (it builds on this module's GroupedTables)
            # Moments as int8 codes (bitsandbytes' blocks of 256 flattened entries, which no GEMM tile
            # aligns with): the projection writes R to a scratch buffer, one grouped int8 launch updates the
            # codes in bitsandbytes' order and writes N, then the back-projection as for GaLore.
            problems = [dict(p, R=torch.empty(p["N"].shape, dtype=p["N"].dtype, device=device)) for p in problems]
            kernels["project_adam"] = grouped_project_adam.build(
                side, [dict(p, N=p["R"]) for p in problems], device, dtypes["grad"], torch.float32,
                torch.float32, sms, adam=False)
            kernels["int8_adam"] = grouped_int8_adam.build_int8_tables(
                [{k: p[k] for k in ("R", "N") + grouped_int8_adam.STATE_KEYS} for p in problems],
                "projected").kernels["int8_adam"]
        else:
            kernels["project_adam"] = grouped_project_adam.build(
                side, problems, device, dtypes["grad"], dtypes["exp_avg"], dtypes["exp_avg_sq"], sms,
                store_r=rule in ("fira", "frugal"), norms=norms, gnorm=norms)
        if norms:
            kernels["rule_scales"] = grouped_rule_scales.build(
                problems, device, dtypes["grad"], rule="fira" if rule == "fira" else "apollo",
                tensorwise=rule == "apollo-mini", limit=limiting, scale_front=scale_front)
        kernels["backproject_update"] = grouped_backproject_update.build(
            side, problems, device, dtypes["grad"], dtypes["param"], sms, rule=rule,
            tensorwise=rule == "apollo-mini")
    return GroupedTables("projected", side, device, len(problems), projected_signature(problems), list(problems),
                         kernels, None if hyper is None else hyper.to(device),
                         tuple((p["grad"].data_ptr(), p["grad"].stride()) for p in problems), rule)


def _with_scratch(problems: list, side: str, rule: str, device, dtype, sms) -> list:
    """The problems with the rule's scratch buffers: R (fira, frugal), the norm partials and the factors
    (fira, apollo); sized by the projection kernel's tile config."""
    cfg = grouped_project_adam.config(side, problems, dtype, device, sms)
    out = []
    for p in problems:
        q = dict(p)
        if rule in ("fira", "frugal"):
            q["R"] = torch.empty_like(p["N"])
        if rule != "frugal":
            T, C = grouped_project_adam.work_shape(side, *p["grad"].shape, p["basis"].shape[1], cfg)
            q.update(T=T, C=C, work=torch.zeros((2 * T + 1) * C, dtype=torch.float32, device=device),
                     factor=torch.zeros(1 if rule == "apollo-mini" else C, dtype=torch.float32, device=device))
        out.append(q)
    return out


def grouped_projected_step(tables: GroupedTables, scalars: torch.Tensor, *, beta1: Optional[float] = None,
                           beta2: Optional[float] = None, eps: Optional[float] = None,
                           grads: Optional[list] = None) -> None:
    """One projected step of every problem: one grouped projection+Adam launch (moments updated in place,
    N written), then one grouped back-projection+update launch (params updated in place).

    Reads ``scalars`` (see the module docstring) on the device; never synchronises the host.
    """
    if tables.kind != "projected":
        raise TypeError("grouped_projected_step needs tables from build_projected_tables")
    hyper = tables.begin_step(scalars, beta1, beta2, eps, grads)
    if hyper is None:
        return
    grouped_project_adam.launch(tables.kernels["project_adam"], hyper)
    if "int8_adam" in tables.kernels:
        from . import grouped_int8_adam
        grouped_int8_adam.launch(tables.kernels["int8_adam"], hyper)
    if "rule_scales" in tables.kernels:
        grouped_rule_scales.launch(tables.kernels["rule_scales"], scalars)
    grouped_backproject_update.launch(tables.kernels["backproject_update"], scalars)


def build_adamw_tables(problems: list) -> GroupedTables:
    """Tables for one dtype bucket of unprojected problems (param, grad, exp_avg, exp_avg_sq)."""
    device, dtypes = _common(problems, ADAMW_KEYS)
    for i, p in enumerate(problems):
        multi_tensor_adamw.check_layout(i, p["param"], p["grad"], p["exp_avg"], p["exp_avg_sq"])
    hyper = problem_hyper(problems)
    kernels = {"adamw": multi_tensor_adamw.build(problems, device, dtypes)} if problems else {}
    return GroupedTables("adamw", None, device, len(problems), adamw_signature(problems), list(problems),
                         kernels, None if hyper is None else hyper.to(device),
                         tuple((p["grad"].data_ptr(), p["grad"].stride()) for p in problems))


def grouped_adamw_step(tables: GroupedTables, scalars: torch.Tensor, *, beta1: Optional[float] = None,
                       beta2: Optional[float] = None, eps: Optional[float] = None,
                       grads: Optional[list] = None) -> None:
    """One AdamW step of every problem in one launch, exactly reference.galore_step with P = Q = None."""
    if tables.kind != "adamw":
        raise TypeError("grouped_adamw_step needs tables from build_adamw_tables")
    hyper = tables.begin_step(scalars, beta1, beta2, eps, grads)
    if hyper is None:
        return
    multi_tensor_adamw.launch(tables.kernels["adamw"], hyper, scalars)
