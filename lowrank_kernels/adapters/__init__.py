"""Low-rank adapters initialised from the gradient, on our seeded randomized SVD.

* :func:`deep_lora`: compressed Deep LoRA, ΔW = L (W3 W2 W1) Rᵀ (Yaras et al., ICML 2024);
* :func:`lora_ga`: LoRA-GA, the paper's or PEFT 0.21's convention, optionally as a PEFT model;
* :func:`lora_sb`: LoRA-SB on the LoRA-XS architecture (a trainable r x r core);
* :func:`lora`: plain LoRA, the baseline;
* :func:`accumulate_gradients`: the mean weight gradients they initialise from.

Each adapts the model in place and returns an :class:`AdapterSet` (optimizer groups, merge / unmerge,
adapter-only ``state_dict``). Targets are chosen as :func:`~lowrank_kernels.galore_param_groups` chooses them.
"""
from .core import AdapterSet
from .grads import accumulate_gradients
from .layers import AdapterLinear, DeepLoraLinear, LoraLinear, LoraSBLinear
from .methods import deep_lora, lora, lora_ga, lora_sb

__all__ = ["deep_lora", "lora_ga", "lora_sb", "lora", "accumulate_gradients", "AdapterSet",
           "AdapterLinear", "LoraLinear", "LoraSBLinear", "DeepLoraLinear"]
