"""``GaLoreAdamW``: a drop-in for ``galore_torch.GaLoreAdamW`` with safe checkpoints and clear errors."""
from __future__ import annotations

from itertools import chain
from typing import Callable, Iterable, Optional

import torch

from . import projection, update_rules
from .backends import BACKENDS
from .projection import MOMENT_KEYS, POLICY_DEFAULTS, PROJECTED_DEFAULTS, STATE_DTYPES
from .quant import QUANT_KEYS
from .reference import adam_step_size
from .validation import check_hyperparameters, is_int

__all__ = ["GaLoreAdamW"]

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
    moments, :mod:`lowrank_kernels.quant`).

    Groups without ``rank`` are plain AdamW under galore-torch's rules: bias correction folded into the
    step size, ``eps`` added to the uncorrected sqrt(v), decoupled weight decay applied after the update.

    Projected parameters must have at least 2 dimensions; an N-D weight is optimised as the matrix
    ``(shape[0], prod(shape[1:]))`` (a conv weight: one row per output channel).

    ``backend``: "torch" (the reference, any device), "triton" (fused kernels; CUDA tensors, or CPU under
    ``TRITON_INTERPRET=1``) or "auto" (kernels for CUDA tensors when triton imports, else the reference).

    A step validates every group and gradient before it changes anything: bad hyperparameters, sparse or
    complex gradients, and non-finite gradients at a basis refresh raise, leaving weights, moments and
    bases untouched, so the caller can skip the batch and carry on.

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
        backend: str = "torch",
        seed: int = 0,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (must be one of {BACKENDS})")
        if not is_int(seed):
            raise ValueError(f"Invalid seed: {seed!r} (must be an integer)")
        self.backend = backend
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        seed=seed)
        super().__init__(params, defaults)

    # ---- groups ---------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        # Materialise once: a generator (model.parameters()) must survive the checks below.
        param_group["params"] = params = [params] if isinstance(params, torch.Tensor) else list(params)
        if "rank" in param_group:
            for key, value in PROJECTED_DEFAULTS.items():
                param_group.setdefault(key, value)
            for (key, choice), extra in POLICY_DEFAULTS.items():
                if param_group[key] == choice:
                    for name, value in extra.items():
                        param_group.setdefault(name, value)
        check_hyperparameters({**self.defaults, **param_group})
        if "rank" in param_group:
            for i, item in enumerate(params):
                name, p = item if isinstance(item, tuple) else (None, item)
                label = f"parameter {name!r}" if name else f"parameter #{i} of its group"
                self._check_projectable(p, projection.max_rank(param_group), label)
        super().add_param_group(param_group)

    @staticmethod
    def _check_projectable(p: torch.Tensor, rank: int, label: str) -> None:
        if p.dim() < 2:
            raise ValueError(
                f"{label} has shape {tuple(p.shape)} but sits in a projected group (rank={rank}): "
                "GaLore projects weights with 2 or more dimensions; put 1-D parameters (biases, norms) "
                "in a group without 'rank'"
            )
        if p.is_complex():
            raise ValueError(f"{label} is complex; GaLoreAdamW supports real parameters only")
        m, n = projection.matrix_shape(p.shape)
        if rank >= min(m, n):
            raise ValueError(
                f"rank={rank} is too large for {label} of shape {tuple(p.shape)} (as a {m}x{n} matrix): "
                f"need 1 <= rank < min(m, n) = {min(m, n)}; use a plain AdamW group for this weight"
            )

    # ---- step -----------------------------------------------------------------------------------------
    def _positions(self) -> dict:
        """{param: (group, index in group, position over all groups)}, rebuilt when the groups change.

        The position numbers parameters as state_dict does; it seeds rsvd refreshes and names a parameter
        in errors. Cached so that step_param, called once per parameter per step, stays O(1).
        """
        key = tuple((id(g), len(g["params"])) for g in self.param_groups)
        if getattr(self, "_positions_key", None) != key:
            flat = chain.from_iterable(((g, i, p) for i, p in enumerate(g["params"])) for g in self.param_groups)
            self._positions_cache = {p: (g, i, pos) for pos, (g, i, p) in enumerate(flat)}
            self._positions_key = key
        return self._positions_cache

    def _param_label(self, group: dict, index_in_group: int, p: torch.Tensor) -> str:
        names = group.get("param_names")
        if names:
            return f"parameter {names[index_in_group]!r} (shape {tuple(p.shape)})"
        return f"parameter #{self._positions()[p][2]} (shape {tuple(p.shape)})"

    def _plan_param(self, group: dict, i: int, p: torch.Tensor, index: int) -> Optional[tuple]:
        """Validate one parameter's step and return its work item (None without a gradient).

        Mutates nothing, so an error leaves weights and state exactly as they were.
        """
        if p.grad is None:
            return None
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(f"GaLoreAdamW does not support sparse gradients "
                               f"({self._param_label(group, i, p)}); consider SparseAdam")
        if grad.is_complex():
            raise RuntimeError(f"GaLoreAdamW does not support complex gradients "
                               f"({self._param_label(group, i, p)})")
        refresh, updates = False, {}
        if "rank" in group:
            state = self.state.get(p, {})  # .get: planning must not create state entries
            grad2d = grad.reshape(projection.matrix_shape(p.shape))
            refresh, updates = projection.refresh_due(state, group, grad2d)
            # A NaN/Inf must never reach the SVD: it would fail or return a garbage basis.
            # (Meta tensors, used to size state without data, have no values to check.)
            if refresh and grad.device.type != "meta" and not bool(torch.isfinite(grad).all()):
                raise RuntimeError(
                    f"non-finite gradient in {self._param_label(group, i, p)} at a basis refresh "
                    f"(step {state.get('step', 0)}); nothing was updated: skip this batch "
                    "(zero_grad) and continue"
                )
        return group, p, index, refresh, updates

    def _plan(self) -> list:
        """Validate everything a step will touch before anything changes; return the work list."""
        for group in self.param_groups:
            check_hyperparameters(group)
        work = (self._plan_param(g, i, p, pos) for p, (g, i, pos) in self._positions().items())
        return [item for item in work if item is not None]

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for work in self._plan():
            self._step_param(*work)
        return loss

    @torch.no_grad()
    def step_param(self, param: torch.Tensor) -> None:
        """Step one parameter (if it has a gradient), with the same checks and rules as :meth:`step`.

        For updates inside backward (a post-accumulate-grad hook per parameter): the parameter's group
        settings, e.g. an lr set by a scheduler, apply as usual.
        """
        where = self._positions().get(param)
        if where is None:
            raise ValueError(f"step_param: the tensor of shape {tuple(param.shape)} is not in this optimizer")
        group, i, position = where
        check_hyperparameters(group)
        work = self._plan_param(group, i, param, position)
        if work is not None:
            self._step_param(*work)

    def _step_param(self, group: dict, p: torch.Tensor, index: int, refresh: bool, updates: dict) -> None:
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
        """torch.optim's loader, except that moments kept at an explicit ``state_dtype`` keep that dtype.

        torch.optim casts every floating state tensor to its parameter's dtype and device; that is what we
        want for bases (the gradient's dtype) and default moments, but it would round fp32 moments of a
        bf16 weight to bf16.
        """
        saved_state = dict(state_dict["state"])
        kept = {}
        for group in state_dict["param_groups"]:
            dtype = STATE_DTYPES.get(group.get("state_dtype"))
            if dtype is None:
                continue
            for idx in group["params"]:
                if idx in saved_state:
                    entry = dict(saved_state[idx])
                    kept[idx] = (dtype, {k: entry.pop(k) for k in MOMENT_KEYS + QUANT_KEYS if k in entry})
                    saved_state[idx] = entry
        super().load_state_dict({**state_dict, "state": saved_state})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for idx, p in zip(saved_ids, params):
            if idx in kept:
                dtype, moments = kept[idx]
                for key, value in moments.items():  # int8 scales stay fp32
                    self.state[p][key] = value.to(device=p.device, dtype=dtype if key in MOMENT_KEYS else value.dtype)
