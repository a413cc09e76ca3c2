"""``GaLoreAdamW``: a drop-in for ``galore_torch.GaLoreAdamW`` with safe checkpoints and clear errors."""
from __future__ import annotations

import weakref
from itertools import chain
from typing import Callable, Iterable, NamedTuple, Optional

import torch

from . import cuda_graphs, projection, quant, update_rules
from .backends import BACKENDS, interpreter_on, step_function
from .checkpoint import prepare_load
from .distributed import fsdp
from .engine import StepEngine
from .projection import BASIS_KEYS, STATE_DTYPES
from .reference import adam_step_size
from .validation import (check_hyperparameters, check_projectable, check_state_fits, expected_side,
                         fill_defaults, is_int)

__all__ = ["GaLoreAdamW"]

_NO_STATE: dict = {}  # read-only stand-in for a parameter that has no state yet

# The steps' entry points under torch.compile: never traced, one graph break each. The reason is what
# dynamo's error shows under fullgraph=True, which cannot hold a graph break (README: torch.compile).
_EAGER_REASON = (
    "GaLoreAdamW steps run eagerly (host logic: refresh schedules, SVDs, Python step counts), so a "
    "torch.compile(fullgraph=True) region cannot contain opt.step() or opt.step_param(); compile the model (or "
    "the loss function) with fullgraph=True and call the optimizer outside it, or drop fullgraph=True")
try:
    _EAGER = torch.compiler.disable(reason=_EAGER_REASON)
except TypeError:  # torch before 2.7: no reason argument (the graph break stays, unexplained)
    _EAGER = torch._dynamo.disable


class _Plan(NamedTuple):
    """One parameter's validated step: ``work`` is what ``_step_param`` takes; the rest is for ``_plan``."""
    work: tuple  # (group, param, position, refresh?, state updates)
    restart: bool  # the group's structure changed: clear the state (keeping the step count) first
    recast: Optional[torch.dtype]  # the group's state_dtype changed: the moments' new dtype
    rebase: Optional[torch.dtype]  # the gradient's dtype differs from the stored basis': the basis' new dtype
    check: Optional[str]  # why its gradient must be finite (None: no check)
    label: object  # str() names the parameter
    step: int


class _Label:
    """A parameter's name for error messages, formatted only when a message needs it (planning runs for
    every parameter at every step)."""
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], str]):
        self.make = make

    def __str__(self) -> str:
        return self.make()


class _Record:
    """What planning keeps about one parameter between steps (derived data: rebuilt when the groups change).

    ``checked`` is the fingerprint under which the checks that read only the group, the backend and the
    shapes, dtypes, devices and layouts of the parameter and its gradient last passed (None: never);
    ``side`` the orientation they gave. Everything else (gradient present?, state fits?, refresh due?) is
    checked at every step.
    """
    __slots__ = ("p", "group", "i", "index", "label", "dtensor", "checked", "side")

    def __init__(self, opt, group: dict, i: int, p: torch.Tensor, index: int):
        self.p, self.group, self.i, self.index = p, group, i, index
        owner = weakref.ref(opt)  # not opt itself: the optimizer holds its records, and a cycle would keep
        self.label = _Label(lambda: owner()._param_label(group, i, p))  # its state alive after `del opt`
        self.dtensor = fsdp.is_dtensor(p)  # a tensor's Python class never changes
        self.checked = self.side = None


_SCALARS = (int, float, str, bool, type(None), torch.dtype)


