"""The randomized SVD op ``lowrank_kernels::rsvd``.

The schema is defined here, in Python, so the op exists on every install. Its kernels:

* CPU: :func:`rsvd_torch`, the PyTorch implementation below.
* CUDA: the compiled cuSOLVER/cuBLAS kernel from ``csrc/`` when the extension was built and loads;
  otherwise :func:`rsvd_torch` again, so CUDA tensors always work.
* Meta/fake: shapes only, for ``torch.compile`` and FakeTensor tracing.

Contract (shared by every kernel): ``rsvd(A, k, oversample=10, niter=2, seed=0) -> (U, S, V)`` with
``torch.svd_lowrank``'s convention: ``A ~= U diag(S) V^T``, U is m x k, S has k entries in descending
order, V is n x k. Compute is fp32 for any floating input dtype; outputs are fp32. A may carry one
batch dimension ``(b, m, n)``; element ``i`` is then computed exactly as a single call with seed
``seed + i`` would compute it, so batching never changes results.

Determinism: the Gaussian test matrix of the PyTorch kernel is drawn on the CPU from a generator seeded
with ``seed`` and then moved to A's device, so the same seed gives the same test matrix on every device,
process and replica.
"""
from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["rsvd", "rsvd_torch", "svd_from_range", "canonical_signs", "cuda_ext_available"]

_NS = "lowrank_kernels"
_lib = torch.library.Library(_NS, "DEF")
_lib.define(
    "rsvd(Tensor A, int k, int oversample=10, int niter=2, int seed=0) -> (Tensor U, Tensor S, Tensor V)"
)


def _check_args(A: torch.Tensor, k: int, oversample: int, niter: int) -> None:
    if A.dim() not in (2, 3):
        raise ValueError(f"rsvd expects a 2-D matrix or a 3-D batch of matrices, got shape {tuple(A.shape)}")
    if not (A.is_floating_point()):
        raise TypeError(f"rsvd expects a real floating-point tensor, got {A.dtype}")
    m, n = A.shape[-2:]
    if not 1 <= k <= min(m, n):
        raise ValueError(f"rsvd: k={k} must be in [1, min(m, n)={min(m, n)}] for a {m}x{n} matrix")
    if oversample < 0 or niter < 0:
        raise ValueError(f"rsvd: oversample ({oversample}) and niter ({niter}) must be >= 0")


def gaussian_test_matrix(n: int, cols: int, seed: int, device: torch.device) -> torch.Tensor:
    """The n x cols standard-normal sketch, identical on every device for a given seed."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(n, cols, generator=gen, dtype=torch.float32).to(device)


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def svd_from_range(A: torch.Tensor, Y: torch.Tensor, k: int, niter: int):
    """Truncated SVD of A (m x n) from Y (m x w, w >= k), an estimate of A's range.

    Y is orthonormalised, refined by ``niter`` power iterations (each half re-orthonormalised), and the
    small matrix Q^T A is decomposed exactly (Rayleigh-Ritz). Y comes from a Gaussian sketch (rsvd) or
    from a previous basis (a warm start).
    """
    Q = _orthonormal(Y)
    for _ in range(niter):
        Z = _orthonormal(A.T @ Q)
        Q = _orthonormal(A @ Z)
    B = Q.T @ A                                      # w x n
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return Q @ Ub[:, :k], S[:k], Vh[:k].T


def canonical_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular-vector pairs so that the largest-magnitude entry of each column of U is positive.

    A singular pair is defined up to a joint sign, and which sign a factorisation returns can change
    with roundoff (a different reduction order, another world size). Under GaLore's "keep" moments
    rule a flipped basis column flips the meaning of its moments, so two otherwise-equal runs drift
    apart; a convention makes the basis a function of the subspace alone. Ties go to the first entry.
    """
    pivot = U.gather(-2, U.abs().argmax(dim=-2, keepdim=True))
    sign = torch.where(pivot < 0, -1.0, 1.0).to(U.dtype)
    return U * sign, V * sign


