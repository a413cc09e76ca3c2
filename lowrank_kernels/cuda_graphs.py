"""CUDA graphs of the ordinary step: what a capture may contain, what it records, what a replay checks.

The pattern (README, "CUDA graphs and torch.compile"): eager warm-up steps, then capture a training step
whose ``opt.step()`` is ordinary; each later step is either eager (``opt.refresh_due()``: the SVDs run on the
host) or ``opt.replay(graph)``.

* **A capture counts nothing.** Capturing launches no kernel, so a captured step has not happened: the
  engine takes back the host step counts it advanced, and every ``opt.replay(graph)``, the first one too,
  advances them by one, so the host's counts (refresh schedule, checkpoints) follow the device's.
* **Only device-driven steps are captured.** Steps whose scalars are host numbers (the per-parameter
  reference and kernels: rules or int8 moments the whole-model step runs per parameter, channels_last conv
  weights on backend "triton", FSDP2 shards) would freeze this step's bias correction into the graph, and
  options that read a device value at every step (``refresh_policy="converged"``, ``check_finite=True``)
  would synchronise inside the capture: all refused before anything changes, as is a refresh.
* **A replay checks the graph is still valid.** The graph holds addresses: of the moments and bases it
  updates (baked into the captured launches, or held by the grouped kernels' tables) and of the device
  step scalars. After any eager step, ``load_state_dict`` or ``add_param_group``, the first replay
  compares them with the optimizer's current tensors and refuses a stale graph (a rank change at a
  refresh, a restarted or reloaded weight) instead of updating memory the optimizer no longer uses. An
  eager step between replays also points the grouped tables at its own gradients; the check points them
  back at the captured ones, which the graph's backward writes.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import quant
from .projection import BASIS_KEYS, MOMENT_KEYS

# State tensors a captured step reads or writes by address.
_ADDRESSED_KEYS = BASIS_KEYS + MOMENT_KEYS + quant.QUANT_KEYS + ("limiter_norm",)


def capturing(device: torch.device) -> bool:
    """Is the current stream of ``device`` capturing a CUDA graph?"""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_groups(groups: list) -> None:
    """Before a step is planned: under capture, refuse options whose every step reads a device value on the
    host (a synchronisation, which a capture turns into a CUDA error deep inside the step)."""
    for group in groups:
        if group.get("refresh_policy") == "converged":
            why = "refresh_policy='converged' reads ||R|| on the host at every step"
        elif group.get("check_finite"):
            why = "check_finite=True reads whether the gradients are finite on the host at every step"
        else:
            continue
        if group["params"] and capturing(group["params"][0].device):
            raise RuntimeError(f"GaLoreAdamW: this step cannot be captured in a CUDA graph: {why}; use "
                               "another policy (or check_finite=False) for captured steps")


def refuse_refresh() -> None:
    raise RuntimeError("GaLoreAdamW: a basis refresh is due and cannot run inside a CUDA graph capture; "
                       "check opt.refresh_due() and run refresh steps eagerly")


def check_capturable(own: list, problems: list) -> None:
    """Raise (before anything changes) if this step cannot be captured: ``own`` are the per-parameter
    work items (host step scalars), ``problems`` the engine's."""
    if own:
        group, p = own[0][0], own[0][1]
        options = {k: group[k] for k in ("update", "state_dtype", "projector", "proj_type") if group.get(k)}
        raise RuntimeError(
            f"GaLoreAdamW: this step cannot be captured in a CUDA graph: parameter #{own[0][2]} (shape "
            f"{tuple(p.shape)}, {options or 'no projection'}) runs the per-parameter step, whose step sizes "
            "are host numbers the graph would freeze; capture with options the whole-model step runs on the "
            "device (README: \"Which options run the fused kernels\"), or run those steps eagerly")
    single = next((pr for pr in problems if pr.route == "single"), None)
    if single is not None:
        raise RuntimeError(
            f"GaLoreAdamW(backend='triton'): the tensor of shape {tuple(single.p.shape)} is updated through a "
            "copy (channels_last) or is one the multi-tensor kernel cannot walk flat, so it runs the "
            "per-parameter kernels, whose host step scalars a CUDA graph would freeze; capture with "
            "backend='torch' or change those parameters' layout")


