"""What every gradient-initialised adapter shares: target selection and input checks, the bucketed
seeded rsvd of the gradients, wrapping the targets, and the :class:`AdapterSet` handle."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..hf import target_linear_modules
from ..linalg import rsvd
from .layers import AdapterLinear, LoraLinear

__all__ = ["AdapterSet", "select_targets", "gradients_for", "bucketed_rsvd"]


def select_targets(model: nn.Module, target_modules: Union[str, list[str]]) -> dict[str, nn.Linear]:
    """``{name: nn.Linear}`` chosen as :func:`~lowrank_kernels.galore_param_groups` chooses them."""
    targets = target_linear_modules(model, target_modules, stacklevel=3)  # warn at the user's call
    if "" in targets:
        raise ValueError("the model itself is an nn.Linear: wrap it in a module so the adapter can replace it")
    for name in targets:
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(parent, AdapterLinear):
            raise ValueError(f"{name} is the base layer of an adapter already: the model is adapted "
                             "(choose target_modules that leave out '.base_layer')")
    return targets


def gradients_for(targets: Mapping[str, nn.Linear], grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each target's weight gradient from ``grads`` (keyed by module name, or by ``name.weight``), checked."""
    if not isinstance(grads, Mapping):
        raise TypeError(f"grads must map module names to weight gradients (accumulate_gradients makes one); "
                        f"got {type(grads).__name__}")
    out = {}
    for name, module in targets.items():
        g = grads.get(name, grads.get(f"{name}.weight"))
        shape = tuple(module.weight.shape)
        if g is None:
            raise ValueError(f"no gradient for target {name} (weight {shape[0]}x{shape[1]}) in grads; "
                             f"it has {len(grads)} entries, e.g. {sorted(grads)[:3]}")
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != shape:
            got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"gradient for {name} has shape {got}, its weight {shape}")
        if not torch.isfinite(g).all():
            raise ValueError(f"gradient for {name} has non-finite values")
        out[name] = g
    return out


def check_untied(model: nn.Module, targets: Mapping[str, nn.Linear], method: str) -> None:
    """Raise when a target weight is shared with another parameter: offsetting it would change that one too."""
    names = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    for name, module in targets.items():
        shared = [n for n in names[id(module.weight)] if n != f"{name}.weight"]
        if shared:
            raise ValueError(f"{method} offsets the base weight, but {name}.weight is tied to {shared[0]}: "
                             "leave it out of target_modules")