def _group_signature(group: dict) -> Optional[tuple]:
    """Every hyperparameter of ``group`` as a comparable value (types included: 1 is not True), or None
    when a value is not a plain scalar or a sequence of them (a tensor lr): such a group is checked at
    every step. Two groups with equal signatures pass and fail the same checks."""
    items = []
    for key, value in group.items():
        if key == "params":
            continue
        if isinstance(value, (tuple, list)):
            if not all(type(v) in _SCALARS for v in value):
                return None
            value = (type(value), tuple((type(v), v) for v in value))
        elif type(value) not in _SCALARS:
            return None
        else:
            value = (type(value), value)
        items.append((key, value))
    return tuple(items)


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore gradient projection, numerically identical to ``galore_torch.GaLoreAdamW``.

    A param group that carries ``rank`` is projected; its keys (defaults in brackets):

    * ``rank``: the projection rank r, ``1 <= r < min(m, n)`` for every weight in the group.
    * ``update_proj_gap`` [200]: the basis is recomputed from the gradient at steps 0, T, 2T, ...
    * ``scale`` [0.25]: multiplies the back-projected update (the effective lr is ``lr * scale``).
    * ``proj_type`` ["std"]: "std" projects the smaller side, "reverse_std" the larger, or "left",
      "right", "full" (both sides).
    * ``projector`` ["svd"]: "svd" is the exact fp32 SVD (galore-identical); "rsvd" a randomized SVD
      (:func:`lowrank_kernels.rsvd`, oversample 10, 2 power iterations), seeded from ``seed``, the
      parameter's position and the refresh count, so replicas and resumed runs agree; "warm" one
      subspace iteration started from the previous basis (rsvd at the first refresh).

    Strategy keys (defaults reproduce galore-torch; see :mod:`lowrank_kernels.projection`):

    * ``rank_policy`` ["fixed"]: or "energy": at each refresh the smallest r with
      ``||G - G_r||_F <= energy_threshold * ||G||_F`` [0.2], clamped to [``min_rank`` (1), ``max_rank``
      (None: ``rank``)], from the randomized/exact singular values, no extra SVD.
    * ``moments_on_refresh`` ["keep"]: "zero" (restart moments and their bias correction) or "rotate"
      (M <- (P_new^T P_old) M, V <- (P_new^T P_old)^2 V elementwise-squared). All handle rank changes.
    * ``refresh_policy`` ["fixed"]: "lazy" (after ``patience`` [2] consecutive refreshes whose subspace
      similarity is >= ``similarity_threshold`` [0.4], the gap grows by ``gap_growth`` [2]) or
      "converged" (refresh when ||R|| changes by less than ``convergence_tol`` [0.05] relative between
      steps, at most ``update_proj_gap`` steps apart; one extra projection and host sync per step).

    * ``update`` ["galore"]: the update rule, or "fira", "frugal" (its residual's signSGD lr is
      ``lr * scale * inactive_lr_scale`` [1.0]), "apollo", "apollo-mini" (``scale_front``, ``disable_nl``
      [False]): :mod:`lowrank_kernels.update_rules`. ``projector`` also takes "random" (APOLLO's seeded
      Gaussian; the state keeps the seed) and "dct" (DCT-II columns; the state keeps their numbers).

    Any group may set ``state_dtype`` [None]: the moments' dtype; None keeps the gradient's dtype
    (galore-torch), or "float32", "bfloat16", "float16", or "int8" (bitsandbytes' blockwise 8-bit
    moments, :mod:`lowrank_kernels.quant`); and ``check_finite`` [the optimizer's argument, False]: refuse
    a step whose gradient holds a NaN or Inf at any step, not only at a refresh (one host
    synchronisation per step).

    Groups without ``rank`` are plain AdamW under galore-torch's rules: bias correction folded into the
    step size, ``eps`` added to the uncorrected sqrt(v), decoupled weight decay applied after the update.
    Every backend computes N = M / (sqrt(V) + eps) in fp32 from the moments as stored and rounds it once
    to the gradient's dtype (for fp32 moments exactly galore-torch's arithmetic).

    Projected parameters must have at least 2 dimensions; an N-D weight is optimised as the matrix
    ``(shape[0], prod(shape[1:]))`` (a conv weight: one row per output channel).

    ``backend``: "auto" [default] (the fused kernels for CUDA tensors of fp32/bf16/fp16 when triton
    imports, else the reference), "torch" (the reference, any device and dtype) or "triton" (the fused
    kernels; CUDA tensors, or CPU under ``TRITON_INTERPRET=1``; anything else is refused at planning).

    A step validates every group, parameter and gradient before it changes anything: hyperparameters
    (also those edited in ``param_groups`` since, e.g. a rank at or above min(m, n)), the backend, sparse,
    complex or mis-shaped gradients, parameters resized since their state was made, and non-finite
    gradients at a basis refresh (at every step with ``check_finite``) raise, leaving weights, moments,
    bases and step counts untouched, so the caller can skip the batch and carry on. A policy switched in
    ``param_groups`` gets its keys' defaults; a weight whose structure an edit changes (``proj_type`` now
    projects the other side, ``rank`` added or removed) restarts at its next step: new basis, fresh
    moments and bias correction, step count kept.

    ``load_state_dict`` validates the whole checkpoint and loads nothing when it refuses it; it converts
    galore-torch checkpoints (:mod:`lowrank_kernels.checkpoint`). ``copy.deepcopy`` and pickling keep
    every public attribute (``backend``).

    ``correct_bias`` and ``no_deprecation_warning`` are accepted for drop-in compatibility with
    galore-torch's constructor; this class emits no deprecation warning.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
        *,
        backend: str = "auto",
        seed: int = 0,
        check_finite: bool = False,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (must be one of {BACKENDS})")
        if not is_int(seed):
            raise ValueError(f"Invalid seed: {seed!r} (must be an integer)")
        self.backend = backend
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        seed=seed, check_finite=check_finite)
        # The arguments first, as torch.optim does: a bad lr or betas is reported as such whatever params is
        # (torch's own error inputs, common_optimizers.py, pass params=None with them).
        check_hyperparameters(dict(defaults))
        super().__init__(params, defaults)

    # ---- pickling and deepcopy ------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """torch.optim pickles only defaults, state and param_groups; keep every public attribute too
        (``backend``), so a deepcopy or an unpickled optimizer steps as the original does. Not instance
        attributes that shadow the class's (an LR scheduler's ``step`` wrapper holds a weak reference to
        THIS optimizer: a copy would step the original, and pickling it fails); torch.optim drops them too."""
        state = super().__getstate__()
        cls = type(self)
        state.update({k: v for k, v in self.__dict__.items() if not k.startswith("_") and not hasattr(cls, k)})
        return state

    def __setstate__(self, state: dict) -> None:
        defaults = state.get("defaults", getattr(self, "defaults", {}))
        had_differentiable = "differentiable" in defaults
        super().__setstate__(state)
        if not had_differentiable:  # torch.optim adds it for its own optimizers; a copy must equal the original
            self.defaults.pop("differentiable", None)

    # ---- groups ---------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group["params"]
        if isinstance(params, set):  # torch.optim's rule: a set has no reproducible order
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the "
                            "ordering of tensors in sets will change between runs. Please use a list instead.")
        # Materialise once: a generator (model.parameters()) must survive the checks below.
        param_group["params"] = params = [params] if isinstance(params, torch.Tensor) else list(params)
        fill_defaults(param_group, self.defaults)
        check_hyperparameters(param_group)
        if "rank" in param_group:
            for i, item in enumerate(params):
                name, p = item if isinstance(item, tuple) else (None, item)
                if isinstance(p, torch.Tensor):  # anything else: torch.optim's TypeError below
                    label = f"parameter {name!r}" if name else f"parameter #{i} of its group"
                    check_projectable(p, projection.max_rank(param_group), f"{label} (shape {tuple(p.shape)})")
        super().add_param_group(param_group)

    # ---- step -----------------------------------------------------------------------------------------
    def _positions(self, param: Optional[torch.Tensor] = None) -> dict:
        """{param: (group, index in group, position over all groups)}, rebuilt when the groups change.

        The position numbers parameters as state_dict does; it seeds rsvd refreshes and names a parameter
        in errors. Cached so that step_param, called once per parameter per step, stays O(1): with
        ``param``, only that parameter's entry is verified (see :meth:`_records`).
        """
        return self._records(param)[0]

    def _records(self, param: Optional[torch.Tensor] = None) -> tuple:
        """(positions, {param: _Record}, [_Record in position order]), rebuilt when the groups change: a
        group added, removed or replaced, or a group's parameters (torch.optim reads ``param_groups`` afresh
        at every step, so a tensor swapped into ``group["params"]`` must be stepped, not the one it replaced).

        Every parameter's identity is compared (O(n), as cheap as the step's own loop), except with
        ``param`` (step_param): then only its own entry is, and a stale one triggers the full comparison.
        """
        groups = self.param_groups
        key = tuple((id(g), len(g["params"])) for g in groups)
        cached = self.__dict__.get("_records_cache")
        if cached is not None and cached[0] == key:
            if param is not None:
                where = cached[2].get(param)
                if where is not None and where[0]["params"][where[1]] is param:
                    return cached[2:]
            # the cache holds every parameter, so an id in it cannot be reused by another tensor
            if cached[1] == tuple(tuple(map(id, g["params"])) for g in groups):
                return cached[2:]
        flat = chain.from_iterable(((g, i, p) for i, p in enumerate(g["params"])) for g in groups)
        positions = {p: (g, i, pos) for pos, (g, i, p) in enumerate(flat)}
        records = {p: _Record(self, g, i, p, pos) for p, (g, i, pos) in positions.items()}
        ids = tuple(tuple(map(id, g["params"])) for g in groups)
        cached = self.__dict__["_records_cache"] = (key, ids, positions, records, list(records.values()))
        return cached[2:]

    def _param_label(self, group: dict, index_in_group: int, p: torch.Tensor) -> str:
        names = group.get("param_names")
        if names:
            return f"parameter {names[index_in_group]!r} (shape {tuple(p.shape)})"
        return f"parameter #{self._positions()[p][2]} (shape {tuple(p.shape)})"

    def _check_group(self, group: dict) -> tuple:
        """A group as edited since construction: fill the keys its choices read, then validate it.

        Returns the token of the group's validated values: the same object while they stay equal (then
        nothing is re-validated: the plan's cache), a new one after any edit.
        """
        signature = _group_signature(group)
        checked = self.__dict__.setdefault("_group_checks", {})
        hit = checked.get(id(group))  # (group, signature, token); the group is held, so its id stays its own
        if signature is not None and hit is not None and hit[0] is group and hit[1] == signature:
            return hit[2]
        trial = dict(group)  # validated with its defaults filled in before the group itself changes
        fill_defaults(trial, self.defaults)
        try:
            check_hyperparameters(trial)
        except ValueError as exc:
            where = next((i for i, g in enumerate(self.param_groups) if g is group), "?")
            raise ValueError(f"{exc} (param group {where}; nothing was updated)") from None
        fill_defaults(group, self.defaults)
        token = object()
        if len(checked) > 4 * len(self.param_groups) + 16:  # groups dropped by load_state_dict
            checked.clear()
        checked[id(group)] = (group, _group_signature(group), token)
        return token

    def _plan_param(self, rec: _Record, token: object, backend_key: tuple) -> Optional[_Plan]:
        """Validate one parameter's step and return its plan (None without a gradient).

        Mutates nothing (but ``rec``'s cache), so an error leaves weights and state exactly as they were.
        The checks that read only the group (``token``), the backend (``backend_key``) and the shapes,
        dtypes, devices and layouts of the parameter and its gradient run when one of those changed since
        they last passed; the rest at every step.
        """
        p = rec.p
        grad = p.grad
        if grad is None:
            return None
        group, label = rec.group, rec.label
        shape = p.shape  # (read once: tensor attributes cost ~0.2 us each, and this runs per parameter)
        if rec.dtensor:  # an FSDP2 shard: its checks need collectives (distributed/fsdp.py)
            if grad.layout is not torch.strided or grad.is_complex() or grad.shape != shape or grad.device != p.device:
                self._refuse_gradient(grad, p, label)
            refresh, updates = fsdp.plan_param(self.state.get(p, {}), group, p, label.__str__)
            return _Plan((group, p, rec.index, refresh, updates), False, None, None, None, label,
                         self.state.get(p, _NO_STATE).get("step", 0))
        fingerprint = (token, backend_key, shape, grad.shape, grad.dtype, grad.layout, grad.device, p.dtype,
                       p.device)
        if fingerprint != rec.checked:
            if grad.layout is not torch.strided or grad.is_complex() or grad.shape != shape or grad.device != p.device:
                self._refuse_gradient(grad, p, label)
            if "rank" in group:
                check_projectable(p, projection.max_rank(group), label)
            if not (p.is_floating_point() and grad.is_floating_point()):  # AdamW's moments need real floats
                raise TypeError(f"{label} has dtype {p.dtype} and a gradient of {grad.dtype}: GaLoreAdamW optimises "
                                "floating-point parameters only; nothing was updated")
            try:
                step_function(self.backend, p, grad)
            except (RuntimeError, TypeError) as exc:
                raise type(exc)(f"{label}: {str(exc).rstrip('.')}; nothing was updated") from None
            rec.side = expected_side(group, shape)
            rec.checked = fingerprint
        state = self.state.get(p, _NO_STATE)  # .get: planning must not create state entries
        made = check_state_fits(state, shape, label)
        if made and "proj_left" not in state and "proj_right" not in state:  # a seed or column numbers
            self._check_regenerated(p, state, label)
        # A parameter whose group changed structure since its state was made (proj_type now projects the
        # other side, rank added or removed) restarts: new basis, fresh moments, bias correction from here.
        restart = made is not False and made != rec.side
        refresh, updates = False, {}
        if rec.side is not None:
            grad2d = grad if len(shape) == 2 else grad.reshape(projection.matrix_shape(shape))
            refresh, updates = projection.refresh_due({} if restart else state, group, grad2d)
        # A NaN/Inf must never reach the SVD: it would fail or return a garbage basis. Elsewhere it would
        # enter the moments for good; check_finite refuses it there too (opt-in: a host sync per step).
        check = "at a basis refresh" if refresh else "(check_finite=True)" if group["check_finite"] else None
        # state_dtype edited since the moments were made: they move to the new dtype (values kept).
        moments = state.get("exp_avg")
        recast = rebase = None
        if moments is not None and not restart:
            want = STATE_DTYPES[group.get("state_dtype")] or grad.dtype
            recast = want if moments.dtype != want else None
            # A basis is stored in the gradient's dtype; gradients that come in another dtype since (a
            # changed grad_dtype, a checkpoint loaded in the parameter's dtype) move it to theirs, as the
            # moments above: the kernels and the reference's products take one dtype.
            basis = state.get("proj_left")
            if basis is None:
                basis = state.get("proj_right")
            rebase = grad.dtype if basis is not None and basis.dtype != grad.dtype else None
        return _Plan((group, p, rec.index, refresh, updates), restart, recast, rebase, check, label,
                     state.get("step", 0))

    def _check_regenerated(self, p: torch.Tensor, state: dict, label) -> None:
        """A "random" or "dct" state keeps no matrix, so its moments (r x n or m x r) still fit a weight
        resized along the projected dimension: the step engine knows what shape it built the basis for."""
        built = self._engine().built_for(p, state)
        if built is not None and tuple(built) != projection.matrix_shape(p.shape):
            raise RuntimeError(
                f"{label}: its optimizer state's basis was made for a {built[0]}x{built[1]} matrix; the "
                "parameter was resized after its state was created. Nothing was updated; to restart this "
                "parameter's optimizer state, `del optimizer.state[param]`")

    @staticmethod
    def _refuse_gradient(grad: torch.Tensor, p: torch.Tensor, label) -> None:
        if grad.is_sparse or grad.layout is not torch.strided:
            raise RuntimeError(f"GaLoreAdamW does not support sparse gradients ({label}); consider SparseAdam")
        if grad.is_complex():
            raise RuntimeError(f"GaLoreAdamW does not support complex gradients ({label})")
        raise RuntimeError(f"the gradient of {label} has shape {tuple(grad.shape)} on {grad.device}; it must "
                           f"match its parameter (on {p.device}); nothing was updated")

    def _plan(self, params: Optional[list] = None) -> list:
        """Validate everything a step will touch before anything changes; return the work list."""
        if params is None:
            tokens = {id(group): self._check_group(group) for group in self.param_groups}
            records = self._records()[2]
        else:  # step_param: O(1) for its one parameter
            by_param = self._records(params[0] if len(params) == 1 else None)[1]
            records = [by_param[p] for p in params]
            tokens = {id(rec.group): self._check_group(rec.group) for rec in records}
        backend_key = (self.backend, interpreter_on() if self.backend == "triton" else None)
        plans = [self._plan_param(rec, tokens[id(rec.group)], backend_key) for rec in records]
        plans = [plan for plan in plans if plan is not None]
        self._check_finite([plan for plan in plans if plan.check])
        for plan in plans:  # only now, with every check passed
            if plan.restart or plan.recast or plan.rebase:
                state = self.state[plan.work[1]]
                if plan.restart:
                    step = state.get("step", 0)
                    state.clear()
                    state.update(step=step, moment_start=step)
                    continue
                if plan.recast:
                    quant.recast(state, plan.recast)
                if plan.rebase:
                    for key in BASIS_KEYS:
                        if key in state:
                            state[key] = state[key].to(plan.rebase)
        return [plan.work for plan in plans]

    @staticmethod
    def _check_finite(plans: list) -> None:
        """One host sync per device for all gradients that must be finite; raise naming the first bad one."""
        by_device: dict = {}
        for plan in plans:
            grad = plan.work[1].grad
            if grad.device.type != "meta":  # meta tensors (sizing state without data) have no values
                by_device.setdefault(grad.device, []).append(plan)
        for device_plans in by_device.values():
            flags = torch.stack([torch.isfinite(plan.work[1].grad).all() for plan in device_plans]).tolist()
            for plan, ok in zip(device_plans, flags):
                if not ok:
                    raise RuntimeError(
                        f"non-finite gradient in {plan.label} {plan.check} (step {plan.step}); nothing was "
                        "updated: skip this batch (zero_grad) and continue"
                    )

    # torch.compile: the step runs eagerly behind one graph break (_EAGER). It is host logic
    # (refresh schedules, SVDs, Python counters) that would otherwise be traced and guarded on every
    # step count, recompiling at each step; tests/test_engine.py bounds the recompiles.
    @_EAGER
    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        cuda_graphs.check_groups(self.param_groups)
        work = self._plan()
        if getattr(self, "_per_parameter_step", False):  # the pre-engine path, kept for bench/
            for item in work:
                self._step_param(*item)
        else:
            self._engine().step(self, work)
        return loss

    # Eager for the same reasons as step(), and because a traced step_param is wrong, not only slow: its
    # planning looks parameters up in dicts keyed by tensor identity, which dynamo's guards do not cover,
    # so a frame compiled for one parameter re-stepped that parameter when called with another
    # (tests/test_audit_compile.py). LayerwiseUpdates calls it from hooks that fire inside backward, which
    # a compiled training step runs in a graph break, where dynamo compiles every Python frame it enters.
    @_EAGER
    @torch.no_grad()
    def step_param(self, param: torch.Tensor) -> None:
        """Step one parameter (if it has a gradient), with the same checks and rules as :meth:`step`.

        For updates inside backward (a post-accumulate-grad hook per parameter): the parameter's group
        settings, e.g. an lr set by a scheduler, apply as usual.
        """
        position = self._positions(param).get(param)
        if position is None:
            raise ValueError(f"step_param: the tensor of shape {tuple(param.shape)} is not in this optimizer")
        cuda_graphs.check_groups([position[0]])
        work = self._plan([param])
        if work:
            self._engine().step(self, work)

    # ---- the whole-model step engine and CUDA graphs -------------------------------------------------
    def _engine(self) -> StepEngine:
        """The step engine (derived caches only: created on first use, after unpickling too)."""
        engine = self.__dict__.get("_step_engine")
        if engine is None:
            engine = self.__dict__["_step_engine"] = StepEngine()
        return engine

    def refresh_due(self) -> bool:
        """Would the next :meth:`step` recompute a basis? Host state only, no synchronisation.

        Asks every projected parameter that holds a gradient (one without state yet is due), and every one
        a captured CUDA graph steps, gradient or not (layer-wise updates free them during backward). The
        "converged" refresh policy decides from the gradient's projection and synchronises here.
        """
        capture = self._engine().capture
        captured = capture.param_ids if capture is not None else ()
        for p, (group, _, _) in self._positions().items():
            if "rank" not in group:
                continue
            if p.grad is not None:
                grad2d = p.grad.reshape(projection.matrix_shape(p.shape))
            elif id(p) in captured and group["refresh_policy"] != "converged":
                grad2d = None  # the fixed and lazy policies read only the state
            else:
                continue
            state = self.state.get(p)
            if not state or "refreshes" not in state:
                return True
            if projection.refresh_due(state, group, grad2d)[0]:
                return True
        return False

    def advance_host_counters(self, n: int = 1) -> None:
        """Tell the optimizer that ``n`` captured ordinary steps were replayed (CUDA graphs).

        A replay advances the device step counts only; this moves the host mirror (``state["step"]``,
        which schedules refreshes and checkpoints) of exactly the parameters the captured step stepped.
        """
        self._engine().advance_host_counters(n)

    def replay(self, graph) -> None:
        """Replay ``graph``, a captured training step whose ``opt.step()`` was ordinary (CUDA graphs), and
        count it: every replay, the first one after the capture too (a capture counts nothing).

        The pattern (README, "CUDA graphs and torch.compile"; refresh steps stay eager, the capture follows
        eager warm-up steps with static gradients: ``zero_grad(set_to_none=False)``)::

            if opt.refresh_due():
                eager_train_step()   # forward, backward, opt.step(): SVDs run here
            else:
                opt.replay(graph)    # graph.replay(), then the host counters move on

        Before the replay, the groups' current lr and weight decay (an lr schedule) are copied to the
        device; with backend "triton" (the grouped kernels) also betas, eps and scale, while backend
        "torch" fixes those, and whether decay is on, at capture. Steps that run per parameter with host
        step sizes cannot be captured (lowrank_kernels/cuda_graphs.py lists them; the capture raises).
        Refreshes keep every tensor's storage (new bases and moments are copied in place) unless a rank
        changes (rank_policy="energy"); a replay after such a refresh, after load_state_dict or after a
        weight restarted raises instead of updating memory the optimizer no longer uses: capture again.
        """
        if self.refresh_due():
            raise RuntimeError("a basis refresh is due: run this step eagerly (opt.step()), not from a graph")
        self._engine().before_replay(self)
        graph.replay()
        self.advance_host_counters()

    def _step_param(self, group: dict, p: torch.Tensor, index: int, refresh: bool, updates: dict) -> None:
        """The pre-engine per-parameter step (``opt._per_parameter_step = True``): bench/ baseline."""
        if fsdp.is_dtensor(p):  # an FSDP2 shard: this rank's rows (distributed/fsdp.py)
            return fsdp.step_param(self, group, p, index, refresh, updates)
        state = self.state[p]
        state.update(updates)
        if "step" not in state:
            state["step"] = 0
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        grad = p.grad
        P = Q = None
        scale = 1.0
        weight, write_back = p, None
        if "rank" in group:
            m, n = projection.matrix_shape(p.shape)
            if p.dim() > 2:
                grad = grad.reshape(m, n)
                try:
                    weight = p.view(m, n)
                except RuntimeError:  # e.g. channels_last conv weight: update a copy, write it back
                    weight = p.reshape(m, n).clone()
                    write_back = p
            side = projection.orientation(group["proj_type"], m, n)
            if refresh:
                projection.refresh(state, grad, group, side, group["seed"], index)
            P, Q = projection.basis_of(state, grad)
            scale = float(group["scale"])
            shape = projection.lowrank_shape(side, m, n, state["rank"])
        else:
            shape = p.shape
        if "exp_avg" not in state:
            state.update(projection.new_moments(shape, group.get("state_dtype"), grad))
        state["step"] += 1
        # Bias correction counts the moments' own steps: the "zero" moments rule restarts them.
        moment_steps = state["step"] - state.get("moment_start", 0)
        step_size = adam_step_size(lr, beta1, beta2, moment_steps) if group["correct_bias"] else lr
        # The group's update rule; groups without fused kernels (projection.fused_supported) run the reference.
        update_rules.run_step(self.backend, group, state, weight, grad, P, Q, beta1=beta1, beta2=beta2,
                              eps=group["eps"], step_size=step_size, scale=scale, lr=lr,
                              weight_decay=group["weight_decay"])
        if write_back is not None:
            write_back.copy_(weight.view_as(write_back))

    # ---- checkpoints ----------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's loader (its pre- and post-hooks included), with three differences:

        * everything is validated first and nothing is loaded when anything is refused: torch.optim
          checkpoints, other group layouts or shapes, missing or ill-formed state (the error names the
          parameter and the key); galore-torch checkpoints are converted (lowrank_kernels.checkpoint);
        * moments kept at an explicit ``state_dtype`` keep that dtype (torch.optim would cast fp32 moments
          of a bf16 weight to bf16); other tensors follow the parameter's device and dtype as in torch.optim;
        * the loaded tensors are copies, never aliases of the checkpoint's.
        """
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        param_groups, state = prepare_load(self, state_dict)
        self.__setstate__({"state": state, "param_groups": param_groups})
        self._engine().epoch += 1  # a captured graph's tensors are no longer the state's: replays re-check
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
