"""Adapter modules: a frozen ``nn.Linear`` (``base_layer``) plus a low-rank update ΔW (out x in).

``forward(x) = base_layer(x) + ΔW x``, computed through the factors (never forming ΔW), or just
``base_layer(x)`` once ΔW is merged into the base weight. Every module defines ``delta_weight()`` (ΔW in
fp32, for merging and tests), ``adapter_forward(x)`` and ``roles()`` (which parameters train at the
optimizer's lr, which at a scaled lr). Factors live in the base weight's dtype and device.
"""
from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdapterLinear", "LoraLinear", "LoraSBLinear", "DeepLoraLinear"]


def _param(t: torch.Tensor, trainable: bool) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=trainable)


class AdapterLinear(nn.Module, abc.ABC):
    """Common part: the frozen base layer, merge / unmerge, adapter-only tensors."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.merged = False
        for p in base_layer.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that reads module.weight (e.g. HF's dtype checks) keeps working
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y if self.merged else y + self.adapter_forward(x).to(y.dtype)

    @abc.abstractmethod
    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive output for input ``x``."""

    @abc.abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """The adapter's weight update (out x in, fp32), what merge adds to the base weight."""

    def roles(self) -> dict[str, list[nn.Parameter]]:
        """``{"main": [...], "outer": [...]}``: trainable parameters at lr and at a scaled lr."""
        return {"main": [p for p in self.parameters(recurse=False) if p.requires_grad], "outer": []}

    @torch.no_grad()
    def _add_to_base(self, sign: float) -> None:
        w = self.base_layer.weight
        w.copy_((w.float() + sign * self.delta_weight()).to(w.dtype))  # fp32 sum: one rounding per merge

    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("adapter is already merged into the base weight")
        self._add_to_base(1.0)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        self._add_to_base(-1.0)
        self.merged = False

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor (trainable or not), without the base layer's."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base_layer.")}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"


class LoraLinear(AdapterLinear):
    """LoRA: ΔW = scaling · B A with A (r x in) and B (out x r), both trained.

    ``init_A`` / ``init_B`` (LoRA-GA) are the factors the base weight was offset by at initialisation
    (W_base = W_pretrained − scaling · B_init A_init). They are kept as buffers so an adapter-only checkpoint
    is self-contained: loading one re-offsets the base weight (see :meth:`load_adapter_state`).
    """

    def __init__(self, base_layer: nn.Linear, A: torch.Tensor, B: torch.Tensor, scaling: float,
                 base_offset: bool = False):
        super().__init__(base_layer)
        self.scaling = float(scaling)
        self.lora_A = _param(A, True)
        self.lora_B = _param(B, True)
        if base_offset:
            self.register_buffer("init_A", A.detach().clone())
            self.register_buffer("init_B", B.detach().clone())

    @property
    def base_offset(self) -> bool:
        return hasattr(self, "init_A")

    def adapter_forward(self, x):
        return self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def delta_weight(self):
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def offset_weight(self) -> torch.Tensor:
        """scaling · B_init A_init: what was subtracted from the pretrained weight (0 without an offset)."""
        if not self.base_offset:
            return torch.zeros((), device=self.base_layer.weight.device)
        return self.scaling * (self.init_B.float() @ self.init_A.float())


class LoraSBLinear(AdapterLinear):
    """LoRA-XS architecture (LoRA-SB's): ΔW = scaling · B R A, A (r x in) and B (out x r) frozen, R (r x r) trained."""

    def __init__(self, base_layer: nn.Linear, A: torch.Tensor, B: torch.Tensor, R: torch.Tensor, scaling: float):
        super().__init__(base_layer)
        self.scaling = float(scaling)
        self.lora_A = _param(A, False)
        self.lora_B = _param(B, False)
        self.lora_R = _param(R, True)

    def adapter_forward(self, x):
        return self.scaling * F.linear(F.linear(F.linear(x, self.lora_A), self.lora_R), self.lora_B)

    def delta_weight(self):
        return self.scaling * (self.lora_B.float() @ self.lora_R.float() @ self.lora_A.float())


class DeepLoraLinear(AdapterLinear):
    """Compressed deep LoRA: ΔW = L (W3 W2 W1) Rᵀ, L (out x 2h), R (in x 2h), W_i (2h x 2h).

    The inner factors train at the optimizer's lr; L and R at ``gamma`` · lr, or stay frozen (gamma = 0).
    """

    def __init__(self, base_layer: nn.Linear, left: torch.Tensor, right: torch.Tensor,
                 inner: list[torch.Tensor], train_outer: bool):
        super().__init__(base_layer)
        self.left = _param(left, train_outer)
        self.right = _param(right, train_outer)
        self.inner = nn.ParameterList([_param(w, True) for w in inner])  # W1, W2, W3 in application order

    def adapter_forward(self, x):
        h = x @ self.right
        for w in self.inner:
            h = F.linear(h, w)
        return F.linear(h, self.left)

    def delta_weight(self):
        core = self.inner[0].float()
        for w in list(self.inner)[1:]:
            core = w.float() @ core
        return self.left.float() @ core @ self.right.float().T

    def roles(self):
        outer = [p for p in (self.left, self.right) if p.requires_grad]
        return {"main": list(self.inner), "outer": outer}
