"""lowrank_kernels: fused low-rank projected optimizers (GaLore family) for PyTorch.

Public API:

* :class:`GaLoreAdamW`: drop-in for ``galore_torch.GaLoreAdamW`` (reference, Triton and CUDA backends).
* :func:`rsvd`: seeded randomized SVD, the op ``torch.ops.lowrank_kernels.rsvd``.
* :func:`cuda_ext_available`: whether the compiled CUDA rsvd kernel is in use, and if not, why.
* :func:`galore_param_groups`: param groups from a model and target modules (HF's optim_target_modules).
* :class:`LayerwiseUpdates`: step each parameter inside backward, freeing gradients layer by layer.
"""
from .hf import galore_param_groups
from .layerwise import LayerwiseUpdates
from .linalg import cuda_ext_available, rsvd
from .optim import GaLoreAdamW

__all__ = ["GaLoreAdamW", "rsvd", "cuda_ext_available", "galore_param_groups", "LayerwiseUpdates"]
__version__ = "0.1.0"
