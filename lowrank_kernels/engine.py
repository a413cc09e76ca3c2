"""The whole-model step: all parameters of one optimizer step in a few bucket-wide calls.

``GaLoreAdamW.step()`` plans (validates everything, mutates nothing) and hands its work list to
:meth:`StepEngine.step`, which

1. **resolves** each parameter: its 2-D view, orientation ("left", "right", "full"; None when
   unprojected) and bucket, ``(device, dtype, orientation, moments dtype, runner)``. The backend's
   runner is chosen per bucket here, so a backend error raises before anything changes;
2. **refreshes** the bases that are due, on the host as before (it may synchronise). The rsvd refreshes
   of same-shaped weights go to :func:`rsvd_batched` together, each with its own seed
   (``projection.refresh_seed``), so a basis never depends on its batch neighbours. Bases and moments
   keep their storage when the shapes allow, so a captured CUDA graph stays valid across refreshes;
3. runs the **ordinary step** bucket by bucket: backend "torch" with ``torch._foreach_*`` ops in the
   reference's exact order of operations (:func:`_run_bucket_torch`), backend "triton" with the grouped
   kernels (lowrank_kernels/kernels/grouped.py): per bucket ONE projection+Adam launch and ONE
   back-projection+update launch for all left- or right-projected weights, ONE multi-tensor AdamW launch
   for all unprojected tensors, whatever their number (:class:`_GroupedBucket`); "full" projections in
   five grouped launches (kernels/grouped_full.py). Their tables are cached per bucket and composition
   and rebuilt only when a tensor they point at is reallocated (a rank change, load_state_dict); moved
   gradients are re-pointed without blocking. Weights updated through a copy (channels_last conv
   weights) and unprojected tensors whose layouts the multi-tensor kernel cannot walk flat run the
   per-parameter kernels (:func:`_run_single`), with host scalars: a step that needs them refuses CUDA
   graph capture.

   The update rules other than "galore" (fira, frugal, apollo, apollo-mini) run in the same grouped
   launches where update_rules.grouped_supported allows (left/right projections, float moments, svd/
   rsvd/warm bases), one rule per bucket (the rule is part of the bucket key; fira and apollo add one
   small launch, kernels/grouped_rule_scales.py); elsewhere, and on backend "torch" (whose bucketed path
   is GaLore's), they take the per-parameter reference. A limiting rule's ``limiter_norm`` state tensor
   is created (zero, flagged "no previous norm") before its first grouped step and written by the kernel.

   A triton bucket also holds one tile config (``grouped.tile_configs``): a problem then rounds the same
   in every launch it is part of, so layer-wise steps (one parameter at a time) stay bit-identical to
   whole-model steps.

Step scalars come in two modes:

* **host** (the default for CPU tensors): Python floats from the host step counts, exactly the
  reference's. This keeps the CPU path bit-exact with the reference and galore-torch: CPU
  ``add_(U, alpha=-s)`` is one fused multiply-add, which no tensor-valued step size reproduces.
* **device** (the default for CUDA tensors and for every grouped triton bucket; ``opt._device_scalars =
  True`` forces it, for tests): step counts and bias-corrected step sizes live on the device, one float64
  vector per device and step composition, as torch.optim's ``capturable=True``. An ordinary step then
  never reads a device value on the host (no ``.item()``, no device-to-host copy): tests/test_engine.py
  proves it with a TorchDispatchMode. The per-problem fp32 table (:data:`SCALAR_COLUMNS`) is exactly the
  ``scalars`` the grouped kernels read, updated in place each step (a CUDA graph replays with it).

The host keeps a mirror of every count (``state["step"]``, a Python int, as in galore-torch and in old
checkpoints), because refresh scheduling is host logic. A CUDA-graph replay advances the device
counts only; :meth:`StepEngine.advance_host_counters` brings the host mirror along. A capture itself
counts nothing; what it records and what each replay checks: lowrank_kernels/cuda_graphs.py.
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import cuda_graphs, projection, quant, reference, update_rules
from .backends import step_function
from .distributed import fsdp
from .linalg import rsvd
from .projection import BASIS_KEYS, MOMENT_KEYS, STATE_DTYPES
from .validation import lr_value

__all__ = ["StepEngine", "SCALAR_COLUMNS", "rsvd_batched"]

# Columns of the per-problem fp32 scalar table (device mode): the grouped kernels' ``scalars`` layout
# (kernels/_tables.SCALAR_COLUMNS, kernels/grouped.py). The update is W <- W - (step_size * scale) U,
# then W <- W - (lr * wd) W; FRUGAL's signSGD step is residual_lr (0 for other rules); beta1, beta2, eps
# live in the grouped tables' own per-problem table.
SCALAR_COLUMNS = ("step_size", "scale", "lr_weight_decay", "residual_lr")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STABLE_KEYS = BASIS_KEYS + MOMENT_KEYS + quant.QUANT_KEYS
GROUPED_ROUTES = ("grouped", "adamw", "int8")  # routes whose launches read the device scalar table
_MAX_DEVICE_ENTRIES = 4096  # step compositions cached (whole model, plus one per layer-wise parameter)


def rsvd_batched(mats: list, k: int, seeds: list) -> list:
    """rsvd of each matrix in ``mats`` (same shape) with its own seed: a list of (U, S, V).

    One batched op call with per-element seeds: element i equals a single call with ``seeds[i]``, so
    a weight's basis never depends on its batch neighbours.
    """
    if len(mats) == 1:
        return [projection.BASIS_SOURCES["rsvd"](mats[0], k, seeds[0], None, None)]
    U, S, V = rsvd(torch.stack(mats), k, oversample=projection.OVERSAMPLE,
                   seed=torch.tensor(seeds, dtype=torch.int64))
    return list(zip(U.unbind(0), S.unbind(0), V.unbind(0)))


class _Problem:
    """One parameter's work in this step."""
    __slots__ = ("p", "group", "index", "state", "weight", "grad", "write_back", "side", "key", "P", "Q",
                 "moment_step", "route", "has_previous")

    def __init__(self, opt, group, p, index):
        self.p, self.group, self.index = p, group, index
        self.state = opt.state[p]
        self.weight, self.grad, self.write_back, self.side = p, p.grad, None, None
        self.P = self.Q = self.route = self.has_previous = None
        if "rank" in group:
            shape = p.shape
            m, n, self.side = _layout(group["proj_type"], shape)
            if len(shape) > 2:
                self.grad = self.grad.reshape(m, n)
                try:
                    self.weight = p.view(m, n)
                except RuntimeError:  # e.g. a channels_last conv weight: update a copy, write it back
                    self.weight = p.reshape(m, n).clone()
                    self.write_back = p
        moments = self.state.get("exp_avg")
        mdtype = moments.dtype if moments is not None else (STATE_DTYPES[group.get("state_dtype")]
                                                           or self.grad.dtype)
        # A gradient in another dtype than its parameter (grad_dtype) gets buckets and tables of its own.
        dtype = p.dtype if self.grad.dtype == p.dtype else (p.dtype, self.grad.dtype)
        self.key = (p.device, dtype, self.side, mdtype)


