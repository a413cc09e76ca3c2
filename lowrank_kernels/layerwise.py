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
them raises (a step might otherwise be skipped or taken at the wrong micro-batch). Data parallelism is
not supported: DDP reduces gradients in buckets after the hooks would already have consumed them.
FSDP2 (``fully_shard``) is: it runs these hooks itself on the sharded parameters, after its
reduce-scatter, in the same order on every rank (tests/test_fsdp.py).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

__all__ = ["LayerwiseUpdates"]


class LayerwiseUpdates:
    """Hooks that step ``optimizer`` parameter by parameter during backward; see the module docstring.

    ``optimizer`` needs ``step_param(p)`` (lowrank_kernels.GaLoreAdamW). ``remove()`` (or leaving a
    ``with LayerwiseUpdates(...)`` block) takes the hooks off and restores the ordinary behaviour.
    """

    def __init__(self, optimizer, accumulation_steps: int = 1, max_grad_norm: Optional[float] = None):
        if not hasattr(optimizer, "step_param"):
            raise TypeError(f"{type(optimizer).__name__} has no step_param(p); use lowrank_kernels.GaLoreAdamW")
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.micro_batches = 0  # backward passes run through micro_batch() so far
        self._inside: Optional[bool] = None  # None: outside micro_batch(); else: does this backward step?
        self._params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._params]

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

    def __enter__(self) -> "LayerwiseUpdates":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- inside backward ------------------------------------------------------------------------------
    def _hook(self, p: torch.Tensor) -> None:
        if self._inside is None:
            raise RuntimeError(
                "backward ran outside LayerwiseUpdates.micro_batch(): use lw.backward(loss) or "
                "`with lw.micro_batch(): loss.backward()`, or lw.remove() the hooks first"
            )
        if self._inside:
            self._step(p)

    def _step(self, p: torch.Tensor) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        self.optimizer.step_param(p)
        p.grad = None  # the point of layer-wise updates: the full-size gradient goes now

    def _finish_step(self) -> None:
        """End of a stepping backward: an ordinary ``step()`` for whatever still holds a gradient.

        Those are parameters whose hook did not fire in this backward (no gradient flowed to them) but
        that kept one from earlier micro-batches; the ordinary loop would update them, so this does too.
        Calling ``step()`` (a no-op for everything already stepped: their gradients are None) also runs
        the optimizer's step hooks and tells LR schedulers that the optimizer stepped.
        """
        leftovers = [p for p in self._params if p.grad is not None]
        if self.max_grad_norm is not None:
            for p in leftovers:
                torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        self.optimizer.step()
        for p in leftovers:
            p.grad = None
