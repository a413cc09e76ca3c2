"""The randomized SVD op ``lowrank_kernels::rsvd``.

The schema is defined here, in Python, so the op exists on every install. Its kernels:

* CPU: :func:`rsvd_torch`, the PyTorch implementation below.
* CUDA: the compiled cuSOLVER/cuBLAS kernel from ``csrc/`` when the extension was built and loads;
  otherwise :func:`rsvd_torch` again, so CUDA tensors always work.
* Meta/fake: shapes only, for ``torch.compile`` and FakeTensor tracing (same argument checks).

Contract (shared by every kernel): ``rsvd(A, k, oversample=10, niter=2, seed=0) -> (U, S, V)`` with
``torch.svd_lowrank``'s convention: ``A ~= U diag(S) V^T``, U is m x k, S has k entries in descending
order, V is n x k. Compute is fp32 for any floating input dtype; outputs are fp32. A may carry one
batch dimension ``(b, m, n)``; element ``i`` is then computed exactly as the single call on ``A[i]``
with its own seed: ``seeds[i]`` when a tensor of per-element seeds is given, else the int ``seed``
(the same for every element). So an element's basis never depends on its batch neighbours.

Seeds: the Gaussian test matrix of a call with seed ``s`` on a device is
``torch.randn(w, n, generator=torch.Generator(device).manual_seed(s), device=device).T`` (n x w,
``w = min(k + oversample, min(m, n))``, n the smaller side of A), drawn by torch's generator of
that device. The compiled CUDA kernel draws the very same matrix (ATen's CUDA generator, seeded the
same way), so on one GPU both kernels compute the same basis up to roundoff, and a run resumed where
the extension did not load continues with the same bases. Sketches differ between device types (CPU:
Mersenne Twister; CUDA: Philox, whose output also depends on the GPU's SM count), so replicas must run
on the same kind of device to agree bit for bit.
"""
from __future__ import annotations

import ctypes
import importlib.util
import operator
import os
from typing import Optional, Sequence, Union

import torch

__all__ = ["rsvd", "rsvd_torch", "svd_from_range", "canonical_signs", "cuda_ext_available",
           "gaussian_test_matrix"]

_NS = "lowrank_kernels"
_lib = torch.library.Library(_NS, "DEF")
_lib.define(
    "rsvd(Tensor A, int k, int oversample=10, int niter=2, int seed=0, Tensor? seeds=None) "
    "-> (Tensor U, Tensor S, Tensor V)"
)
_INT64 = (-(2**63), 2**63 - 1)


def _check_int(name: str, value, low: int, high: int = _INT64[1]) -> None:
    # bool is an int in Python, and the op schema would take True as 1: refuse it explicitly.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"rsvd: {name} must be an int, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"rsvd: {name}={value} must be in [{low}, {high}]")


def _as_int(name: str, value, low: int, high: int = _INT64[1]) -> int:
    """``value`` as a Python int (anything with ``__index__``, e.g. numpy ints; never bool or float)."""
    if isinstance(value, bool):
        raise TypeError(f"rsvd: {name} must be an int, got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"rsvd: {name} must be an int, got {type(value).__name__} {value!r}") from None
    _check_int(name, value, low, high)
    return value


def _check_args(A: torch.Tensor, k: int, oversample: int, niter: int, seed: int = 0,
                seeds: Optional[torch.Tensor] = None) -> None:
    """Every kernel's argument checks (the compiled kernel repeats them in C++ with the same messages)."""
    if A.dim() not in (2, 3):
        raise ValueError(f"rsvd expects a 2-D matrix or a 3-D batch of matrices, got shape {list(A.shape)}")
    if not A.is_floating_point():
        raise TypeError(f"rsvd expects a real floating-point tensor, got {A.dtype}")
    m, n = A.shape[-2:]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"rsvd: k must be an int, got {type(k).__name__} {k!r}")
    if not 1 <= k <= min(m, n):
        raise ValueError(f"rsvd: k={k} must be in [1, min(m, n)={min(m, n)}] for a {m}x{n} matrix")
    _check_int("oversample", oversample, 0)
    _check_int("niter", niter, 0)
    _check_int("seed", seed, _INT64[0])
    if seeds is None:
        return
    if A.dim() != 3:
        raise ValueError("rsvd: per-element seeds are for a (b, m, n) batch; a single matrix takes seed=int")
    if seed != 0:
        raise ValueError("rsvd: give either seed (the same for every element) or seeds (one per element)")
    if seeds.dtype != torch.int64 or seeds.device.type != "cpu" or seeds.dim() != 1:
        raise TypeError(f"rsvd: seeds must be a 1-D int64 CPU tensor, got {seeds.dtype} of shape "
                        f"{list(seeds.shape)} on {seeds.device}")
    if seeds.shape[0] != A.shape[0]:
        raise ValueError(f"rsvd: {seeds.shape[0]} seeds for a batch of {A.shape[0]} matrices")