@functools.lru_cache(maxsize=4096)
def _layout(proj_type: str, shape: torch.Size) -> tuple:
    """(m, n, orientation) of a projected parameter of ``shape`` (cached: per parameter, per step)."""
    m, n = projection.matrix_shape(shape)
    return m, n, projection.orientation(proj_type, m, n)


def _runner(backend: str, tensor: torch.Tensor) -> str:
    """"torch" or "triton" for a bucket of ``tensor``'s device and dtype (raises as backends do)."""
    return "torch" if step_function(backend, tensor) is reference.galore_step else "triton"


def _keep_storage(state: dict, old: dict) -> None:
    """Copy refreshed tensors into the previous ones where shape, dtype and strides agree.

    Keeps every data pointer of an ordinary step unchanged across a refresh, so a CUDA graph captured
    before it (and the grouped kernels' pointer tables) stay valid; a rank change cannot keep them.
    """
    for key, before in old.items():
        now = state.get(key)
        if (now is not None and now is not before and now.shape == before.shape
                and now.dtype == before.dtype and now.stride() == before.stride()):
            before.copy_(now)
            state[key] = before


# ---- device-resident step scalars -----------------------------------------------------------------------
class _DeviceScalars:
    """Step counts and scalars of one step composition (an ordered list of parameters) on one device."""

    def __init__(self, device: torch.device, n: int):
        self.steps = torch.zeros(n, dtype=torch.float64, device=device)   # moment steps taken
        self.hyper = torch.zeros(n, 5, dtype=torch.float64, device=device)  # lr, beta1, beta2, bias?, scale
        self.table = torch.zeros(n, len(SCALAR_COLUMNS), dtype=torch.float32, device=device)
        self.host_steps: Optional[list] = None  # what self.steps holds, as the host last knew it
        self.host_hyper: Optional[list] = None

    def sync(self, problems: list) -> None:
        """Upload host values that differ from what the device holds (host-to-device only, no sync).

        Called after the host counts moved on: the device must hold the counts before this step.
        """
        steps = [pr.moment_step - 1 for pr in problems]
        if steps != self.host_steps:
            self.upload_steps(steps)
        self.sync_hyperparameters([pr.group for pr in problems])

    def upload_steps(self, steps: list) -> None:
        _upload(self.steps, steps)
        self.host_steps = steps

    def sync_hyperparameters(self, groups: list) -> None:
        """``groups``: each problem's param group."""
        hyper = [_hyper(group) for group in groups]
        if hyper != self.host_hyper:
            _upload(self.hyper, [h[:5] for h in hyper])
            _upload(self.table, [h[5:] for h in hyper])  # step_size (column 0) is computed per step
            self.host_hyper = hyper

    def advance(self, fused: bool = False) -> None:
        """One step on the device: counts + 1, then step sizes (galore-torch's formula, in float64).

        ``fused`` (a CUDA composition with triton buckets): one launch (kernels/step_scalars.py) instead
        of the torch ops' ten."""
        if fused:
            from .kernels.step_scalars import advance_step_scalars
            advance_step_scalars(self.steps, self.hyper, self.table)
        else:
            self.steps.add_(1.0)
            lr, beta1, beta2, correct_bias, scale = self.hyper.unbind(1)
            corrected = lr * torch.sqrt(1.0 - torch.pow(beta2, self.steps)) / (1.0 - torch.pow(beta1, self.steps))
            self.table[:, 0].copy_(torch.where(correct_bias > 0, corrected, lr))
        self.host_steps = [s + 1 for s in self.host_steps]


