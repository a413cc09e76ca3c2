"""The randomized SVD op: accuracy, determinism, batching, dtypes, op registration and torch.compile."""
import pytest
import torch

from lowrank_kernels import rsvd
from lowrank_kernels.linalg import rsvd_torch


def decaying(m, n, decay=0.85, seed=0, dtype=torch.float32):
    """A matrix with singular values decay**i and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    S = decay ** torch.arange(k, dtype=torch.float64)
    return ((U * S) @ V.T).to(dtype)


def residual_ratio(A, U, k):
    """||A - U U^T A||_F / ||A - A_k||_F (1.0 is optimal)."""
    A = A.double()
    U = U.double()
    best = torch.linalg.svdvals(A)[k:].norm()
    return ((A - U @ (U.T @ A)).norm() / best).item()


SHAPES = [(300, 120), (120, 300), (200, 200), (513, 77)]


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("k", [1, 10, 32])
def test_residual_ratio_on_decaying_spectra(m, n, k):
    A = decaying(m, n)
    U, S, V = rsvd(A, k)
    assert U.shape == (m, k) and S.shape == (k,) and V.shape == (n, k)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    assert residual_ratio(A, U, k) <= 1.05
    # Orthonormal factors, descending non-negative values, and A ~= U S V^T on the captured subspace.
    torch.testing.assert_close(U.T @ U, torch.eye(k), atol=1e-5, rtol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(k), atol=1e-5, rtol=0)
    assert torch.all(S[:-1] >= S[1:]) and torch.all(S >= 0)
    torch.testing.assert_close(S, torch.linalg.svdvals(A)[:k], rtol=1e-3, atol=1e-5)


def test_slow_decay_needs_power_iterations():
    """On a flat spectrum the sketch alone is poor; the power iterations are what make it accurate."""
    A = decaying(400, 300, decay=0.99)
    plain = residual_ratio(A, rsvd(A, 20, niter=0)[0], 20)
    powered = residual_ratio(A, rsvd(A, 20, niter=4)[0], 20)
    assert powered < plain


def test_deterministic_per_seed():
    A = decaying(90, 70)
    a = rsvd(A, 8, seed=3)
    b = rsvd(A, 8, seed=3)
    c = rsvd(A, 8, seed=4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


def test_batch_equals_single_calls_with_consecutive_seeds():
    A = torch.stack([decaying(60, 45, seed=s) for s in range(3)])
    U, S, V = rsvd(A, 5, seed=11)
    assert U.shape == (3, 60, 5) and S.shape == (3, 5) and V.shape == (3, 45, 5)
    for i in range(3):
        u, s, v = rsvd(A[i], 5, seed=11 + i)
        assert torch.equal(U[i], u) and torch.equal(S[i], s) and torch.equal(V[i], v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_any_float_input_computes_in_fp32(dtype):
    A = decaying(80, 50, dtype=dtype)
    U, S, V = rsvd(A, 6)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    ref = rsvd(A.float(), 6)
    for x, y in zip((U, S, V), ref):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "A,k,match",
    [
        (torch.randn(5), 1, "2-D matrix or a 3-D batch"),
        (torch.randn(6, 4), 0, "k=0"),
        (torch.randn(6, 4), 5, "k=5"),
        (torch.ones(6, 4, dtype=torch.int64), 2, "floating-point"),
    ],
)
def test_bad_arguments_raise(A, k, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        rsvd(A, k)


def test_opcheck():
    A = decaying(40, 30)
    torch.library.opcheck(torch.ops.lowrank_kernels.rsvd.default, (A, 4, 10, 2, 0))
    torch.library.opcheck(torch.ops.lowrank_kernels.rsvd.default, (torch.stack([A, A]), 3, 2, 1, 5))


def test_torch_compile_matches_eager():
    A = decaying(64, 48)

    def f(x):
        U, S, V = rsvd(x * 2.0, 6, seed=7)
        return (U * S) @ V.T

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(A), f(A))


def test_op_and_python_kernel_agree():
    A = decaying(50, 40)
    for x, y in zip(rsvd(A, 4, seed=2), rsvd_torch(A, 4, 10, 2, 2)):
        assert torch.equal(x, y)
