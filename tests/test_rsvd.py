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


def test_int_seed_means_the_same_seed_for_every_batch_element():
    A = torch.stack([decaying(60, 45, seed=s) for s in range(3)])
    U, S, V = rsvd(A, 5, seed=11)
    assert U.shape == (3, 60, 5) and S.shape == (3, 5) and V.shape == (3, 45, 5)
    for i in range(3):
        u, s, v = rsvd(A[i], 5, seed=11)
        assert torch.equal(U[i], u) and torch.equal(S[i], s) and torch.equal(V[i], v)


@pytest.mark.parametrize("as_type", [list, tuple, torch.tensor], ids=["list", "tuple", "tensor"])
def test_per_element_seeds(as_type):
    """Element i of a batch equals the single call with seeds[i], whatever its neighbours are."""
    A = torch.stack([decaying(50, 70, seed=s) for s in range(3)])
    seeds = [7, -3, 2**62]
    U, S, V = rsvd(A, 4, seed=as_type(seeds))
    for i, seed in enumerate(seeds):
        u, s, v = rsvd(A[i], 4, seed=seed)
        assert torch.equal(U[i], u) and torch.equal(S[i], s) and torch.equal(V[i], v)
    # Element 1 with other neighbours (matrices and seeds) and at another position: unchanged.
    B = torch.stack([A[1], decaying(50, 70, seed=9)])
    U2, _, _ = rsvd(B, 4, seed=as_type([seeds[1], 123]))
    assert torch.equal(U2[0], U[1])
    # Per-element seeds matter: another seed for element 0 gives another sketch.
    assert not torch.equal(rsvd(A, 4, seed=as_type([8, -3, 2**62]))[0][0], U[0])


@pytest.mark.parametrize(
    "seed,error,match",
    [
        ([1, 2], ValueError, "2 seeds for a batch of 3"),
        (torch.tensor([1.0, 2.0, 3.0]), TypeError, "integers"),
        (torch.tensor([[1, 2, 3]]), TypeError, "1-D int64 CPU tensor"),
        ([1, 2.5, 3], TypeError, "seed must be an int"),
        ([1, True, 3], TypeError, "seed must be an int"),
        (True, TypeError, "seed must be an int"),
        (1.0, TypeError, "seed must be an int"),
        (2**63, ValueError, "seed="),
    ],
)
def test_bad_seeds_raise(seed, error, match):
    A = torch.stack([decaying(20, 12, seed=s) for s in range(3)])
    with pytest.raises(error, match=match):
        rsvd(A, 2, seed=seed)


def test_seeds_only_for_a_batch_and_not_with_seed():
    A = decaying(20, 12)
    with pytest.raises(ValueError, match="per-element seeds are for a"):
        rsvd(A, 2, seed=[1])
    with pytest.raises(ValueError, match="either seed"):
        torch.ops.lowrank_kernels.rsvd(A[None], 2, 10, 2, 5, torch.tensor([1]))