def _hyper(group: dict) -> tuple:
    """Device columns of a problem: (lr, beta1, beta2, bias correction, scale) + the table's columns
    (SCALAR_COLUMNS; the step size, column 0, is computed on the device at every step)."""
    beta1, beta2 = group["betas"]
    lr = lr_value(group["lr"])  # a tensor lr: read only when it changed (validation.lr_value)
    scale = float(group["scale"]) if "rank" in group else 1.0
    # update_rules' FRUGAL: residual_lr = lr * scale * inactive_lr_scale
    residual_lr = lr * scale * group["inactive_lr_scale"] if group.get("update") == "frugal" else 0.0
    return (lr, beta1, beta2, 1.0 if group["correct_bias"] else 0.0, scale,
            0.0, scale, lr * group["weight_decay"], residual_lr)


def _adam_hyper(group: dict) -> tuple:
    beta1, beta2 = group["betas"]
    return (beta1, beta2, group["eps"])


def _no_capture(device: torch.device) -> None:
    if cuda_graphs.capturing(device):
        raise RuntimeError(
            "GaLoreAdamW: the step counts or hyperparameters changed since the last eager step, so a CUDA "
            "graph being captured would bake in a host-to-device copy; run one eager opt.step() with the "
            "same parameters and hyperparameters before capturing"
        )


def _upload(dst: torch.Tensor, values: list) -> None:
    _no_capture(dst.device)
    src = torch.tensor(values, dtype=dst.dtype)
    if dst.is_cuda:
        src = src.pin_memory()  # a pinned source lets the copy run asynchronously (no host sync)
    dst.copy_(src, non_blocking=True)


