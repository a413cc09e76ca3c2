"""lowrank_kernels: fused low-rank projected optimizers (GaLore family) for PyTorch.

Public API:

* :class:`GaLoreAdamW`: drop-in for ``galore_torch.GaLoreAdamW`` (reference, Triton and CUDA backends).
* :func:`rsvd`: seeded randomized SVD, the op ``torch.ops.lowrank_kernels.rsvd``.
* :func:`cuda_ext_available`: whether the compiled CUDA rsvd kernel is in use, and if not, why.
"""
from .linalg import cuda_ext_available, rsvd
from .optim import GaLoreAdamW

__all__ = ["GaLoreAdamW", "rsvd", "cuda_ext_available"]
__version__ = "0.1.0"
