"""``accumulate_gradients``: the mean weight gradient of each target over a few batches."""
from __future__ import annotations

from typing import Callable, Iterable, Union

import torch
from torch import nn

from .core import select_targets

__all__ = ["accumulate_gradients"]


def accumulate_gradients(model: nn.Module, loss_fn: Callable[[nn.Module, object], torch.Tensor],
                         batches: Iterable, target_modules: Union[str, list[str]]) -> dict[str, torch.Tensor]:
    """``{module name: mean over batches of d loss_fn(model, batch) / d weight}`` (fp32) for each target.

    As PEFT's ``preprocess_loraga``: the model runs in train mode, only the target weights require grad
    (so no other gradient is computed or stored), and every flag, mode and existing ``.grad`` is restored
    afterwards. Gradients are summed in fp32 after each backward and divided by the batch count.
    """
    targets = select_targets(model, target_modules)
    weights = {name: module.weight for name, module in targets.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    saved_grads = {name: w.grad for name, w in weights.items()}
    was_training = model.training
    sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    count = 0
    try:
        for p in flags:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        model.train()
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(model, batch)
                if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
                    raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
                loss.backward()
                count += 1
                for name, w in weights.items():
                    if w.grad is not None:
                        sums[name] += w.grad.float()
                        w.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for name, w in weights.items():
            w.grad = saved_grads[name]
        model.train(was_training)
    if count == 0:
        raise ValueError("accumulate_gradients: batches is empty")
    return {name: s / count for name, s in sums.items()}