# ---- the engine -----------------------------------------------------------------------------------------
class StepEngine:
    """Runs :meth:`GaLoreAdamW.step`'s work list bucket by bucket; holds only derived caches.

    Caches (rebuilt on demand, dropped by pickling): device step scalars per step composition, and the
    grouped tables of triton buckets per bucket and composition. ``table_builds`` counts table
    (re)builds, for tests.
    """

    def __init__(self):
        self._device_entries: dict = {}
        self._tables: dict = {}
        self._bases = WeakIdKeyDictionary()  # param -> (sizes, compact token, {basis key: matrix})
        # What the last ordinary step advanced: (states, [(device entry, groups, states)],
        # [(grouped bucket, groups, gradients)])
        self._last: tuple = ([], [], [])
        self.table_builds = 0
        self.epoch = 0  # eager steps taken (a replay re-checks its graph after any: cuda_graphs.Capture)
        self.capture: Optional[cuda_graphs.Capture] = None  # the last captured step

    def __getstate__(self):  # caches are derived data: a copy starts empty
        return {}

    def __setstate__(self, state):
        self.__init__()

    # ---- the step ---------------------------------------------------------------------------------------
    def step(self, opt, work: list) -> None:
        if not work:
            return
        capturing = cuda_graphs.capturing(work[0][1].device)
        if capturing and any(item[3] for item in work):
            cuda_graphs.refuse_refresh()
        # FSDP2 shards step on their own path, in the plan's order (collectives must match); what the
        # bucketed math does not cover (int8 moments, random and dct bases: update_rules.grouped_supported;
        # the rules other than galore wherever the grouped kernels do not run them: _rule_route) takes the
        # per-parameter path, whose math is update_rules'.
        supported = {}  # id(group): update_rules.grouped_supported(group), asked once per group
        for item in work:
            if id(item[0]) not in supported:
                supported[id(item[0])] = update_rules.grouped_supported(item[0])
        apart = [not supported[id(item[0])] or fsdp.is_dtensor(item[1]) for item in work]
        own = [item for item, alone in zip(work, apart) if alone]
        work = [item for item, alone in zip(work, apart) if not alone]
        problems = [_Problem(opt, group, p, index) for group, p, index, _, _ in work]
        runners, kept = {}, []
        for pr, item in zip(problems, work):  # choose (and check) every bucket's backend before anything changes
            if pr.group.get("update", "galore") != "galore" or pr.key[3] == torch.uint8:
                pr.route = _rule_route(opt.backend, pr)
                if pr.route is None:
                    own.append(item)
                    continue
                runners.setdefault(pr.key, "triton")
            else:
                if pr.key not in runners:
                    runners[pr.key] = _runner(opt.backend, pr.weight)
                if runners[pr.key] == "triton":
                    pr.route = _route(pr)
            kept.append(pr)
        if capturing:
            cuda_graphs.check_capturable(own, kept)
        else:
            self.epoch += 1
        for item in own:
            opt._step_param(*item)
        problems = kept
        if not problems:
            return
        refreshing = []
        items = {id(item[1]): item for item in work}
        for pr in problems:
            _, _, _, refresh, updates = items[id(pr.p)]
            if updates:
                pr.state.update(updates)
            if "step" not in pr.state:
                pr.state["step"] = 0
            if refresh:
                refreshing.append(pr)
        if refreshing:
            self._refresh(refreshing)
        self._ordinary(opt, problems, runners, capturing)
        if capturing:  # nothing ran: the host counts go back; each replay advances them (cuda_graphs)
            self.capture = cuda_graphs.record(self, problems, *self._last[1:])

    def _refresh(self, refreshing: list) -> None:
        if cuda_graphs.capturing(refreshing[0].grad.device):  # (step() refuses earlier; any other caller too)
            cuda_graphs.refuse_refresh()
        factors = {}
        batches = defaultdict(list)
        for pr in refreshing:
            # "warm" without a previous basis (its first refresh, or after a restart) IS rsvd
            # (projection._warm_source): batched too, instead of one rsvd call per weight.
            projector = pr.group["projector"]
            if projector == "rsvd" or (projector == "warm" and not any(
                    key in pr.state for key in BASIS_KEYS + projection.COMPACT_KEYS)):
                g = pr.grad
                batches[(tuple(g.shape), g.dtype, g.device, projection.max_rank(pr.group))].append(pr)
        for (_, _, _, k), prs in batches.items():
            seeds = [projection.refresh_seed(pr.group["seed"], pr.index, pr.state.get("refreshes", 0))
                     for pr in prs]
            for pr, f in zip(prs, rsvd_batched([pr.grad.float() for pr in prs], k, seeds)):
                factors[id(pr)] = f
        for pr in refreshing:
            old = {k: pr.state[k] for k in _STABLE_KEYS if k in pr.state}
            projection.refresh(pr.state, pr.grad, pr.group, pr.side, pr.group["seed"], pr.index,
                               factors.get(id(pr)))
            _keep_storage(pr.state, old)

    def _ordinary(self, opt, problems: list, runners: dict, capturing: bool = False) -> None:
        buckets: dict = {}
        for pr in problems:
            state = pr.state
            if "exp_avg" not in state:
                g = pr.grad
                shape = (projection.lowrank_shape(pr.side, *g.shape, state["rank"]) if pr.side else g.shape)
                if pr.key[3] == torch.uint8:
                    state.update(quant.zeros(shape, g.device))
                else:
                    for key in MOMENT_KEYS:
                        state[key] = torch.zeros(shape, dtype=pr.key[3], device=g.device)
            state["step"] += 1
            pr.moment_step = state["step"] - state.get("moment_start", 0)
            if pr.side is not None:
                pr.P, pr.Q = self.basis(pr)
            key = pr.key
            if pr.route == "grouped":  # one tile config per launch (see the module docstring)
                key += (pr.route, _tile_configs(pr.side, *pr.grad.shape, state["rank"], pr.grad.dtype))
                rule = _rule_spec(pr.group)
                if rule is not None:  # one update rule (a launch constexpr) per bucket
                    key += (rule,)
                    if rule[2]:  # a limiting rule: its norm lives in the state (absent before the first step)
                        norm = state.get("limiter_norm")
                        pr.has_previous = norm is not None
                        if norm is None or norm.dtype != pr.grad.dtype or norm.device != pr.grad.device:
                            # the kernel keeps it in the gradient's dtype (a checkpoint may have cast it)
                            state["limiter_norm"] = (torch.zeros((), dtype=pr.grad.dtype, device=pr.grad.device)
                                                     if norm is None else norm.to(pr.grad))
            elif pr.route is not None:
                key += (pr.route,)
            bucket = buckets.get(key)
            if bucket is None:
                buckets[key] = bucket = []
            bucket.append(pr)
        device_slices, entries = self._device_scalars(opt, buckets)
        # Every grouped table is built (or found) and pointed at this step's gradients before any launch:
        # a builder's error leaves weights and moments untouched.
        runs, grouped_last = [], []
        for key, bucket in buckets.items():
            route = key[4] if len(key) > 4 else None
            if route in GROUPED_ROUTES:
                cached = self._grouped_bucket(key, bucket)
                cached.prepare(bucket)
                entry, start = device_slices[key]
                runs.append(functools.partial(cached.run, entry.table[start:start + len(bucket)]))
                # a capture keeps its gradients (replays read them); an eager step must not keep them alive
                grouped_last.append((cached, [pr.group for pr in bucket],
                                     [pr.grad for pr in bucket] if capturing else None))
            elif route == "single":
                runs.append(functools.partial(_run_single, bucket))
            else:
                runs.append(functools.partial(_run_bucket_torch, key[2], bucket, device_slices.get(key)))
        for run in runs:
            run()
        for pr in problems:
            if pr.write_back is not None:
                pr.write_back.copy_(pr.weight.view_as(pr.write_back))
        self._last = ([pr.state for pr in problems], entries, grouped_last)

    # ---- bases ------------------------------------------------------------------------------------------
    def basis(self, pr: _Problem) -> tuple:
        """(P, Q) of a projected problem.

        Sources whose state holds a seed or column numbers (projection.REGENERATED: "random", "dct") keep
        checkpoints compact; their matrices live here, rebuilt only when what they come from changed (a
        refresh, load_state_dict, a rank change), into the same storage when the shape allows, so a
        captured CUDA graph and the grouped tables stay valid. The memory is the matrix's, as in APOLLO.
        """
        state = pr.state
        P, Q = state.get("proj_left"), state.get("proj_right")
        if P is not None or Q is not None:  # a stored basis (svd, rsvd, warm): the common case, no lookup
            return P, Q
        token = _compact_token(state)
        if not token:
            return None, None
        key = (state["rank"], tuple(pr.grad.shape), pr.grad.dtype, pr.grad.device)
        cached = self._bases.get(pr.p)
        if cached is None or cached[0] != key or not _same_token(cached[1], token):
            built = projection.basis_tensors(state, pr.grad)
            bases = {k: built[k] for k in BASIS_KEYS if k in built}
            if cached is not None:
                _keep_storage(bases, cached[2])
            cached = (key, token, bases)
            self._bases[pr.p] = cached
        bases = cached[2]
        return bases.get("proj_left"), bases.get("proj_right")

    def built_for(self, p: torch.Tensor, state: dict) -> Optional[tuple]:
        """The 2-D gradient shape the cached regenerated basis of ``p`` was built for, if it was built from
        ``state``'s seed or column numbers (None otherwise). Such a state keeps no matrix whose shape would
        show that ``p`` was resized since (optimizer planning asks, before anything changes)."""
        cached = self._bases.get(p)
        if cached is None or not _same_token(cached[1], _compact_token(state)):
            return None
        return cached[0][1]

    # ---- device scalars -----------------------------------------------------------------------------------
    def _device_scalars(self, opt, buckets: dict) -> tuple:
        """Advance the device counts of this step's composition; {bucket key: (entry, start)}.

        Device mode: grouped triton buckets always (their kernels read the table); others on CUDA, or
        wherever ``opt._device_scalars`` forces it; never the per-parameter ("single") triton buckets.
        """
        forced = getattr(opt, "_device_scalars", None)
        per_device = defaultdict(list)
        for key in buckets:
            route = key[4] if len(key) > 4 else None
            device = key[0]
            if route in GROUPED_ROUTES or (
                    route is None and (forced or (forced is None and device.type == "cuda"))):
                per_device[device].append(key)
        slices, entries = {}, []
        for device, keys in per_device.items():
            problems = [pr for key in keys for pr in buckets[key]]
            composition = (device, tuple(id(pr.p) for pr in problems))
            entry = self._device_entries.get(composition)
            if entry is None:
                if len(self._device_entries) >= _MAX_DEVICE_ENTRIES:
                    self._device_entries.clear()
                entry = self._device_entries[composition] = _DeviceScalars(device, len(problems))
            entry.sync(problems)
            # triton buckets on CUDA: the counts and step sizes in one launch (``_fused_scalars``: tests)
            entry.advance(fused=getattr(opt, "_fused_scalars", False) or (
                device.type == "cuda" and any(len(key) > 4 and key[4] in GROUPED_ROUTES for key in keys)))
            entries.append((entry, [pr.group for pr in problems], [pr.state for pr in problems]))
            start = 0
            for key in keys:
                slices[key] = (entry, start)
                start += len(buckets[key])
        return slices, entries

    # ---- tables for grouped kernels -------------------------------------------------------------------------
    def _grouped_bucket(self, key, bucket: list) -> "_GroupedBucket":
        """The bucket's grouped tables, rebuilt only when ``tables.matches`` fails (a reallocated tensor)."""
        cache_key = (key, tuple(id(pr.p) for pr in bucket))
        cached = self._tables.get(cache_key)
        if cached is None or not cached.matches(bucket):
            if cached is None and len(self._tables) >= _MAX_DEVICE_ENTRIES:
                self._tables.clear()
            self.table_builds += 1
            cached = self._tables[cache_key] = _GroupedBucket(key[2], bucket, key[6] if len(key) > 6 else None)
        return cached

    # ---- CUDA graphs: the host mirror (cuda_graphs.py) ------------------------------------------------------
    def advance_host_counters(self, n: int = 1) -> None:
        """After ``n`` replays of a captured ordinary step: advance what the host knows by ``n`` steps.

        Exactly the parameters the captured step stepped move on, as the replays did (without a capture:
        those of the last eager step).
        """
        if self.capture is not None:
            self.capture.advance(n)
            return
        states, entries, _ = self._last
        for state in states:
            state["step"] += n
        for entry, _, _ in entries:
            entry.host_steps = [s + n for s in entry.host_steps]

    def before_replay(self, opt) -> None:
        """Before a replay: refuse a stale graph (cuda_graphs.Capture.check), then upload the groups'
        current lr, betas, eps and decay for the captured step's parameters where they changed
        (host-to-device only)."""
        if self.capture is None:
            raise RuntimeError("GaLoreAdamW.replay: no step of this optimizer was captured in a CUDA graph "
                               "(capture a training step that calls opt.step() first)")
        self.capture.check(opt, self)
        self.capture.sync_hyperparameters()