def gaussian_test_matrix(n: int, cols: int, seed: int, device: torch.device) -> torch.Tensor:
    """The n x cols standard-normal sketch for ``seed`` on ``device``, drawn by that device's generator.

    Drawn as a contiguous (cols, n) tensor and transposed: that is the column-major n x cols buffer
    the compiled kernel fills with the same generator call, so both kernels see the same matrix.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(cols, n, generator=gen, device=device, dtype=torch.float32).T


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


def _empty_outputs(A: torch.Tensor, k: int):
    *batch, m, n = A.shape
    return (A.new_empty((*batch, m, k), dtype=torch.float32),
            A.new_empty((*batch, k), dtype=torch.float32),
            A.new_empty((*batch, n, k), dtype=torch.float32))


def rsvd_torch(A: torch.Tensor, k: int, oversample: int = 10, niter: int = 2, seed: int = 0,
               seeds: Optional[torch.Tensor] = None):
    """PyTorch kernel of ``lowrank_kernels::rsvd`` (the CPU kernel and the CUDA fallback)."""
    _check_args(A, k, oversample, niter, seed, seeds)
    A32 = A.to(torch.float32)  # strided inputs are fine: every use below is a strided-aware torch op
    if A32.dim() == 2:
        return _rsvd_single(A32, k, oversample, niter, seed)
    if A32.shape[0] == 0:
        return _empty_outputs(A, k)
    element_seeds = seeds.tolist() if seeds is not None else [seed] * A32.shape[0]
    outs = [_rsvd_single(A32[i], k, oversample, niter, s) for i, s in enumerate(element_seeds)]
    return tuple(torch.stack(parts) for parts in zip(*outs))


def _rsvd_fake(A, k, oversample=10, niter=2, seed=0, seeds=None):
    _check_args(A, k, oversample, niter, seed, seeds)
    return _empty_outputs(A, k)


_lib.impl("rsvd", rsvd_torch, "CPU")
torch.library.register_fake(f"{_NS}::rsvd", _rsvd_fake, lib=_lib)


# ---- the compiled CUDA kernel (csrc/), loaded when it was built -------------------------------------
_EXT_STATUS = "not loaded"


def _preload_torch_cuda_linalg() -> None:
    """Load torch's libtorch_cuda_linalg.so (symbols global) if this torch has one.

    ``at::cuda::getCurrentCUDASolverDnHandle`` lives there, and torch loads that library lazily, at its
    first CUDA linear-algebra call. setup.py links ``_C`` against it (with an rpath to torch/lib); this
    also covers a ``_C`` built without that link. Loading it early is what torch's lazy loader would do.
    """
    if torch.version.cuda is None:
        return
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cuda_linalg.so")
    if os.path.exists(path):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def _load_cuda_ext() -> str:
    """Load the compiled library if present; return a sentence saying which CUDA kernel runs and why."""
    if os.environ.get("LOWRANK_KERNELS_DISABLE_CUDA_EXT") == "1":
        return "disabled by LOWRANK_KERNELS_DISABLE_CUDA_EXT=1"
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return ("compiled extension not built (this install has no lowrank_kernels._C); on a machine with "
                "CUDA torch and a toolkit: LOWRANK_KERNELS_BUILD_CUDA=1 python -m pip install "
                "--no-build-isolation .")
    try:
        _preload_torch_cuda_linalg()
        importlib.import_module(f"{__package__}._C")  # importing runs TORCH_LIBRARY_IMPL(lowrank_kernels, CUDA, m)
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


def _seeds_tensor(seed) -> torch.Tensor:
    """Per-element seeds as the op's 1-D int64 CPU tensor (from a tensor, a list or a tuple of ints)."""
    if isinstance(seed, torch.Tensor):
        if seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise TypeError(f"rsvd: seed tensor must hold integers, got {seed.dtype}")
        if seed.device.type != "cpu":
            # Reading seeds on the host from a device tensor would synchronise: refuse it.
            raise TypeError(f"rsvd: a seed tensor must be on the CPU, got {seed.device}")
        return seed.to(torch.int64)
    seeds = [_as_int("seed", s, *_INT64) for s in seed]
    return torch.tensor(seeds, dtype=torch.int64).reshape(len(seeds))


def rsvd(A: torch.Tensor, k: int, *, oversample: int = 10, niter: int = 2,
         seed: Union[int, Sequence[int], torch.Tensor] = 0):
    """Randomized truncated SVD: ``A ~= U diag(S) V^T`` with U m x k, S k, V n x k (fp32).

    A randomized range finder (Gaussian sketch of ``k + oversample`` columns) with ``niter`` power
    iterations, each re-orthonormalised by QR, followed by an exact SVD of the small projected matrix.

    ``seed`` is an int, or, for a ``(b, m, n)`` batch, one seed per element (a 1-D integer CPU tensor
    or a sequence of b ints). Element ``i`` of a batch equals the single call ``rsvd(A[i], k,
    seed=seeds[i])`` (an int seed: the same seed for every element), so each element's basis depends
    only on its own matrix and seed. A seed means the same sketch for the compiled and the PyTorch
    kernel on a device (see the module docstring).
    Singular vectors follow :func:`canonical_signs` (each column of U has its largest-magnitude entry
    positive) whichever kernel ran.
    """
    k, oversample, niter = _as_int("k", k, 1), _as_int("oversample", oversample, 0), _as_int("niter", niter, 0)
    if not isinstance(seed, (torch.Tensor, list, tuple)):
        seed = _as_int("seed", seed, *_INT64)
        U, S, V = torch.ops.lowrank_kernels.rsvd(A, k, oversample, niter, seed, None)
    else:
        U, S, V = torch.ops.lowrank_kernels.rsvd(A, k, oversample, niter, 0, _seeds_tensor(seed))
    # The PyTorch kernel already returns canonical signs (idempotent here); the compiled one may not.
    U, V = canonical_signs(U, V)
    return U, S, V