def check_rank(targets: Mapping[str, nn.Linear], rank: int, method: str, need: Callable[[int], int]) -> None:
    """Raise, naming the first offending target, unless ``need(rank) <= min(out, in)`` for every target."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{method}: rank must be a positive int, got {rank!r}")
    for name, module in targets.items():
        m, n = module.weight.shape
        if need(rank) > min(m, n):
            raise ValueError(f"{method}: rank {rank} is too large for {name} (weight {m}x{n}): it needs "
                             f"{need(rank)} <= min(out, in) = {min(m, n)}")


def _batched_rsvd(stack: torch.Tensor, k: int, seeds: torch.Tensor, oversample: int, niter: int):
    """rsvd of each matrix of a (b, m, n) stack with its own seed: (U b x m x k, S b x k, V b x n x k).

    Element i depends only on ``seeds[i]``: the op's per-element seeds.
    """
    return rsvd(stack, k, oversample=oversample, niter=niter, seed=seeds.to(torch.int64).cpu())


def bucketed_rsvd(mats: Mapping[str, torch.Tensor], k: int, seeds: Mapping[str, int], *, oversample: int,
                  niter: int, desc: str, progress: Optional[bool] = None) -> dict[str, tuple]:
    """``{name: (U, S, V)}`` (fp32, rank ``k``): one seeded batched rsvd per (shape, device) bucket.

    ``progress``: None shows a bar for 16 or more matrices on a terminal; True / False force it.
    The stack of a bucket is an fp32 copy of its gradients (the memory peak of initialisation).
    """
    buckets = defaultdict(list)
    for name, a in mats.items():
        buckets[(tuple(a.shape), a.device)].append(name)
    disable = (len(mats) < 16 or None) if progress is None else not progress
    out = {}
    with tqdm(total=len(mats), desc=desc, unit="matrix", disable=disable) as bar:
        for names in buckets.values():
            stack = torch.stack([mats[n].float() for n in names])
            seed_t = torch.tensor([seeds[n] for n in names], dtype=torch.int64)
            U, S, V = _batched_rsvd(stack, min(k, *stack.shape[1:]), seed_t, oversample, niter)
            del stack
            for i, n in enumerate(names):
                out[n] = (U[i], S[i], V[i])
            bar.update(len(names))
    return out


class AdapterSet:
    """The adapters one call put into a model: optimizer groups, merge / unmerge, adapter-only checkpoints.

    ``modules`` maps each target's name to its adapter module (in the model, in model order).
    """

    def __init__(self, method: str, model: nn.Module, modules: dict[str, AdapterLinear], gamma: float = 1.0):
        self.method, self.model, self.modules, self.gamma = method, model, modules, gamma

    def __repr__(self) -> str:
        return (f"AdapterSet({self.method}, {len(self.modules)} modules, "
                f"{self.num_trainable():,} trainable parameters)")

    def parameters(self) -> list[nn.Parameter]:
        """The trainable adapter parameters."""
        return [p for groups in self._roles() for p in groups]

    def _roles(self) -> tuple[list, list]:
        main, outer = [], []
        for module in self.modules.values():
            roles = module.roles()
            main += roles["main"]
            outer += roles["outer"]
        return main, outer

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self, lr: float, **group_options) -> list[dict]:
        """Groups for any torch optimizer: the main factors at ``lr``; Deep LoRA's L, R (when trained) at gamma · lr."""
        main, outer = self._roles()
        groups = [{"params": main, "lr": lr, **group_options}]
        if outer:
            groups.append({"params": outer, "lr": self.gamma * lr, **group_options})
        return groups

    def merge(self) -> None:
        """Add every ΔW to its base weight (the model then runs at base-model cost)."""
        for module in self.modules.values():
            module.merge()

    def unmerge(self) -> None:
        for module in self.modules.values():
            module.unmerge()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors only, ``{"<module>.<tensor>": tensor}``: loads with ``torch.load(weights_only=True)``."""
        return {f"{name}.{k}": v for name, module in self.modules.items() for k, v in module.adapter_state().items()}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`state_dict` output into adapters made by the same method on the same targets.

        Checked in full before anything is copied. A LoRA-GA checkpoint carries its base-weight offset
        (``init_A``, ``init_B``): the base weight is moved from this model's offset to the checkpoint's, so
        the result equals the saved model whatever gradients initialised this one.
        """
        expected = self.state_dict()
        missing, unexpected = set(expected) - set(state_dict), set(state_dict) - set(expected)
        if missing or unexpected:
            raise KeyError(f"adapter state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        for key, t in expected.items():
            if tuple(state_dict[key].shape) != tuple(t.shape):
                raise ValueError(f"{key}: checkpoint shape {tuple(state_dict[key].shape)}, adapter {tuple(t.shape)}")
        if any(m.merged for m in self.modules.values()):
            raise RuntimeError("unmerge() before loading adapter weights")
        for name, module in self.modules.items():
            reoffset = isinstance(module, LoraLinear) and module.base_offset
            if reoffset:
                w = module.base_layer.weight
                w_pretrained = w.float() + module.offset_weight()
            for k, t in module.adapter_state().items():
                t.copy_(state_dict[f"{name}.{k}"])
            if reoffset:
                w.copy_((w_pretrained - module.offset_weight()).to(w.dtype))

    def remove(self, merge: bool = True) -> nn.Module:
        """Put the plain ``nn.Linear`` layers back (with ΔW merged into them unless ``merge=False``)."""
        for name, module in self.modules.items():
            if merge and not module.merged:
                module.merge()
            elif not merge and module.merged:
                module.unmerge()
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, module.base_layer)
        self.modules = {}
        return self.model


def install(method: str, model: nn.Module, modules: dict[str, AdapterLinear], gamma: float = 1.0,
            freeze_base: bool = True) -> AdapterSet:
    """Replace each target by its adapter module; freeze every other model parameter unless told not to."""
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, module in modules.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
    return AdapterSet(method, model, modules, gamma)