def _compact_token(state: dict) -> list:
    """What a regenerated basis is built from: [(key, value, version)], tensors by identity."""
    token = []
    for key in projection.COMPACT_KEYS:
        value = state.get(key)
        if value is not None:
            token.append((key, value, value._version if torch.is_tensor(value) else None))
    return token


def _same_token(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        ka == kb and va_ver == vb_ver and (va is vb if torch.is_tensor(va) or torch.is_tensor(vb) else va == vb)
        for (ka, va, va_ver), (kb, vb, vb_ver) in zip(a, b))


def _host_scalars(pr: _Problem) -> dict:
    group = pr.group
    beta1, beta2 = group["betas"]
    lr = lr_value(group["lr"])  # a tensor lr: read only when it changed (validation.lr_value)
    step_size = reference.adam_step_size(lr, beta1, beta2, pr.moment_step) if group["correct_bias"] else lr
    return dict(beta1=beta1, beta2=beta2, eps=group["eps"], step_size=step_size,
                scale=float(group["scale"]) if pr.side else 1.0, lr=lr, weight_decay=group["weight_decay"])


# ---- backend "torch": the reference, bucket-wide ----------------------------------------------------------
def _project(side: Optional[str], bucket: list) -> list:
    """R per problem, as reference.project computes it (same products, same association)."""
    if side is None:
        return [pr.grad for pr in bucket]
    if side == "left":
        return [torch.mm(pr.P.T, pr.grad) for pr in bucket]
    if side == "right":
        return [torch.mm(pr.grad, reference.right_factor(pr.Q)) for pr in bucket]
    return [torch.mm(torch.mm(pr.P.T, pr.grad), reference.right_factor(pr.Q)) for pr in bucket]