def test_sketch_is_a_function_of_the_seed_only():
    """The PyTorch kernel's Gaussian test matrix is the documented draw of the device's generator for
    the seed (the compiled kernel draws the same one: tested on a GPU in test_cuda_ext.py), and the
    result is the range finder applied to that sketch: the global RNG state plays no part."""
    from lowrank_kernels.linalg import canonical_signs, gaussian_test_matrix, svd_from_range

    omega = gaussian_test_matrix(45, 15, 7, torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(omega, torch.randn(15, 45, generator=gen).T)
    assert torch.equal(gaussian_test_matrix(45, 15, -1, "cpu"),
                       torch.randn(15, 45, generator=torch.Generator().manual_seed(2**64 - 1)).T)
    A = decaying(60, 45)
    torch.manual_seed(0)
    first = rsvd(A, 5, seed=7)
    torch.manual_seed(1)
    torch.randn(100)
    second = rsvd(A, 5, seed=7)
    U, S, V = svd_from_range(A, A @ omega, 5, 2)
    U, V = canonical_signs(U, V)  # rsvd returns canonical signs
    for x, y, z in zip(first, second, (U, S, V)):
        assert torch.equal(x, y) and torch.equal(x, z)
    # A wide matrix sketches its transpose (the thinner side), with the same draw.
    Ut, St, Vt = svd_from_range(A, A @ omega, 5, 2)
    Uw, Sw, Vw = rsvd(A.T.contiguous(), 5, seed=7)
    Vt, Ut = canonical_signs(Vt, Ut)  # the transposed problem's U is Vt: its columns are made canonical
    assert torch.equal(Uw, Vt) and torch.equal(Sw, St) and torch.equal(Vw, Ut)


@pytest.mark.parametrize("make", [
    lambda A: A.T.contiguous().T,                                   # column-major
    lambda A: torch.stack([A, A], dim=2).reshape(A.shape[0], -1)[:, ::2],  # column stride 2
    lambda A: torch.randn(70, A.shape[1])[5:5 + A.shape[0]].copy_(A),      # storage offset (row-major)
], ids=["column-major", "step-2", "offset"])
def test_strided_input_gives_the_contiguous_result(make):
    """The PyTorch kernel reads strided inputs as the matrices they are (the compiled kernel copies
    them to row-major: its preparation is tested without a GPU in test_cuda_ext.py)."""
    A = decaying(60, 45)
    B = make(A)
    assert torch.equal(B, A) and (B.stride() != A.stride() or B.storage_offset() > 0)
    for x, y in zip(rsvd(B, 5), rsvd(A, 5)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)  # BLAS may round strided operands differently
    batch = torch.stack([A, A]).transpose(1, 2).contiguous().transpose(1, 2)
    for x, y in zip(rsvd(batch, 5), rsvd(A, 5)):
        torch.testing.assert_close(x[1], y, rtol=1e-5, atol=1e-6)


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
        (torch.randn(6, 4), True, "k must be an int, got bool"),
        (torch.randn(6, 4), 2.0, "k must be an int, got float"),
        (torch.randn(6, 4), "2", "k must be an int"),
        (torch.randn(3, 0, 4), 1, "k=1"),
    ],
)
def test_bad_arguments_raise(A, k, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rsvd(A, k)


def test_k_accepts_integer_types_and_other_arguments_are_checked():
    np = pytest.importorskip("numpy")
    A = decaying(20, 12)
    for x, y in zip(rsvd(A, np.int64(3)), rsvd(A, 3)):
        assert torch.equal(x, y)
    for kwargs, match in [({"oversample": -1}, "oversample=-1"), ({"niter": -1}, "niter=-1"),
                          ({"niter": True}, "niter must be an int"), ({"oversample": 1.5}, "oversample")]:
        with pytest.raises((ValueError, TypeError), match=match):
            rsvd(A, 3, **kwargs)


# Bad arguments for the op itself (what every kernel sees): eager and fake kernels raise alike.
OP_ERRORS = [
    ((torch.randn(5), 1, 10, 2, 0, None), ValueError),
    ((torch.randn(6, 4), 0, 10, 2, 0, None), ValueError),
    ((torch.randn(6, 4), 5, 10, 2, 0, None), ValueError),
    ((torch.randn(0, 6, 4), 5, 10, 2, 0, None), ValueError),   # an empty batch checks k too
    ((torch.randn(6, 4), 2, -1, 2, 0, None), ValueError),
    ((torch.ones(6, 4, dtype=torch.int64), 2, 10, 2, 0, None), TypeError),
    ((torch.randn(2, 6, 4), 2, 10, 2, 0, torch.tensor([1, 2, 3])), ValueError),
    ((torch.randn(2, 6, 4), 2, 10, 2, 0, torch.tensor([1.0, 2.0])), TypeError),
]


@pytest.mark.parametrize("args,error", OP_ERRORS)
def test_eager_and_fake_kernels_raise_alike(args, error):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.lowrank_kernels.rsvd.default
    with pytest.raises(error) as eager:
        op(*args)
    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        with pytest.raises(error) as fake:
            op(*fake_args)
    assert str(eager.value) == str(fake.value)


@pytest.mark.parametrize("seed", [3, torch.zeros(0, dtype=torch.int64)], ids=["int", "seeds"])
def test_empty_batch_in_eager_fake_and_compile(seed):
    from torch._subclasses.fake_tensor import FakeTensorMode

    A = torch.randn(0, 30, 20)
    shapes = [(0, 30, 5), (0, 5), (0, 20, 5)]
    eager = rsvd(A, 5, seed=seed)
    assert [tuple(x.shape) for x in eager] == shapes and all(x.dtype == torch.float32 for x in eager)
    with FakeTensorMode() as mode:
        fake = rsvd(mode.from_tensor(A), 5, seed=mode.from_tensor(seed) if isinstance(seed, torch.Tensor) else seed)
    assert [tuple(x.shape) for x in fake] == shapes
    compiled = torch.compile(lambda x: rsvd(x, 5, seed=seed), fullgraph=True)(A)
    assert [tuple(x.shape) for x in compiled] == shapes
    seeds = None if isinstance(seed, int) else seed
    torch.library.opcheck(torch.ops.lowrank_kernels.rsvd.default, (A, 5, 10, 2, 0, seeds))


def test_opcheck():
    A = decaying(40, 30)
    torch.library.opcheck(torch.ops.lowrank_kernels.rsvd.default, (A, 4, 10, 2, 0))
    torch.library.opcheck(torch.ops.lowrank_kernels.rsvd.default, (torch.stack([A, A]), 3, 2, 1, 5))
    torch.library.opcheck(torch.ops.lowrank_kernels.rsvd.default,
                          (torch.stack([A, A]), 3, 2, 1, 0, torch.tensor([4, -9])))


def test_torch_compile_matches_eager():
    A = decaying(64, 48)

    def f(x):
        U, S, V = rsvd(x * 2.0, 6, seed=7)
        return (U * S) @ V.T

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(A), f(A))

    def g(x, seeds):
        U, S, V = rsvd(x, 4, seed=seeds)
        return U

    batch, seeds = torch.stack([A, A.flip(0)]), torch.tensor([3, 4])
    torch.testing.assert_close(torch.compile(g, fullgraph=True)(batch, seeds), g(batch, seeds))


def test_op_and_python_kernel_agree():
    A = decaying(50, 40)
    for x, y in zip(rsvd(A, 4, seed=2), rsvd_torch(A, 4, 10, 2, 2)):
        assert torch.equal(x, y)
