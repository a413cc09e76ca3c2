"""LoRA-GA as a PEFT model: PEFT's own LoRA layers, carrying factors computed with our rsvd.

The config says ``init_lora_weights="lora_ga"`` (so ``save_pretrained(path_initial_model_for_weight_conversion=...)``
treats the model as PEFT's LoRA-GA). No gradient is attached to the layers, so PEFT's own init falls back to
its default; the factors and the base-weight offset are then written exactly as PEFT's ``lora_ga_init`` writes
them: A, B in the weight's dtype, ``W ← W − scaling · B A`` computed in fp32.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

__all__ = ["require_peft", "peft_lora_ga"]


def require_peft() -> None:
    try:
        importlib.import_module("peft")
    except ImportError as exc:
        raise ImportError("lora_ga(..., peft=True) needs PEFT: pip install peft") from exc


def peft_lora_ga(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, alpha: float):
    """``get_peft_model`` on exactly the modules in ``factors`` ({name: (A, B)}), then our A, B and offset."""
    from peft import LoraConfig, LoraGAConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(factors),
                        init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    with torch.random.fork_rng(devices=[]):  # PEFT's fallback init draws from the global RNG: leave it as it was
        peft_model = get_peft_model(model, config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, (A, B) in factors.items():
            layer = inner.get_submodule(name)
            layer.lora_A["default"].weight.data = A.contiguous()
            layer.lora_B["default"].weight.data = B.contiguous()
            w = layer.get_base_layer().weight
            offset = layer.scaling["default"] * (B.float() @ A.float())
            w.data = (w.data.float() - offset).to(w.dtype)
    return peft_model