def _project_back(side: str, bucket: list, N: list) -> list:
    if side == "left":
        return [torch.mm(pr.P, n) for pr, n in zip(bucket, N)]
    if side == "right":
        return [torch.mm(n, pr.Q.T) for pr, n in zip(bucket, N)]
    return [torch.mm(torch.mm(pr.P, n), pr.Q.T) for pr, n in zip(bucket, N)]


def _run_bucket_torch(side: Optional[str], bucket: list, device: Optional[tuple]) -> None:
    """reference.galore_step for a whole bucket, op for op, with torch._foreach_* ops.

    Problems with equal scalars share each foreach call (usually the whole bucket). ``device``: the
    bucket's (entry, start) in device mode, where the step sizes and decays are device tensors.
    """
    runs: dict = {}
    keys: dict = {}  # the run key of a (group, moment step): computed once, not per parameter
    for i, pr in enumerate(bucket):
        at = (id(pr.group), pr.moment_step)
        key = keys.get(at)
        if key is None:
            key = keys[at] = _run_key(pr.group, side, pr.moment_step, device is None)
        run = runs.get(key)
        if run is None:
            runs[key] = run = []
        run.append(i)
    # CPU, host mode: the foreach ops' scalar overloads wrap the scalar once per tensor (~1 us each); a 0-dim
    # float64 tensor (what a Python float becomes) is read once and rounds exactly as the Python float
    # does. (Not in device mode: that read is a _local_scalar_dense, which device mode promises never to do.)
    scalar = _cpu_scalar if device is None and bucket[0].weight.device.type == "cpu" else float
    for (beta1, beta2, eps, scale, step_size, lr, wd), idx in runs.items():
        probs = [bucket[i] for i in idx]
        M = [pr.state["exp_avg"] for pr in probs]
        V = [pr.state["exp_avg_sq"] for pr in probs]
        R = _project(side, probs)
        # A 0-dim float64 tensor times a 0-dim moment (a 0-D parameter) is no scalar to type promotion: the
        # product is computed in float64 and rounded once, an ulp off the reference's fp32 product.
        by = float if scalar is _cpu_scalar and any(m.dim() == 0 for m in M) else scalar
        # reference.adam_normalize
        torch._foreach_mul_(M, by(beta1))
        torch._foreach_add_(M, R, alpha=1.0 - beta1)
        torch._foreach_mul_(V, by(beta2))
        torch._foreach_addcmul_(V, R, R, value=1.0 - beta2)
        # reference.adam_normalize's eps rule: N in fp32 from the moments as stored, rounded once
        if M[0].dtype != torch.float32:
            M32, V32 = [m.float() for m in M], [v.float() for v in V]
        else:
            M32, V32 = M, V
        D = torch._foreach_sqrt(V32)
        torch._foreach_add_(D, float(eps))  # a tensor here would be read with .item(): a float, so no read
        N = torch._foreach_div(M32, D)
        if N[0].dtype != R[0].dtype:
            N = [n.to(r.dtype) for n, r in zip(N, R)]
        # reference.project_back (projected updates are always scaled) and reference.apply_update
        if side is None:
            U = N
        else:
            U = _project_back(side, probs, N)
            torch._foreach_mul_(U, scalar(scale))  # U is this step's own product: scaled in place
        W = [pr.weight for pr in probs]
        if device is None:
            torch._foreach_add_(W, U, alpha=-step_size)
            if wd > 0.0:
                torch._foreach_add_(W, W, alpha=-lr * wd)
        else:
            entry, start = device
            rows = [start + i for i in idx]
            # W - s U and W - (lr wd) W from the table's columns (value=-1: negation is exact)
            torch._foreach_addcmul_(W, U, _rows(entry.table[:, 0], rows), value=-1.0)
            if wd:
                torch._foreach_addcmul_(W, W, _rows(entry.table[:, 2], rows), value=-1.0)


