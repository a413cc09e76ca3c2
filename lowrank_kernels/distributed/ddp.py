"""GaLoreAdamW under DistributedDataParallel: a communication hook that all-reduces projected gradients.

Between two basis refreshes GaLore's update depends on a weight's gradient G only through its
projection R = P^T G ("left"), G Q ("right") or P^T G Q ("full"). So instead of G (m x n), each replica
all-reduces R (r x n, m x r or r x r) and writes back the gradient P R̄ (R̄ Q^T, P R̄ Q^T), whose
projection is the averaged projection: min(m, n) / r times fewer bytes for a "std" weight.

    ddp = DistributedDataParallel(model)
    optimizer = GaLoreAdamW(galore_param_groups(ddp.module, ...), lr=...)
    hook = register_lowrank_comm_hook(ddp, optimizer)
    ...                                    # the ordinary loop: forward, backward, step, zero_grad
    hook.history[-1]                       # bytes this step all-reduced, against plain DDP's

**What is exact.** With Ḡ = (1/W) Σ_i G_i (plain DDP's gradient) the hook computes R̄ = (1/W) Σ_i P^T G_i,
which is P^T Ḡ up to the rounding of a differently ordered sum, and the optimizer then sees
P^T (P R̄) = (P^T P) R̄ = R̄ up to the rounding of P^T P = I (P has orthonormal columns). So weights equal
plain DDP's to fp32 roundoff (not bitwise; the tests check 1e-5 relative after 20 steps). Replicas
stay bit-identical to each other: every rank takes the same decisions (they read the same optimizer
state) and receives the same all-reduce result.

**Which parameters are compressed.** Only those whose next step keeps its basis: a parameter of a
projected group with a basis already, no refresh due (:func:`lowrank_kernels.projection.refresh_due`),
GaLore's own update rule (a group ``update`` other than "galore", e.g. a residual rule, needs all of G),
and a refresh policy that does not read the gradient every step ("converged" does). Everything else
(1-D parameters, plain AdamW groups, refresh steps, rank_policy "energy" at a refresh, first steps) is
all-reduced whole, exactly as DDP's default hook does; a bucket with nothing to compress goes through
that default path unchanged. Gradient accumulation with ``ddp.no_sync()`` works (DDP calls the hook
on the syncing backward only, with the accumulated gradient), so does accumulation without it (the
projection is linear), as do ``find_unused_parameters`` (an unused slot is zero; DDP leaves a globally
unused parameter's grad alone) and mixed dtypes (DDP's buckets hold one dtype each; R is all-reduced in
it, so bf16 weights give bf16-rounded results as plain DDP's bf16 all-reduce does).

**Bases without orthonormal columns** (``projector="random"``, APOLLO's Gaussian P): the hook writes back
P C with C = (P^T P)^-1 R̄ (and (Q^T Q)^-1 on the right; an r x r solve in fp32), whose projection is R̄
again. Seeded and DCT bases are rebuilt from their stored seeds or column numbers, as the optimizer does.

**Consistency.** Registration all-reduces a hash of the optimizer (group options, parameter shapes, step
and refresh counts, ranks) and raises on every rank if the ranks differ: otherwise the ranks would
all-reduce tensors of different sizes, which gloo answers by aborting the process and NCCL by hanging.
Changes made on some ranks only after registration are not detected.

**What p.grad holds afterwards.** For a compressed parameter, the low-rank reconstruction P R̄ (P C for
"random"), not the averaged full gradient (which no rank ever had). ||P R̄||_F = ||R̄||_F since P's columns are
orthonormal, so ``torch.nn.utils.clip_grad_norm_(model.parameters(), c)`` clips by the global norm of
what the optimizer actually uses (projected gradients, plus the full gradients of everything else), and
clipping is exact in that sense: scaling p.grad by s scales R̄ by s. (For "random", ||P C|| is not ||R̄||:
the clipping norm then is that of P C, and scaling still scales R̄ by s.) Clipping by the norm of the full
averaged gradient is impossible with this hook (||Σ G_i|| is not computable from the projections); at a
refresh step p.grad is the full averaged gradient, so the clipped norm changes meaning on those steps.

Layer-wise updates under DDP (:class:`lowrank_kernels.LayerwiseUpdates` with ``model=ddp``) use the same
hook to step each bucket's parameters once that bucket is averaged; compression is on only after
``register_lowrank_comm_hook`` (either order).
"""
# No `from __future__ import annotations`: DDP checks comm_hook's annotations as real types.
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .. import projection
from . import consistency
from ..reference import project, project_back

