"""Layer-wise updates: step each parameter inside backward, as soon as its gradient is complete.

A post-accumulate-grad hook on every parameter calls ``optimizer.step_param(p)`` and then frees ``p.grad``,
so at most about one full-size gradient is alive at a time instead of all of them (GaLore's per-layer
mode, and what transformers' ``*_layerwise`` optimizers do). Unlike those, this keeps ONE real optimizer:

* **gradient accumulation**: with ``accumulation_steps=k`` the hooks step only during the k-th backward
  of each optimizer step; earlier micro-batches accumulate into ``p.grad`` as usual (so full-size
  gradients do live between micro-batches: the saving is in the last backward only, and complete with
  k=1);
* **LR schedulers**: the optimizer's ``param_groups`` are the real ones, so a torch scheduler drives it;
  call ``scheduler.step()`` once per optimizer step, after the backward that stepped;
* **gradient clipping**: global-norm clipping is impossible, because no moment exists at which all
  gradients are present. ``max_grad_norm`` clips each parameter's gradient to that norm on its own
  before its step: per-parameter clipping, NOT equivalent to ``clip_grad_norm_`` over the model.

Results equal the ordinary loop (backward on every micro-batch, then ``step()`` and ``zero_grad()``) bit
for bit: each parameter's step depends only on its own gradient and state (tests/test_layerwise.py).

    lw = LayerwiseUpdates(optimizer, accumulation_steps=4)
    for batch in loader:
        if lw.backward(model.loss(*batch) / 4):  # True when this backward stepped the optimizer
            scheduler.step()
    lw.remove()

``with lw.micro_batch(): loss.backward()`` is the same as ``lw.backward(loss)``. A backward outside
them raises (a step might otherwise be skipped or taken at the wrong micro-batch).

**DistributedDataParallel**: pass ``model=ddp_model``. A gradient is complete on one replica long before
DDP has averaged it, so the steps then run from a DDP communication hook, bucket by bucket, once each
bucket's all-reduce is done, with the averaged gradient: the result is bit-identical to the ordinary
DDP loop, and the steps overlap the remaining backward and communication. Run the non-stepping
micro-batches (forward and backward) under ``ddp_model.no_sync()``. DDP keeps its own full-size gradient
buckets, so under DDP this saves no gradient memory. ``register_lowrank_comm_hook`` on the same model
adds compression (:mod:`lowrank_kernels.distributed.ddp`). Under torch.distributed (world size > 1) a
missing ``model`` raises: give the DDP module, or any other module (e.g. FSDP's) when gradients are
already reduced when they reach ``p.grad``. A gradient written to a parameter after its step (DDP not
declared) raises at the end of that backward.
FSDP2 (``fully_shard``) runs these hooks itself on the sharded parameters, after its reduce-scatter,
in the same order on every rank (tests/test_fsdp.py).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .distributed import fsdp
import torch.distributed as dist

__all__ = ["LayerwiseUpdates"]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_ddp(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


class LayerwiseUpdates:
    """Hooks that step ``optimizer`` parameter by parameter during backward; see the module docstring.

    ``optimizer`` needs ``step_param(p)`` (lowrank_kernels.GaLoreAdamW). ``remove()`` (or leaving a
    ``with LayerwiseUpdates(...)`` block) takes the hooks off and restores the ordinary behaviour.
    """

    def __init__(self, optimizer, accumulation_steps: int = 1, max_grad_norm: Optional[float] = None, *,
                 model: Optional[torch.nn.Module] = None):
        if not hasattr(optimizer, "step_param"):
            raise TypeError(f"{type(optimizer).__name__} has no step_param(p); use lowrank_kernels.GaLoreAdamW")
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        ddp = _is_ddp(model)
        # FSDP2 shards (DTensor parameters) are stepped from hooks FSDP2 runs after its reduce-scatter.
        sharded = any(fsdp.is_dtensor(p) for g in optimizer.param_groups for p in g["params"])
        if model is None and not sharded and _world_size() > 1:
            raise ValueError(
                f"LayerwiseUpdates under torch.distributed (world size {_world_size()}) needs model=: the "
                "DistributedDataParallel module (steps then wait for DDP's averaged gradients), or the "
                "module whose gradients are already reduced when each parameter's hook fires (FSDP)"
            )
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.micro_batches = 0  # backward passes run through micro_batch() so far
        self._inside: Optional[bool] = None  # None: outside micro_batch(); else: does this backward step?
        self._params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._stepped: list = []  # parameters stepped in the current stepping backward
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._params]
        self._ddp, self._comm = None, None
        if ddp:
            from .distributed.ddp import install_comm_hook

            self._ddp, self._ids = model, {id(p) for p in self._params}
            self._reduced = 0  # buckets reduced (and stepped) in the current stepping backward
            self._comm = install_comm_hook(model, optimizer, after=self._after_reduce)

    # ---- the training-loop API ------------------------------------------------------------------------
    @property
    def will_step(self) -> bool:
        """Whether the next micro-batch's backward steps the optimizer (it is the last of its step)."""
        return (self.micro_batches + 1) % self.accumulation_steps == 0

    @contextlib.contextmanager
    def micro_batch(self):
        """Run one micro-batch's backward inside; yields whether it steps the optimizer."""
        if self._inside is not None:
            raise RuntimeError("micro_batch() blocks cannot be nested")
        steps = self.will_step
        self._inside = steps
        self._stepped, self._reduced = [], 0
        try:
            yield steps
            if steps:
                self._finish_step()
        finally:
            self._inside = None
        self.micro_batches += 1

    def backward(self, loss: torch.Tensor, **kwargs) -> bool:
        """``loss.backward(**kwargs)`` as one micro-batch; returns whether the optimizer stepped."""
        with self.micro_batch() as steps:
            loss.backward(**kwargs)
        return steps

    def remove(self) -> None:
        """Take the hooks off; gradients then stay in ``p.grad`` for an ordinary ``optimizer.step()``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._comm is not None:
            self._comm.after = None  # DDP cannot unregister a hook: it goes back to a plain all-reduce

    def __enter__(self) -> "LayerwiseUpdates":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- inside backward ------------------------------------------------------------------------------
    # Eager under torch.compile: a compiled training step runs backward in a graph break, where dynamo
    # compiles every Python frame it enters, this hook's included, once per parameter shape (its guards
    # are on ``p``): a compile per parameter and, past the recompile limit (8), warnings. It steps through
    # step_param, which runs eagerly anyway.
    @torch.compiler.disable
    def _hook(self, p: torch.Tensor) -> None:
        if self._inside is None:
            raise RuntimeError(
                "backward ran outside LayerwiseUpdates.micro_batch(): use lw.backward(loss) or "
                "`with lw.micro_batch(): loss.backward()`, or lw.remove() the hooks first"
            )
        if self._inside and self._ddp is None:  # under DDP, _after_reduce steps once p is averaged
            self._step(p)

    def _step(self, p: torch.Tensor) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        self.optimizer.step_param(p)
        p.grad = None  # the point of layer-wise updates: the full-size gradient goes now
        self._stepped.append(p)

    def _after_reduce(self, bucket, fut):
        """DDP: called by the communication hook after it launched a bucket's all-reduce; in a stepping
        backward, waits for it and steps the bucket's parameters with their averaged gradients.

        The steps run here, in the backward's own thread, not in a callback of the future: a callback
        may run in a communication thread whose CPU math (LAPACK, thread count) can round differently,
        and replicas must stay bit-identical. On CUDA, waiting only orders the streams. DDP copies the
        bucket back into ``p.grad`` at the end of backward, so each step reads the bucket's view.
        """
        if not self._inside:
            return fut
        self._reduced += 1
        params, grads = bucket.parameters(), bucket.gradients()
        used = [True] * len(params)
        if self._ddp.find_unused_parameters:
            # The ordinary loop steps a parameter only if some replica gave it a gradient (DDP leaves a
            # globally unused one's grad None): all-reduce "has a gradient" flags, one per parameter.
            flags = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=grads[0].device)
            dist.all_reduce(flags, group=self._comm.process_group)
            self._comm.count(flags.numel() * flags.element_size())
            used = flags.tolist()
        result = fut.wait()  # raises if the reduction failed
        for p, g, flag in zip(params, grads, used):
            if flag and id(p) in self._ids:
                p.grad = g  # the averaged gradient, a view into the reduced bucket
                self._step(p)
        done = torch.futures.Future()
        done.set_result(result)
        return done

    def _finish_step(self) -> None:
        """End of a stepping backward: an ordinary ``step()`` for whatever still holds a gradient.

        Those are parameters whose hook did not fire in this backward (no gradient flowed to them) but
        that kept one from earlier micro-batches; the ordinary loop would update them, so this does too.
        Calling ``step()`` (a no-op for everything already stepped: their gradients are None) also runs
        the optimizer's step hooks and tells LR schedulers that the optimizer stepped.
        """
        stepped, self._stepped = self._stepped, []
        if self._ddp is not None:
            for p in stepped:
                p.grad = None  # DDP copied the averaged bucket back into it after the step
            if not self._reduced and any(p.grad is not None for p in self._params):
                raise RuntimeError(
                    "LayerwiseUpdates: DDP reduced no gradient in the backward that steps (was it run under "
                    "no_sync()?); nothing was stepped. Run only the non-stepping micro-batches under no_sync()"
                )
        elif any(p.grad is not None for p in stepped):
            raise RuntimeError(
                "LayerwiseUpdates: a gradient was written to a parameter after its step in this backward: "
                "is the model wrapped in DistributedDataParallel? Pass model=ddp_model, so that each "
                "parameter is stepped with DDP's averaged gradient"
            )
        leftovers = [p for p in self._params if p.grad is not None]
        if self.max_grad_norm is not None:
            for p in leftovers:
                torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        self.optimizer.step()
        for p in leftovers:
            p.grad = None