def _run_key(group: dict, side: Optional[str], moment_step: int, host: bool) -> tuple:
    """(beta1, beta2, eps, scale, step size, lr, decay) of a bucket run; in device mode the step size and
    lr are device values (None) and only whether decay is on matters."""
    beta1, beta2 = group["betas"]
    scale = float(group["scale"]) if side else 1.0
    if not host:
        return (beta1, beta2, group["eps"], scale, None, None, group["weight_decay"] > 0.0)
    lr = lr_value(group["lr"])  # a tensor lr: read only when it changed (validation.lr_value)
    step_size = reference.adam_step_size(lr, beta1, beta2, moment_step) if group["correct_bias"] else lr
    return (beta1, beta2, group["eps"], scale, step_size, lr, group["weight_decay"])


_CPU_SCALARS: dict = {}


def _cpu_scalar(value: float) -> torch.Tensor:
    """A 0-dim float64 CPU tensor of ``value``, cached (a step reuses the same few; nothing mutates them).
    The key keeps the sign of a zero: 0.0 == -0.0, but adding them to -0.0 differs."""
    key = (value, math.copysign(1.0, value))
    tensor = _CPU_SCALARS.get(key)
    if tensor is None:
        if len(_CPU_SCALARS) >= 1024:
            _CPU_SCALARS.clear()
        tensor = _CPU_SCALARS[key] = torch.tensor(value, dtype=torch.float64)
    return tensor


def _rows(vector: torch.Tensor, rows: list) -> list:
    """0-dim views of ``vector`` at ``rows`` (no copy, no launch)."""
    views = vector.unbind(0)
    return [views[r] for r in rows]


# ---- backend "triton" -------------------------------------------------------------------------------------
def _grouped():
    from .kernels import grouped  # imports triton: only once a triton bucket exists
    return grouped


def _tile_configs(side: str, m: int, n: int, r: int, dtype: torch.dtype) -> tuple:
    """A grouped problem's tile configs (part of its bucket key: see the module docstring)."""
    if side == "full":
        from .kernels.grouped_full import full_tile_configs
        return full_tile_configs(m, n, r, dtype)
    return _grouped().tile_configs(side, m, n, r, dtype)


def _route(pr: _Problem) -> str:
    """How backend "triton" steps a parameter: "grouped" (left/right projections: the grouped GEMM
    kernels), "adamw" (unprojected: the multi-tensor kernel) or "single" (the per-parameter kernels).

    Decided before anything changes; raises for a dtype no kernel takes.
    """
    if pr.weight.dtype not in KERNEL_DTYPES:
        raise TypeError(f"GaLoreAdamW(backend='triton') steps float32, bfloat16 and float16 parameters, got "
                        f"{pr.weight.dtype} (shape {tuple(pr.p.shape)}); backend='auto' uses the reference for it")
    if pr.write_back is not None:
        return "single"  # a copy: not a strided view of W
    if pr.side is not None:
        return "grouped"  # "full" too: five grouped launches (kernels/grouped_full.py)
    from .kernels import multi_tensor_adamw
    M, V = (pr.state.get(k) for k in MOMENT_KEYS)
    if M is None:  # created contiguous by this step
        M = V = torch.empty(pr.weight.shape, device="meta")
    try:
        multi_tensor_adamw.check_layout(0, pr.weight, pr.grad, M, V)
    except ValueError:
        return "single"  # param, grad and moments not in one dense layout (e.g. a transposed weight)
    return "adamw"


def _rule_spec(group: dict) -> Optional[tuple]:
    """A projected group's update rule as the grouped kernels take it: (rule, scale_front, limit), or None
    for "galore" (its bucket keys and launches stay GaLore's)."""
    rule = group.get("update", "galore")
    if rule == "galore":
        return None
    apollo = rule.startswith("apollo")
    return (rule, bool(apollo and group["scale_front"]),
            rule == "fira" or (apollo and not group["disable_nl"]))


def _rule_route(backend: str, pr: _Problem) -> Optional[str]:
    """How backend "triton" steps a parameter with a rule other than galore, or int8 moments: "grouped" if
    the grouped kernels run it (update_rules.grouped_supported, stepped in place), "int8" for an unprojected
    dense tensor with int8 moments (the grouped int8 kernel); None: the reference per parameter, as before
    (never raises: the reference runs these on every backend)."""
    int8 = pr.key[3] == torch.uint8
    if (pr.weight.dtype not in KERNEL_DTYPES or pr.write_back is not None or (int8 and pr.side == "full")
            or not update_rules.grouped_supported(pr.group, pr.side, tuple(pr.grad.shape))):
        return None
    try:
        runner = _runner(backend, pr.weight)
    except (RuntimeError, TypeError):
        return None
    if runner != "triton":
        return None
    if int8 and pr.side is None:  # the int8 kernel walks param, grad and moments flat
        return "int8" if pr.weight.is_contiguous() and pr.grad.is_contiguous() else None
    return "grouped"