__all__ = ["register_lowrank_comm_hook", "CommHookState", "StepBytes", "lowrank_numel", "expected_bytes"]

# Refresh policies that read the whole gradient at every step (to decide whether to refresh).
WHOLE_GRADIENT_POLICIES = ("converged",)
# Basis sources whose columns are not orthonormal: APOLLO's Gaussian projection (projection.gaussian_basis).
NOT_ORTHONORMAL = ("random",)


@dataclass
class StepBytes:
    """Bytes of one syncing backward (all buckets): what the hook all-reduced against plain DDP."""

    reduced: int = 0  # everything this hook all-reduced
    plain: int = 0  # what DDP's default hook all-reduces for the same buckets (their buffers)
    projected_reduced: int = 0  # the part of ``reduced`` for parameters of projected groups
    projected_plain: int = 0  # ... and of ``plain``
    compressed: int = 0  # parameters sent as their projection
    buckets: int = 0  # DDP buckets: one all-reduce each (layer-wise steps with find_unused_parameters
    #                   add a small one per bucket, counted in ``reduced``)


class CommHookState:
    """The hook's state (``ddp.register_comm_hook(state, comm_hook)``): its options and byte counts.

    ``history``: one :class:`StepBytes` per syncing backward; ``bytes_reduced`` and ``bytes_plain``:
    totals since registration. ``lowrank``: compress (else DDP's plain all-reduce, counted).
    ``after(bucket, future) -> future``: called once a bucket's all-reduce is launched; may wait for it
    (layer-wise steps).
    """

    def __init__(self, optimizer, process_group):
        self.optimizer = optimizer
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.lowrank = False
        self.after: Optional[Callable] = None
        self.history: list[StepBytes] = []
        self.bytes_reduced = 0
        self.bytes_plain = 0
        self._current = StepBytes()

    def count(self, nbytes: int) -> None:
        """Account for an extra all-reduce issued from ``after`` (it is not part of plain DDP's bytes)."""
        self._current.reduced += nbytes
        self.bytes_reduced += nbytes


def lowrank_numel(shape, rank: int, proj_type: str = "std") -> int:
    """Elements the hook all-reduces for one projected weight of ``shape`` at a step with no refresh."""
    m, n = projection.matrix_shape(torch.Size(shape))
    rows, cols = projection.lowrank_shape(projection.orientation(proj_type, m, n), m, n, rank)
    return rows * cols


def expected_bytes(param_groups) -> StepBytes:
    """The hook's bytes for one step with no refresh due, from the groups' shapes alone (meta tensors
    work): what :attr:`CommHookState.history` records on such a step, bucket count aside. For
    rank_policy "energy" the group's ``rank`` is the upper bound."""
    out = StepBytes()
    for group in param_groups:
        group = {**projection.PROJECTED_DEFAULTS, **group} if "rank" in group else group
        compress = ("rank" in group and group.get("update", "galore") == "galore"
                    and group["refresh_policy"] not in WHOLE_GRADIENT_POLICIES)
        for p in group["params"]:
            if not p.requires_grad:
                continue
            full = p.numel() * p.element_size()
            sent = lowrank_numel(p.shape, group["rank"], group["proj_type"]) * p.element_size() if compress else full
            out.plain += full
            out.reduced += sent
            out.compressed += compress
            if "rank" in group:
                out.projected_plain += full
                out.projected_reduced += sent
    return out


def _refresh_due(state: dict, group: dict, grad2d: torch.Tensor) -> bool:
    """Whether the parameter's next step computes a new basis (so it needs the whole gradient).

    The one place this module depends on how the optimizer counts steps (through
    projection.refresh_due, which reads state["step"]); no step yet means the first refresh is due.
    """
    if "step" not in state:
        return True
    return projection.refresh_due(state, group, grad2d)[0]