def _addresses(engine, p: torch.Tensor, state: dict) -> tuple:
    """The addresses a captured step of ``p`` uses: its state tensors' and its cached regenerated basis'."""
    stored = tuple((k, state[k].data_ptr()) for k in _ADDRESSED_KEYS if torch.is_tensor(state.get(k)))
    cached = engine._bases.get(p)
    regenerated = () if cached is None else tuple((k, t.data_ptr()) for k, t in sorted(cached[2].items()))
    return stored, regenerated


class Capture:
    """What one captured step (or the layer-wise steps of one capture) reads and advances."""

    def __init__(self, epoch: int):
        self.epoch = epoch      # the engine's eager-step count when it was captured
        self.checked = epoch    # ... and when the replays last verified it
        self.items: list = []   # (param, state, addresses)
        self.entries: list = [] # (device scalars entry, groups, states)
        self.grouped: list = [] # (grouped bucket, groups, captured gradients)
        self.param_ids: set = set()  # id() of every captured parameter (refresh_due asks them all)

    def holds(self, p: torch.Tensor) -> bool:
        return id(p) in self.param_ids  # (items keep the parameters alive: their ids stay theirs)

    def add(self, engine, problems: list, entries: list, grouped: list) -> None:
        self.items += [(pr.p, pr.state, _addresses(engine, pr.p, pr.state)) for pr in problems]
        self.param_ids.update(id(pr.p) for pr in problems)
        self.entries += entries
        self.grouped += grouped

    def advance(self, n: int) -> None:
        """``n`` replays ran: the host mirror of every count the graph advances moves on."""
        for _, state, _ in self.items:
            state["step"] += n
        for entry, _, _ in self.entries:
            entry.host_steps = [s + n for s in entry.host_steps]

    def check(self, opt, engine) -> None:
        """Before a replay: refuse a stale graph; re-point tables and re-upload counts an eager step moved."""
        if self.checked == engine.epoch:
            return  # nothing ran eagerly since the last check: nothing can have moved
        for p, state, addresses in self.items:
            if opt.state.get(p) is not state or _addresses(engine, p, state) != addresses:
                raise RuntimeError(
                    f"GaLoreAdamW.replay: the graph is stale: the state of the parameter of shape "
                    f"{tuple(p.shape)} was reallocated since the capture (a rank change at a refresh under "
                    "rank_policy='energy', load_state_dict, a restarted weight, or state edited by hand); "
                    "capture the step again")
        for entry, _, states in self.entries:  # the graph's own counts (another entry may have run eagerly)
            steps = [state["step"] - state.get("moment_start", 0) for state in states]
            if steps != entry.host_steps:
                entry.upload_steps(steps)
        for cached, _, grads in self.grouped:  # the captured gradients, not the last eager step's
            cached.tables.update_grads(grads)
        self.checked = engine.epoch

    def sync_hyperparameters(self) -> None:
        for entry, groups, _ in self.entries:
            entry.sync_hyperparameters(groups)
        for cached, groups, _ in self.grouped:
            cached.sync_hyper(groups)


def record(engine, problems: list, entries: list, grouped: list) -> Capture:
    """A step of ``problems`` ran under capture: take back its host counts and record it (layer-wise steps
    captured one parameter at a time extend one record, until an eager step or a repeated parameter)."""
    for pr in problems:
        pr.state["step"] -= 1
    for entry, _, _ in entries:
        entry.host_steps = [s - 1 for s in entry.host_steps]
    capture: Optional[Capture] = engine.capture
    if capture is None or capture.epoch != engine.epoch or any(capture.holds(pr.p) for pr in problems):
        capture = Capture(engine.epoch)
    capture.add(engine, problems, entries, grouped)
    return capture