class _GroupedBucket:
    """A triton bucket's grouped tables (kernels/grouped.py): problems in the builders' form, the low-rank
    N buffer each projected problem writes (allocated once per build), and the (beta1, beta2, eps) the
    tables hold per problem (so a bucket may span param groups). ``rule``: _rule_spec's (None: galore)."""

    def __init__(self, side: Optional[str], bucket: list, rule: Optional[tuple] = None):
        grouped = _grouped()
        self.side, self.rule = side, rule
        self.int8 = bool(bucket) and bucket[0].key[3] == torch.uint8  # moments as int8 codes (quant.py)
        self.N = None if side is None else [
            torch.empty(pr.state["exp_avg"].shape, dtype=pr.grad.dtype, device=pr.grad.device) for pr in bucket]
        self.hyper = [_adam_hyper(pr.group) for pr in bucket]
        self.has_previous = [pr.has_previous for pr in bucket]
        problems = [dict(prob, beta1=b1, beta2=b2, eps=eps, has_previous=bool(prev))
                    for prob, (b1, b2, eps), prev in zip(self.problems(bucket), self.hyper, self.has_previous)]
        if side == "full":
            from .kernels import grouped_full
            self.tables = grouped_full.build_full_tables(problems)
            self.step = grouped_full.grouped_full_step
        elif side is None and self.int8:
            from .kernels import grouped_int8_adam
            self.tables = grouped_int8_adam.build_int8_tables(problems, "unprojected")
            self.step = grouped_int8_adam.int8_adam_step
        elif side is None:
            self.tables = grouped.build_adamw_tables(problems)
            self.step = grouped.grouped_adamw_step
        else:
            options = {} if rule is None else dict(rule=rule[0], scale_front=rule[1], limit=rule[2])
            self.tables = grouped.build_projected_tables(problems, side, fill_sms=False, **options)
            self.step = grouped.grouped_projected_step

    def problems(self, bucket: list) -> list:
        moments = MOMENT_KEYS + (quant.QUANT_KEYS if self.int8 else ())
        if self.side is None:
            return [dict(param=pr.weight, grad=pr.grad, **{k: pr.state[k] for k in moments}) for pr in bucket]
        if self.side == "full":
            return [dict(param=pr.weight, grad=pr.grad, P=pr.P, Q=pr.Q, N=N, **{k: pr.state[k] for k in moments})
                    for pr, N in zip(bucket, self.N)]
        limiting = self.rule is not None and self.rule[2]
        return [dict(param=pr.weight, grad=pr.grad, basis=pr.P if self.side == "left" else pr.Q, N=N,
                     **{k: pr.state[k] for k in moments},
                     **({"limiter_norm": pr.state["limiter_norm"]} if limiting else {}))
                for pr, N in zip(bucket, self.N)]

    def matches(self, bucket: list) -> bool:
        return self.tables.matches(self.problems(bucket))

    def sync_hyper(self, groups: list) -> None:
        """Rewrite the tables' betas and eps in place where a group's changed (host-to-device only)."""
        hyper = [_adam_hyper(group) for group in groups]
        if hyper != self.hyper:
            _no_capture(self.tables.device)
            self.tables.set_hyper(hyper)
            self.hyper = hyper

    def prepare(self, bucket: list) -> None:
        """Before the launches: current betas/eps, which limiter norms hold an earlier step's, and the tables
        pointed at this step's gradients."""
        self.sync_hyper([pr.group for pr in bucket])
        if self.rule is not None and self.rule[2]:
            flags = [pr.has_previous for pr in bucket]
            if flags != self.has_previous:
                _no_capture(self.tables.device)
                self.tables.set_has_previous(flags)
                self.has_previous = flags
        grads = [pr.grad for pr in bucket]
        if (cuda_graphs.capturing(self.tables.device)
                and tuple((g.data_ptr(), g.stride()) for g in grads) != self.tables.grad_signature):
            raise RuntimeError("GaLoreAdamW: the gradients moved since the last eager step; a CUDA graph needs "
                               "static gradients (zero_grad(set_to_none=False)) and an eager step before capture")
        self.tables.update_grads(grads)

    def run(self, scalars: torch.Tensor) -> None:
        """The bucket's launches (two projected, one unprojected); ``scalars``: its rows of the device table.
        Then the tables let go of the gradients (the addresses stay; the next prepare re-points them)."""
        self.step(self.tables, scalars)
        self.tables.release_grads()


def _run_single(bucket: list) -> None:
    """The per-parameter kernels with host step scalars (never under CUDA graph capture: see step())."""
    from .kernels import galore_step

    for pr in bucket:
        galore_step(pr.weight, pr.grad, pr.P, pr.Q, pr.state["exp_avg"], pr.state["exp_avg_sq"],
                    **_host_scalars(pr))