def _group_of(optimizer, p: torch.Tensor) -> Optional[dict]:
    where = optimizer._positions().get(p)
    return None if where is None else where[0]


def _basis_for(optimizer, p: torch.Tensor, grad: torch.Tensor):
    """(P, Q) to all-reduce ``p``'s gradient in, or None when its next step needs the whole gradient."""
    group = _group_of(optimizer, p)
    if group is None or "rank" not in group or group.get("update", "galore") != "galore":
        return None
    if group["refresh_policy"] in WHOLE_GRADIENT_POLICIES:
        return None
    state = optimizer.state.get(p)
    if not state:
        return None
    grad2d = grad.reshape(projection.matrix_shape(p.shape))
    if _refresh_due(state, group, grad2d):
        return None
    P, Q = projection.basis_of(state, grad2d)  # seeded ("random") and DCT bases are rebuilt from their keys
    if P is None and Q is None:
        return None
    return P, Q


def _gram_solved(R: torch.Tensor, P: Optional[torch.Tensor], Q: Optional[torch.Tensor]) -> torch.Tensor:
    """C = (P^T P)^-1 R (Q^T Q)^-1 (fp32), so that P^T (P C Q^T) Q = R: for a basis whose columns are not
    orthonormal (NOT_ORTHONORMAL), the optimizer's re-projection of the written-back gradient still reads R̄."""
    C = R.float()
    if P is not None:
        C = torch.linalg.solve(P.float().T @ P.float(), C)
    if Q is not None:
        C = torch.linalg.solve(Q.float().T @ Q.float(), C.T).T
    return C


