"""GaLoreAdamW on FSDP2 (``torch.distributed.fsdp.fully_shard``) models: each rank steps its own rows.

FSDP2 shards a parameter and its gradient by rows: DTensors with placement ``Shard(0)`` on a 1-D device
mesh. Rank i holds rows I_i of the m x n matrix (torch.chunk's split: ceil(m/W) rows per rank, so the
last ranks may hold fewer rows or none). :class:`~lowrank_kernels.GaLoreAdamW` hands such parameters to
:func:`plan_param` and :func:`step_param`; no weight or gradient is ever gathered.

**Step** (collectives per parameter; W ranks, fp32 partial sums):

* right projection, R = G Q (Q n x r, replicated): rows are independent, so each rank runs the ordinary
  (fused) step on its rows; the moments (m x r) are sharded like the weight. No communication.
* left projection, R = P^T G (P m x r, rows sharded like G): R = sum_i P_i^T G_i is an r x n partial
  sum, all-reduced; the moments (r x n) are replicated, identical on every rank; each rank updates its
  rows W_i -= a P_i N. One all-reduce of r x n per step. A reduce-scatter into column-sharded moments
  plus an all-gather of N would move the same bytes and divide the moments' memory by W; the all-reduce
  is kept because it is simpler and r x n is small next to the weight's m x n.
* "full", R = P^T G Q: one all-reduce of r x r.
* unprojected parameters: plain AdamW on the local shard, no communication.

**Refresh**: the one-process randomized SVD code itself (``linalg._rsvd_single``, ``svd_from_range``,
``projection._warm_source``) runs on :class:`ShardedRows`, a linear operator for the row-sharded
gradient whose products with replicated matrices return replicated matrices:

* ``A @ X`` (X n x w): local rows G_i X, then an all-gather of the m x w sketch;
* ``X @ A`` (X w x m): local X[:, I_i] G_i, then an all-reduce of the w x n partial sum;
* and the same for ``A.T``. ``A.float().double().square().sum()`` (the energy rank policy's ||G||_F^2)
  is a local sum and a scalar all-reduce.

Everything else (the QRs of m x w sketches, the SVD of the small w x n matrix, the rank choice) runs
on identical replicated inputs, so every rank ends with the same basis bit for bit, and it equals the
one-process rsvd with the same seed (the same test matrix, the same sequence of QRs, hence the same
singular-vector signs) up to the roundoff of the reductions. Per refresh, with w = min(r + oversample,
min(m, n)) and q = 2 power iterations: q + 1 all-gathers of m x w, q + 1 all-reduces of n x w, an
all-gather of the old left basis (m x r) when a rule reads it (:func:`needs_old_left`), and scalars;
never the m x n gradient (:func:`collective_volume` counts them; tests/test_fsdp.py checks the count).
The warm start ("warm") needs one iteration instead of two and no fresh sketch of the old side. ``projector="svd"`` (exact, galore-identical) is refused:
DTensor's own SVD all-gathers the whole gradient on every rank.

**State** (all tensors are DTensors, so ``torch.distributed.checkpoint`` and
``get_optimizer_state_dict``/``set_optimizer_state_dict`` handle them, flattened or not):
``proj_left`` Shard(0) (m x R), ``proj_right`` Replicate (n x R), moments Shard(0) (right, m x R) or
Replicate (left r x n, full r x r), where R = the group's largest rank (``rank``, or ``max_rank`` under
the energy policy). The current rank r (``state["rank"]``) uses the leading r columns; the rest are
zero. Fixed shapes and a fixed set of keys from the first step on (``moment_start``; ``gap``/``streak``
under the lazy policy) are what DCP needs: it loads into the tensors and keys of a freshly initialised
optimizer. A checkpoint loads on the same or another world size: DCP re-chunks Shard(0) tensors.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .. import projection, reference
from . import consistency
from ..backends import step_function
from ..linalg import _rsvd_single
from ..projection import (MOMENT_KEYS, MOMENT_RULES, OVERSAMPLE, REFRESH_POLICIES, STATE_DTYPES,
                          lowrank_shape, matrix_shape, max_rank, orientation)
from ..reference import adam_step_size

__all__ = ["is_dtensor", "ShardedRows", "plan_param", "step_param", "collective_volume", "CollectiveLog"]

NITER = 2  # power iterations of lowrank_kernels.rsvd by default, as the one-process "rsvd" projector runs it


def is_dtensor(t) -> bool:
    """Is ``t`` a DTensor? Free when torch.distributed.tensor was never imported (then none exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


# ---- collectives (through DTensor, so torch's CommDebugMode sees them) --------------------------------
def _contiguous_stride(shape) -> tuple:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(int(d), 1)
    return tuple(reversed(stride))


def _all_reduce(t: torch.Tensor, mesh) -> torch.Tensor:
    """The sum over ranks of ``t``, identical on every rank (Partial -> Replicate: one all-reduce)."""
    from torch.distributed.tensor import DTensor, Partial
    return DTensor.from_local(t.contiguous(), mesh, [Partial()], run_check=False).full_tensor()


def _gather_rows(t: torch.Tensor, mesh, m: int) -> torch.Tensor:
    """The m-row matrix whose rows are split over ranks as FSDP2 splits them (one all-gather)."""
    from torch.distributed.tensor import DTensor, Shard
    shape = (m, *t.shape[1:])
    return DTensor.from_local(t.contiguous(), mesh, [Shard(0)], run_check=False, shape=shape,
                              stride=_contiguous_stride(shape)).full_tensor()


def row_range(m: int, mesh) -> tuple[int, int]:
    """[start, stop) of this rank's rows of an m-row Shard(0) tensor: torch.chunk's split, as FSDP2's."""
    chunk = -(-m // mesh.size())
    start = min(mesh.get_local_rank() * chunk, m)
    return start, min(start + chunk, m)


class ShardedRows:
    """An m x n matrix whose rows are split over a 1-D mesh (``local`` holds this rank's), or its transpose.

    It implements exactly the operations that linalg's range finder and projection.compute_basis apply
    to a gradient, each returning a replicated (identical on every rank) plain tensor:
    ``A @ X`` and ``X @ A`` with replicated X, ``A.T``, ``.shape``, ``.dtype``, ``.device``, the
    elementwise ``.float()``, ``.double()``, ``.square()`` and the global ``.sum()``. A new operation in
    that code fails here loudly (AttributeError / TypeError) rather than silently gathering G.
    """

    def __init__(self, local: torch.Tensor, m: int, mesh, transposed: bool = False):
        start, stop = row_range(m, mesh)
        if local.dim() != 2 or local.shape[0] != stop - start:
            raise RuntimeError(f"rank {mesh.get_local_rank()} holds a {tuple(local.shape)} shard of {m} rows; "
                               f"expected rows [{start}, {stop}) (torch.chunk's split, as FSDP2 shards)")
        self.local, self.m, self.mesh, self.transposed = local, m, mesh, transposed
        self.rows = slice(start, stop)

    @property
    def shape(self) -> torch.Size:
        n = self.local.shape[1]
        return torch.Size((n, self.m) if self.transposed else (self.m, n))

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def T(self) -> "ShardedRows":
        return ShardedRows(self.local, self.m, self.mesh, not self.transposed)

    def _map(self, fn: Callable) -> "ShardedRows":
        return ShardedRows(fn(self.local), self.m, self.mesh, self.transposed)

    def float(self) -> "ShardedRows":
        return self._map(torch.Tensor.float)

    def double(self) -> "ShardedRows":
        return self._map(torch.Tensor.double)

    def square(self) -> "ShardedRows":
        return self._map(torch.Tensor.square)

    def sum(self) -> torch.Tensor:
        return _all_reduce(self.local.sum().reshape(1), self.mesh)[0]

    def __matmul__(self, X: torch.Tensor) -> torch.Tensor:
        if self.transposed:  # G^T X = sum_i G_i^T X[I_i]: an n x w partial sum
            return _all_reduce(self.local.T @ X[self.rows], self.mesh)
        return _gather_rows(self.local @ X, self.mesh, self.m)  # G X: local rows of an m x w sketch

    def __rmatmul__(self, X: torch.Tensor) -> torch.Tensor:
        if self.transposed:  # X G^T = (G X^T)^T: local rows of an m x w sketch
            return _gather_rows(self.local @ X.T, self.mesh, self.m).T
        return _all_reduce(X[:, self.rows] @ self.local, self.mesh)  # X G = sum_i X[:, I_i] G_i


# ---- basis sources on shards: the one-process code on a ShardedRows -----------------------------------
def _sharded_rsvd(A, k, seed, side, previous):
    return _rsvd_single(A, k, OVERSAMPLE, NITER, seed)  # what lowrank_kernels.rsvd's PyTorch kernel runs


def _sharded_warm(A, k, seed, side, previous):
    if previous.get("proj_right" if side == "right" else "proj_left") is None:
        return _sharded_rsvd(A, k, seed, side, previous)  # _warm_source would call the rsvd op here
    return projection._warm_source(A, k, seed, side, previous)


SHARDED_SOURCES = {"rsvd": _sharded_rsvd, "warm": _sharded_warm}
SHARDED_REFRESH_POLICIES = ("fixed", "lazy")


# ---- planning: checks before anything changes (collective, so every rank raises together) -------------
def _mesh_of(p: torch.Tensor, label: Callable[[], str]):
    from torch.distributed.tensor import Shard
    grad = p.grad
    if not is_dtensor(grad):
        raise TypeError(f"{label()} is a DTensor but its gradient is a {type(grad).__name__}")
    mesh = p.device_mesh
    if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or tuple(grad.placements) != (Shard(0),):
        raise NotImplementedError(
            f"{label()}: GaLoreAdamW steps DTensors sharded by rows on a 1-D mesh (fully_shard's default, "
            f"placements (Shard(0),)); got {tuple(p.placements)} (gradient {tuple(grad.placements)}) on a "
            f"{mesh.ndim}-D mesh")
    return mesh


def plan_param(state: dict, group: dict, p: torch.Tensor, label: Callable[[], str]) -> tuple[bool, dict]:
    """The sharded counterpart of GaLoreAdamW._plan_param's projected branch: (refresh due?, updates).

    Raises, on every rank alike, for unsupported layouts and options, and at a refresh for a non-finite
    gradient on any rank or options/state that differ between ranks (one all-reduce of 3 integers), before
    anything is mutated.
    """
    mesh = _mesh_of(p, label)
    if "rank" not in group:
        return False, {}
    if group["projector"] not in SHARDED_SOURCES:
        raise ValueError(
            f"{label()}: projector={group['projector']!r} is not available on FSDP2 shards: the exact SVD needs "
            "the whole gradient on every rank (DTensor's SVD all-gathers it). Use projector='rsvd' (or "
            "'warm'), whose sharded range finder communicates sketches only")
    if group["refresh_policy"] not in SHARDED_REFRESH_POLICIES:
        raise NotImplementedError(f"{label()}: refresh_policy={group['refresh_policy']!r} is not supported on "
                                  f"FSDP2 shards (supported: {SHARDED_REFRESH_POLICIES})")
    grad = p.grad.to_local()
    refresh, updates = projection.refresh_due(state, group, grad)
    if refresh:
        # One all-reduce: the non-finite count, and a check that every rank holds the same options and
        # state for this parameter (h is a 20-bit hash: all h equal iff W * sum(h^2) == sum(h)^2). The first
        # step refreshes everywhere, so options that differ between ranks are caught there, before the
        # ranks' collectives part ways (gloo would abort the process, NCCL hang).
        h = consistency.fingerprint((consistency.options(group), tuple(p.shape),
                                     [state.get(k) for k in consistency.STATE_KEYS]), bits=20)
        check = torch.tensor([0, h, h * h], dtype=torch.int64, device=grad.device)
        check[0] = (~torch.isfinite(grad)).sum()
        bad, total, total_sq = (int(v) for v in _all_reduce(check, mesh))
        if mesh.size() * total_sq != total * total:
            raise ValueError(
                f"{label()}: the optimizer's options or state for this parameter differ between ranks (param "
                "group options, or a checkpoint loaded on some ranks only); nothing was updated on any rank: "
                "give every rank the same optimizer")
        if bad:
            raise RuntimeError(
                f"non-finite gradient in {label()} at a basis refresh (step {state.get('step', 0)}; "
                f"{bad} entries over all ranks); nothing was updated on any rank: skip this batch "
                "(zero_grad) and continue")
    return refresh, updates


# ---- the step ---------------------------------------------------------------------------------------
def _leading(t: torch.Tensor, shape) -> torch.Tensor:
    return t[tuple(slice(0, int(s)) for s in shape)]


def _dtensor(local: torch.Tensor, mesh, shape, sharded: bool):
    from torch.distributed.tensor import DTensor, Replicate, Shard
    return DTensor.from_local(local, mesh, [Shard(0) if sharded else Replicate()], run_check=False,
                              shape=torch.Size(shape), stride=_contiguous_stride(shape))


def _back_project(fn: Callable, weight, N, P, Q, **update) -> None:
    """W_i <- W_i - a (P_i N | P_i N Q^T) with galore's decay, by the backend that ``fn`` belongs to."""
    if fn is reference.galore_step:
        reference.apply_update(weight, reference.project_back(N, P, Q, update["scale"]), update["step_size"],
                               update["lr"], update["weight_decay"])
        return
    from ..kernels.backproject_update import backproject_update
    if Q is None:
        backproject_update(weight, N, P, None, **update)
    else:  # full: the association of kernels.galore_step, (P N) Q^T
        backproject_update(weight, P @ N, None, Q, **update)


def step_param(opt, group: dict, p: torch.Tensor, index: int, refresh: bool, updates: dict) -> None:
    """One step of a DTensor parameter on this rank's rows; GaLoreAdamW._step_param's sharded twin."""
    state = opt.state[p]
    state.update(updates)
    state.setdefault("step", 0)
    mesh = p.device_mesh
    beta1, beta2 = group["betas"]
    lr = float(group["lr"])
    weight, grad = p.to_local(), p.grad.to_local()
    P = Q = side = write_back = None
    scale = 1.0
    if "rank" in group:
        m, n = matrix_shape(p.shape)
        rows = weight.shape[0]
        if weight.dim() > 2:
            grad = grad.reshape(rows, n)
            try:
                weight = weight.view(rows, n)
            except RuntimeError:  # e.g. channels_last conv weight: update a copy, write it back
                write_back, weight = weight, weight.reshape(rows, n).clone()
        side = orientation(group["proj_type"], m, n)
        if refresh:
            _refresh(state, grad, group, side, group["seed"], index, mesh, m)
        r = state["rank"]
        P = state["proj_left"].to_local()[:, :r] if "proj_left" in state else None
        Q = state["proj_right"].to_local()[:, :r] if "proj_right" in state else None
        scale = float(group["scale"])
        shape = lowrank_shape(side, rows, n, r)
    else:
        shape = weight.shape
        if "exp_avg" not in state:
            dtype = STATE_DTYPES[group.get("state_dtype")] or grad.dtype
            for key in MOMENT_KEYS:
                state[key] = _dtensor(torch.zeros(shape, dtype=dtype, device=grad.device), mesh, p.shape, True)
    state["step"] += 1
    moment_steps = state["step"] - state.get("moment_start", 0)
    step_size = adam_step_size(lr, beta1, beta2, moment_steps) if group["correct_bias"] else lr
    M, V = (_leading(state[key].to_local(), shape) for key in MOMENT_KEYS)
    update = dict(step_size=step_size, scale=scale, lr=lr, weight_decay=group["weight_decay"])
    fn = step_function(opt.backend, weight)
    if side in ("left", "full"):
        # fp32 partial sums, as inside one GEMM's accumulator; R then has the gradient's dtype, as there.
        R = _all_reduce(reference.project(grad.float(), P.float(), None if Q is None else Q.float()), mesh)
        N = reference.adam_normalize(R.to(grad.dtype), M, V, beta1, beta2, group["eps"])
        if weight.numel():
            _back_project(fn, weight, N, P, Q, **update)
    elif weight.numel():  # right or unprojected: every row steps on its own
        fn(weight, grad, P, Q, M, V, beta1=beta1, beta2=beta2, eps=group["eps"], **update)
    if write_back is not None:
        write_back.copy_(weight.view_as(write_back))


def needs_old_left(group: dict) -> bool:
    """Does a refresh read the previous left basis (so it is gathered, m x r)? The "rotate" moments rule,
    the "lazy" policy's similarity and the "warm" start do; "keep", "zero" and "fixed" do not."""
    return (group["moments_on_refresh"] == "rotate" or group["refresh_policy"] == "lazy"
            or group["projector"] == "warm")


def _refresh(state: dict, grad2d: torch.Tensor, group: dict, side: str, base_seed: int, index: int, mesh,
             m: int) -> None:
    """projection.refresh on shards: the same basis, moments rule and policy, in fixed-shape DTensors."""
    rows, n = grad2d.shape
    count = state.get("refreshes", 0)
    old = {}
    if "rank" in state:  # the previous basis, replicated in full
        r_old = state["rank"]
        if "proj_left" in state and needs_old_left(group):
            old["proj_left"] = _gather_rows(state["proj_left"].to_local()[:, :r_old], mesh, m)
        if "proj_right" in state:
            old["proj_right"] = state["proj_right"].to_local()[:, :r_old]
    seed = projection.refresh_seed(base_seed, index, count)
    new = projection.compute_basis(ShardedRows(grad2d, m, mesh), side, group, seed, old, sources=SHARDED_SOURCES)
    r = new["rank"]
    if "exp_avg" in state:
        local = {"step": state["step"]}
        local.update({k: _leading(state[k].to_local(), lowrank_shape(side, rows, n, r_old)) for k in MOMENT_KEYS})
        MOMENT_RULES[group["moments_on_refresh"]](local, old, new, lowrank_shape(side, rows, n, r))
        for key in MOMENT_KEYS:
            value = local[key].clone()  # it may be a view of the state tensor zeroed next
            _leading(state[key].to_local().zero_(), value.shape).copy_(value)
        state["moment_start"] = local.get("moment_start", state.get("moment_start", 0))
    else:
        _create_state(state, group, side, grad2d, mesh, m)
    start, stop = row_range(m, mesh)
    for key, part in (("proj_left", slice(start, stop)), ("proj_right", slice(None))):
        if key in new:
            state[key].to_local().zero_()[:, :r].copy_(new[key][part])
    state["rank"] = r
    state["refreshes"] = count + 1
    state["last_refresh"] = state["step"]
    state.pop("proj_norm", None)
    REFRESH_POLICIES[group["refresh_policy"]][1](state, group, old, new)
    if group["refresh_policy"] == "lazy":  # the keys _lazy_after adds later, present from the start for DCP
        state.setdefault("gap", group["update_proj_gap"])
        state.setdefault("streak", 0)


def _create_state(state: dict, group: dict, side: str, grad2d: torch.Tensor, mesh, m: int) -> None:
    """Zero bases and moments at the group's largest rank: fixed shapes for the whole run."""
    rows, n = grad2d.shape
    R = max_rank(group)
    kw = dict(device=grad2d.device)
    if side in ("left", "full"):
        state["proj_left"] = _dtensor(torch.zeros(rows, R, dtype=grad2d.dtype, **kw), mesh, (m, R), True)
    if side in ("right", "full"):
        state["proj_right"] = _dtensor(torch.zeros(n, R, dtype=grad2d.dtype, **kw), mesh, (n, R), False)
    dtype = STATE_DTYPES[group.get("state_dtype")] or grad2d.dtype
    for key in MOMENT_KEYS:
        local = torch.zeros(lowrank_shape(side, rows, n, R), dtype=dtype, **kw)
        state[key] = _dtensor(local, mesh, lowrank_shape(side, m, n, R), side == "right")
    state["moment_start"] = 0


# ---- what the collectives move --------------------------------------------------------------------------
def collective_volume(m: int, n: int, group: dict, world: int, *, first: bool = False) -> dict:
    """Elements in the collectives of one projected m x n parameter, as :class:`CollectiveLog` counts them.

    ``{"step": {op: elements}, "refresh": {op: elements}}``: an ordinary step, and what a refresh adds.
    ``group`` holds the projected group's keys (``rank``; ``proj_type``, ``projector``,
    ``moments_on_refresh``, ``refresh_policy`` default to GaLoreAdamW's, except projector "rsvd"), at a
    fixed rank (the energy policy adds one scalar and changes r); ``first``: the first refresh (no old
    basis). An all-reduce counts its tensor, an all-gather its output, uneven shards padded to
    ceil(m / world) rows per rank as DTensor pads them. Sketch products (see ShardedRows): G X and
    X G^T gather m x c; X G and G^T X all-reduce c x n.
    """
    group = {**projection.PROJECTED_DEFAULTS, "projector": "rsvd", **group}
    r, side, projector = group["rank"], orientation(group["proj_type"], m, n), group["projector"]
    w = min(r + OVERSAMPLE, m, n)
    rows = -(-m // world) * world
    step = {"left": {"all_reduce": r * n}, "full": {"all_reduce": r * r}, "right": {}}[side]
    gathers = reduces = 0
    if projector == "rsvd" or first:  # (q + 1) sketches each way, whichever side is sharded
        gathers, reduces = (NITER + 1) * rows * w, (NITER + 1) * n * w
    elif projector == "warm":  # one iteration from the old basis, padded by `extra` Gaussian columns
        extra = w - min(r, w)
        if side == "right":  # A = G^T: its sketch A Omega is an all-reduce
            gathers, reduces = 2 * rows * w, n * (extra + w)
        else:
            gathers, reduces = rows * (extra + w), 2 * n * w
    else:
        raise ValueError(f"projector {projector!r} has no sharded refresh")
    refresh = {"all_reduce": reduces + 3, "all_gather": gathers}  # + 3: the non-finite count, the rank check
    if side in ("left", "full") and not first and needs_old_left(group):
        refresh["all_gather"] += rows * r
    return {"step": step, "refresh": refresh}


_COLLECTIVE_WORDS = ("reduce", "gather", "scatter", "broadcast", "all_to_all", "alltoall", "send", "recv")


class CollectiveLog(TorchDispatchMode):
    """Records every c10d collective under it: ``calls`` holds (op, elements moved, dtype).

    An all-reduce counts its tensor, an all-gather its output. Used by the tests and bench/bench_fsdp.py
    to check that no collective of an optimizer step moves an m x n tensor.
    """

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(getattr(t, "__name__", "") == "DTensor" for t in types):
            return NotImplemented  # let DTensor desugar into plain collectives first, then see those
        out = func(*args, **kwargs)
        namespace = getattr(func, "namespace", "")
        name = func._overloadpacket.__name__ if hasattr(func, "_overloadpacket") else str(func)
        if namespace in ("_c10d_functional", "c10d") and any(word in name for word in _COLLECTIVE_WORDS):
            tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            op = {"all_gather_into_tensor": "all_gather", "allgather_into_tensor_coalesced": "all_gather",
                  "allreduce_": "all_reduce"}.get(name, name)
            self.calls.append((op, max((t.numel() for t in tensors), default=0),
                               tensors[0].dtype if tensors else None))
        return out

    def totals(self) -> dict:
        out: dict = {}
        for op, count, _ in self.calls:
            out[op] = out.get(op, 0) + count
        return out