def _rsvd_single(A: torch.Tensor, k: int, oversample: int, niter: int, seed: int):
    """Halko, Martinsson & Tropp (2011), Alg. 4.4 + 5.1, on an fp32 m x n matrix."""
    m, n = A.shape
    # Work on the orientation whose sketch is thinner; the result is transposed back at the end.
    transposed = m < n
    if transposed:
        A = A.T
        m, n = n, m
    width = min(k + oversample, n)
    U, S, V = svd_from_range(A, A @ gaussian_test_matrix(n, width, seed, A.device), k, niter)
    if transposed:
        U, V = V, U
    U, V = canonical_signs(U, V)
    return U.contiguous(), S.contiguous(), V.contiguous()


def rsvd_torch(A: torch.Tensor, k: int, oversample: int = 10, niter: int = 2, seed: int = 0):
    """PyTorch kernel of ``lowrank_kernels::rsvd`` (the CPU kernel and the CUDA fallback)."""
    _check_args(A, k, oversample, niter)
    A32 = A.to(torch.float32)
    if A32.dim() == 2:
        return _rsvd_single(A32, k, oversample, niter, seed)
    outs = [_rsvd_single(A32[i], k, oversample, niter, seed + i) for i in range(A32.shape[0])]
    return tuple(torch.stack(parts) for parts in zip(*outs))


def _rsvd_fake(A, k, oversample=10, niter=2, seed=0):
    _check_args(A, k, oversample, niter)
    *batch, m, n = A.shape
    return (
        A.new_empty((*batch, m, k), dtype=torch.float32),
        A.new_empty((*batch, k), dtype=torch.float32),
        A.new_empty((*batch, n, k), dtype=torch.float32),
    )


_lib.impl("rsvd", rsvd_torch, "CPU")
torch.library.register_fake(f"{_NS}::rsvd", _rsvd_fake, lib=_lib)


# ---- the compiled CUDA kernel (csrc/), loaded when it was built -------------------------------------
_EXT_STATUS = "not loaded"


def _load_cuda_ext() -> str:
    """Load the compiled library if present; return a sentence saying which CUDA kernel runs and why."""
    if os.environ.get("LOWRANK_KERNELS_DISABLE_CUDA_EXT") == "1":
        return "disabled by LOWRANK_KERNELS_DISABLE_CUDA_EXT=1"
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return ("compiled extension not built (this install has no lowrank_kernels._C); on a machine with "
                "CUDA torch and a toolkit: LOWRANK_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation .")
    try:
        from . import _C  # noqa: F401  (importing runs TORCH_LIBRARY_IMPL(lowrank_kernels, CUDA, m))
    except (ImportError, OSError) as exc:
        return f"compiled extension failed to load: {exc}"
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NS}::rsvd", "CUDA"):
        return "ok"
    return "compiled extension loaded but registered no CUDA kernel for lowrank_kernels::rsvd"


_EXT_STATUS = _load_cuda_ext()
if _EXT_STATUS != "ok":
    # Same math on CUDA tensors when the compiled kernel is absent.
    _lib.impl("rsvd", rsvd_torch, "CUDA")


def cuda_ext_available() -> tuple[bool, str]:
    """``(True, "ok")`` when the compiled CUDA rsvd kernel is registered; else ``(False, why)``.

    When it is False, CUDA tensors run the PyTorch kernel instead.
    """
    return _EXT_STATUS == "ok", _EXT_STATUS


def rsvd(A: torch.Tensor, k: int, *, oversample: int = 10, niter: int = 2, seed: int = 0):
    """Randomized truncated SVD: ``A ~= U diag(S) V^T`` with U m x k, S k, V n x k (fp32).

    A randomized range finder (Gaussian sketch of ``k + oversample`` columns) with ``niter`` power
    iterations, each re-orthonormalised by QR, followed by an exact SVD of the small projected matrix.
    Deterministic for a given ``seed`` on every device. ``A`` may be a ``(b, m, n)`` batch; element ``i``
    then uses ``seed + i``. The PyTorch kernel returns :func:`canonical_signs` (each column of U has its
    largest-magnitude entry positive).
    """
    return torch.ops.lowrank_kernels.rsvd(A, int(k), int(oversample), int(niter), int(seed))