def comm_hook(state: CommHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` across ranks, sending projections where the next step allows it."""
    buffer = bucket.buffer()
    group = state.process_group
    plan = []  # (gradient view, basis or None, shape of what is sent, in a projected group?, Gram solve?)
    pieces = []  # what is sent for each parameter, flat
    for p, g in zip(bucket.parameters(), bucket.gradients()):
        param_group = _group_of(state.optimizer, p)
        projected = param_group is not None and "rank" in param_group
        basis = _basis_for(state.optimizer, p, g) if state.lowrank and projected else None
        if basis is None:
            piece = g
        else:
            piece = project(g.reshape(projection.matrix_shape(p.shape)), *basis).to(buffer.dtype)
        plan.append((g, basis, piece.shape, projected, projected and param_group["projector"] in NOT_ORTHONORMAL))
        pieces.append(piece.reshape(-1))
    compressed = sum(basis is not None for _, basis, *_ in plan)
    # Nothing to compress: DDP's default hook exactly (in place on the bucket, no copy).
    send = torch.cat(pieces) if compressed else buffer
    _count(state, bucket, plan, send, compressed)
    # Scale before the sum (no fp16 overflow) by 1/W, as DDP's built-in reduction does (its Python
    # allreduce_hook divides by W instead, which rounds differently when W is not a power of 2).
    send.mul_(1.0 / group.size())
    fut = dist.all_reduce(send, group=group, async_op=True).get_future()

    threads = torch.get_num_threads()

    def unpack(fut) -> torch.Tensor:
        flat = fut.value()[0]
        if flat is buffer:
            return buffer
        if flat.device.type == "cpu":
            # This may run in a communication thread, whose OpenMP/MKL thread count is the library
            # default, and CPU GEMMs may round differently with another count: replicas must agree.
            torch.set_num_threads(threads)
        offset = 0
        for g, basis, shape, _, gram in plan:
            chunk = flat[offset: offset + shape.numel()].view(shape)
            offset += shape.numel()
            if basis is None:
                g.copy_(chunk)
            else:  # the gradient whose projection is R̄: P R̄, R̄ Q^T or P R̄ Q^T
                if gram:
                    chunk = _gram_solved(chunk, *basis)
                g.copy_(project_back(chunk.to(g.dtype), *basis, 1.0).view(g.shape))
        return buffer

    fut = fut.then(unpack)
    if state.after is not None:
        fut = state.after(bucket, fut)
    if bucket.is_last():
        state.history.append(state._current)
        state._current = StepBytes()
    return fut


def _count(state: CommHookState, bucket, plan, send: torch.Tensor, compressed: int) -> None:
    size = send.element_size()
    current = state._current
    current.reduced += send.numel() * size
    current.plain += bucket.buffer().numel() * size
    current.compressed += compressed
    current.buckets += 1
    for g, _, shape, projected, _ in plan:
        if projected:
            current.projected_plain += g.numel() * size
            current.projected_reduced += shape.numel() * size
    state.bytes_reduced += send.numel() * size
    state.bytes_plain += bucket.buffer().numel() * size


def _fingerprint(optimizer) -> int:
    """A hash of what decides the hook's all-reduce sizes: each group's options and parameter shapes, and
    each parameter's step count, refresh count and rank."""
    groups = [(consistency.options(g), [tuple(p.shape) for p in g["params"]]) for g in optimizer.param_groups]
    state = [[optimizer.state.get(p, {}).get(k) for k in consistency.STATE_KEYS]
             for g in optimizer.param_groups for p in g["params"]]
    return consistency.fingerprint((groups, state))


def _check_same_everywhere(ddp_model, optimizer) -> None:
    """Raise on every rank if the ranks' optimizers differ (options, shapes, step counts): the hook would
    all-reduce tensors of different sizes, which gloo answers by aborting the process and NCCL by hanging.
    One all-reduce of two integers, at registration only."""
    group = ddp_model.process_group
    h = _fingerprint(optimizer)
    device = next((p.device for p in ddp_model.parameters()), torch.device("cpu"))
    both = torch.tensor([h, -h], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if int(both[0]) != -int(both[1]):
        raise ValueError(
            f"rank {dist.get_rank(group)}: the optimizer differs between the ranks of this DDP model (param "
            "group options, parameter shapes, or optimizer state such as a checkpoint loaded on some ranks "
            "only); give every rank the same optimizer before registering the low-rank communication hook")


def install_comm_hook(ddp_model, optimizer, *, lowrank: Optional[bool] = None,
                      after: Optional[Callable] = None) -> CommHookState:
    """Register :func:`comm_hook` on ``ddp_model`` once, or reconfigure the one registered.

    DDP accepts one communication hook per model, so compression (``lowrank``) and layer-wise steps
    (``after``) share it; None leaves a setting as it is.
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"expected a torch.nn.parallel.DistributedDataParallel model, got {type(ddp_model).__name__}")
    if not hasattr(optimizer, "_positions"):
        raise TypeError(f"{type(optimizer).__name__} is not a lowrank_kernels.GaLoreAdamW")
    state = getattr(ddp_model, "_lowrank_comm_state", None)
    if state is None:
        positions = optimizer._positions()
        if not any(p in positions for p in ddp_model.parameters()):
            raise ValueError("the optimizer holds none of this DDP model's parameters: pass the optimizer "
                             "built from ddp_model.module's parameters")
        _check_same_everywhere(ddp_model, optimizer)
        state = CommHookState(optimizer, ddp_model.process_group)
        ddp_model.register_comm_hook(state, comm_hook)
        ddp_model._lowrank_comm_state = state
    elif state.optimizer is not optimizer:
        raise ValueError("this DDP model's communication hook already serves another optimizer")
    if lowrank is not None:
        state.lowrank = lowrank
    if after is not None:
        state.after = after
    return state


def register_lowrank_comm_hook(ddp_model: DistributedDataParallel, optimizer) -> CommHookState:
    """All-reduce projected gradients instead of full ones on ``ddp_model``; returns the hook's state.

    ``optimizer`` is the model's :class:`lowrank_kernels.GaLoreAdamW`. Call once, before training
    (DDP takes one communication hook per model; with :class:`lowrank_kernels.LayerwiseUpdates` either
    may come first). ``state.history[-1]`` holds the last step's bytes (:class:`StepBytes`). See the
    module docstring for what is exact and what ``p.grad`` holds afterwards.
    """
    return install_comm_hook(ddp_model, optimizer, lowrank=True)
