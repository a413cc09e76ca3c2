"""The compiled CUDA rsvd (csrc/rsvd.cu): how it loads, how the op falls back, and what it computes.

Loader and fallback tests run everywhere (subprocesses simulate a disabled, a broken and an empty
extension). Where the extension is installed and loads, even without a GPU (CI builds it against a
CUDA torch on a CPU machine), its argument checks and input preparation are tested on CPU tensors.
The tests of the compiled kernel itself need a CUDA device with the extension built; they skip
otherwise, and the same contract is tested on CPU against the PyTorch kernel in test_rsvd.py.
`bash .ci/compile_csrc.sh` is the GPU-free check that csrc/ compiles; tests/conftest.py picks the
installed build over ./lowrank_kernels when that build has the extension.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lowrank_kernels import cuda_ext_available, rsvd
from lowrank_kernels.linalg import rsvd_torch
from test_rsvd import decaying, residual_ratio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP = "lowrank_kernels::rsvd"
EXT_OK, EXT_REASON = cuda_ext_available()


def run_fresh_python(code: str, **env) -> dict:
    """Run ``code`` in a new interpreter (so lowrank_kernels loads anew); it prints one JSON object."""
    full_env = {k: v for k, v in os.environ.items() if k != "LOWRANK_KERNELS_DISABLE_CUDA_EXT"}
    full_env["PYTHONPATH"] = os.pathsep.join([REPO, full_env.get("PYTHONPATH", "")])
    full_env.update(env)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=full_env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


# Reports the loader's verdict, whether CUDA has a kernel, and that the op still runs on CPU.
REPORT = """
    import json, torch
    from lowrank_kernels import cuda_ext_available, rsvd
    ok, reason = cuda_ext_available()
    U, S, V = rsvd(torch.randn(20, 12), 3)
    print(json.dumps({"ok": ok, "reason": reason, "shapes": [list(U.shape), list(S.shape), list(V.shape)],
                      "cuda_kernel": torch._C._dispatch_has_kernel_for_dispatch_key("lowrank_kernels::rsvd", "CUDA")}))
"""

# Puts a fake lowrank_kernels._C in front of the real import system; its loader does `BEHAVIOUR`.
FAKE_EXTENSION = """
    import importlib.abc, importlib.machinery, sys
    class FakeLoader(importlib.abc.Loader):
        def create_module(self, spec):
            BEHAVIOUR
        def exec_module(self, module):
            pass
    class FakeFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname == "lowrank_kernels._C":
                return importlib.machinery.ModuleSpec(fullname, FakeLoader())
            return None
    sys.meta_path.insert(0, FakeFinder())
"""


# ---- loader and fallback: no GPU needed -------------------------------------------------------------

def test_cuda_ext_available_reports_a_reason():
    ok, reason = cuda_ext_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    assert ok == (reason == "ok")
    if importlib.util.find_spec("lowrank_kernels._C") is None:
        assert not ok and "not built" in reason and "LOWRANK_KERNELS_BUILD_CUDA=1" in reason
    if torch.version.cuda is None:
        assert not ok  # a CPU torch cannot load a CUDA extension


def test_cuda_dispatch_key_always_has_a_kernel():
    """The compiled kernel or, without it, the PyTorch kernel: CUDA tensors always have an rsvd."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU")


def test_disable_env_var_keeps_the_fallback():
    r = run_fresh_python(REPORT, LOWRANK_KERNELS_DISABLE_CUDA_EXT="1")
    assert r["ok"] is False and "disabled by LOWRANK_KERNELS_DISABLE_CUDA_EXT=1" in r["reason"]
    assert r["cuda_kernel"] and r["shapes"] == [[20, 3], [3], [12, 3]]


@pytest.mark.parametrize(
    "behaviour,expected",
    [
        # What dlopen reports for a .so built against another torch or without CUDA torch.
        ('raise OSError("undefined symbol: _ZN3c104cuda20CUDACachingAllocator9allocatorE")',
         "failed to load: undefined symbol"),
        ('raise ImportError("libcusolver.so.12: cannot open shared object file")',
         "failed to load: libcusolver.so.12"),
        # Imports fine but registers nothing (e.g. built without csrc/rsvd.cu).
        ("return None", "loaded but registered no CUDA kernel"),
    ],
    ids=["oserror", "importerror", "no-kernel"],
)
def test_broken_extension_falls_back_with_its_reason(behaviour, expected):
    r = run_fresh_python(FAKE_EXTENSION.replace("BEHAVIOUR", behaviour) + REPORT)
    assert r["ok"] is False and expected in r["reason"], r["reason"]
    assert r["cuda_kernel"] and r["shapes"] == [[20, 3], [3], [12, 3]]


# ---- the compiled kernel: needs a GPU ---------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("lowrank_kernels._C") is None,
                    reason="extension not built here: LOWRANK_KERNELS_BUILD_CUDA=1 python -m pip install "
                           "--no-build-isolation . builds it")
@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU torch cannot load the extension")
def test_built_extension_is_in_use():
    """Where the extension was built against this CUDA torch, it must load, with or without a GPU:
    a silent fallback is a bug (this caught the unlinked libtorch_cuda_linalg.so)."""
    assert cuda_ext_available() == (True, "ok")


# ---- the compiled kernel's argument checks and input preparation: the extension, no GPU -------------

needs_extension = pytest.mark.skipif(not EXT_OK, reason=f"compiled CUDA rsvd not loaded: {EXT_REASON}")


def _prepare(*args):
    return torch.ops.lowrank_kernels._rsvd_prepare(*args)


@needs_extension
@pytest.mark.parametrize("make", [
    lambda A: A,                                                          # used as is: no copy
    lambda A: A.T.contiguous().T,                                         # column-major
    lambda A: torch.stack([A, A], dim=2).reshape(A.shape[0], -1)[:, ::2],  # column stride 2
    lambda A: torch.randn(70, A.shape[1])[5:5 + A.shape[0]].copy_(A),      # storage offset
    lambda A: A.double(),
    lambda A: A.bfloat16().T.contiguous().T,
    lambda A: torch.stack([A, A]).transpose(1, 2).contiguous().transpose(1, 2),  # strided batch
], ids=["contiguous", "column-major", "step-2", "offset", "fp64", "bf16-column-major", "batch"])
def test_compiled_preparation_gives_a_row_major_fp32_copy(make):
    """The CUDA kernel reads its input as row-major fp32 with lda = n; a strided input must be copied
    (it once was read as if it were row-major)."""
    A = decaying(60, 45)
    B = make(A)
    P = _prepare(B, 5, 10, 2, 0, None)
    assert P.dtype == torch.float32 and P.is_contiguous() and P.shape == B.shape
    assert torch.equal(P, B.float())
    if B.dtype == torch.float32 and B.is_contiguous():
        assert P.data_ptr() == B.data_ptr()  # read only: no copy


@needs_extension
@pytest.mark.parametrize("args,error", [
    ((torch.randn(5), 1, 10, 2, 0, None), ValueError),
    ((torch.randn(6, 4), 0, 10, 2, 0, None), ValueError),
    ((torch.randn(6, 4), 5, 10, 2, 0, None), ValueError),
    ((torch.randn(0, 6, 4), 5, 10, 2, 0, None), ValueError),
    ((torch.randn(6, 4), 2, -1, 2, 0, None), ValueError),
    ((torch.randn(6, 4), 2, 10, -1, 0, None), ValueError),
    ((torch.ones(6, 4, dtype=torch.int64), 2, 10, 2, 0, None), TypeError),
    ((torch.randn(6, 4), 2, 10, 2, 0, torch.tensor([1])), ValueError),
    ((torch.randn(2, 6, 4), 2, 10, 2, 5, torch.tensor([1, 2])), ValueError),
    ((torch.randn(2, 6, 4), 2, 10, 2, 0, torch.tensor([1, 2, 3])), ValueError),
    ((torch.randn(2, 6, 4), 2, 10, 2, 0, torch.tensor([1.0, 2.0])), TypeError),
])
def test_compiled_checks_match_the_pytorch_kernel(args, error):
    """Same exception type for every bad argument, and the same message up to how shapes and dtypes
    print (C++: [5], Float; Python: [5], torch.float32)."""
    with pytest.raises(error) as compiled:
        _prepare(*args)
    with pytest.raises(error) as python:
        rsvd_torch(*args)
    ours, theirs = str(compiled.value).splitlines()[0], str(python.value)
    assert ours.split(", got")[0] == theirs.split(", got")[0], (ours, theirs)
    if "got" not in theirs:
        assert ours == theirs


def gapped(m, n, k, seed=0):
    """Singular values 1 .. 0.5 for the first k, then 1e-2 and decaying: a clear gap after k."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    i = torch.arange(r, dtype=torch.float64)
    S = torch.where(i < k, 1.0 - 0.5 * i / k, 1e-2 * 0.9 ** (i - k))
    return ((U * S) @ V.T).float()


def projector(X):
    return X @ X.transpose(-1, -2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not EXT_OK, reason=f"compiled CUDA rsvd not in use: {EXT_REASON}")
class TestCompiledKernel:
    @pytest.mark.parametrize("m,n", [(300, 200), (200, 300), (256, 256)])
    def test_residual_ratio_matches_the_pytorch_kernel(self, m, n):
        k = 16
        A = decaying(m, n)
        U, S, V = rsvd(A.cuda(), k)
        assert U.shape == (m, k) and S.shape == (k,) and V.shape == (n, k)
        assert U.dtype == S.dtype == V.dtype == torch.float32 and U.is_cuda
        ours = residual_ratio(A, U.cpu(), k)
        reference = residual_ratio(A, rsvd_torch(A, k)[0], k)
        assert ours <= 1.05 and abs(ours - reference) <= 0.02, (ours, reference)
        torch.testing.assert_close(S.cpu(), torch.linalg.svdvals(A)[:k], rtol=1e-3, atol=1e-5)

    @pytest.mark.parametrize("m,n", [(300, 200), (200, 300)])
    def test_orthonormal_factors_and_reconstruction(self, m, n):
        k = 12
        A = gapped(m, n, k)
        U, S, V = (x.cpu() for x in rsvd(A.cuda(), k))
        torch.testing.assert_close(U.T @ U, torch.eye(k), atol=1e-5, rtol=0)
        torch.testing.assert_close(V.T @ V, torch.eye(k), atol=1e-5, rtol=0)
        assert torch.all(S[:-1] >= S[1:]) and torch.all(S >= 0)
        Ue, Se, Vhe = torch.linalg.svd(A.double(), full_matrices=False)
        best = (Ue[:, :k] * Se[:k]) @ Vhe[:k]
        torch.testing.assert_close(((U * S) @ V.T).double(), best, atol=1e-4, rtol=0)

    @pytest.mark.parametrize("m,n", [(240, 160), (160, 240)])
    def test_same_basis_as_the_pytorch_kernel_on_the_device(self, m, n):
        """Same seed, same sketch: on one GPU the compiled and the PyTorch kernel compute the same
        vectors up to roundoff and sign (their small SVDs may pick other signs), with no spectral gap
        needed. Singular values 0.85^i are 15% apart, so the vectors are well conditioned."""
        A = decaying(m, n).cuda()
        for seed in (1, -5):
            U, S, V = rsvd(A, 10, seed=seed)
            Ut, St, Vt = rsvd_torch(A, 10, seed=seed)  # the PyTorch kernel on the CUDA tensor
            signs = torch.sign((U * Ut).sum(0))
            torch.testing.assert_close(S, St, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(U * signs, Ut, atol=1e-4, rtol=0)
            torch.testing.assert_close(V * signs, Vt, atol=1e-4, rtol=0)
        # (Whether the seed decides the sketch is test_sketch_is_the_documented_generator_draw's job: on
        # this well-separated spectrum two power iterations make the vectors seed-independent to 1e-3,
        # which the H100 run of 2026-11-23 showed.)

    def test_sketch_is_the_documented_generator_draw(self):
        """Without oversampling and power iterations, U spans exactly A Omega (5 of 30 directions):
        the compiled kernel's Omega is gaussian_test_matrix's draw for the seed, and another seed's
        draw spans other directions."""
        from lowrank_kernels.linalg import gaussian_test_matrix

        A = decaying(90, 30).cuda()
        U = rsvd(A, 5, oversample=0, niter=0, seed=17)[0]
        for seed, spans in ((17, True), (18, False)):
            Y = A @ gaussian_test_matrix(30, 5, seed, A.device)
            residual = ((Y - U @ (U.T @ Y)).norm() / Y.norm()).item()
            assert (residual < 1e-5) == spans, (seed, residual)

    def test_deterministic_per_seed(self):
        A = decaying(180, 140).cuda()
        a, b, c = rsvd(A, 8, seed=3), rsvd(A, 8, seed=3), rsvd(A, 8, seed=4)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        assert not torch.equal(a[0], c[0])

    def test_fp32_whatever_the_tf32_flag(self):
        A = decaying(256, 192).cuda()
        previous = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            strict = rsvd(A, 8)
            torch.backends.cuda.matmul.allow_tf32 = True
            relaxed = rsvd(A, 8)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        for x, y in zip(strict, relaxed):
            assert torch.equal(x, y)

    @pytest.mark.parametrize("m,n", [(120, 90), (90, 120)])
    @pytest.mark.parametrize("seed", [11, [11, -4, 2**40]], ids=["int", "per-element"])
    def test_batch_equals_single_calls_with_their_seeds(self, m, n, seed):
        k = 6
        A = torch.stack([gapped(m, n, k, seed=s) for s in range(3)]).cuda()
        U, S, V = rsvd(A, k, seed=seed)
        assert U.shape == (3, m, k) and S.shape == (3, k) and V.shape == (3, n, k)
        seeds = seed if isinstance(seed, list) else [seed] * 3
        for i in range(3):
            u, s, v = rsvd(A[i], k, seed=seeds[i])
            # Batched and single gemms may round differently; the subspaces agree to fp32 rounding.
            torch.testing.assert_close(projector(U[i]), projector(u), atol=1e-4, rtol=0)
            torch.testing.assert_close(projector(V[i]), projector(v), atol=1e-4, rtol=0)
            torch.testing.assert_close(S[i], s, rtol=1e-4, atol=1e-6)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_inputs_compute_in_fp32(self, dtype):
        A = decaying(200, 150).to(dtype).cuda()
        U, S, V = rsvd(A, 10)
        assert U.dtype == S.dtype == V.dtype == torch.float32
        for x, y in zip((U, S, V), rsvd(A.float(), 10)):
            assert torch.equal(x, y)  # converted once, then the fp32 path
        assert residual_ratio(A.float().cpu(), U.cpu(), 10) <= 1.05

    def test_strided_input_equals_its_contiguous_copy(self):
        A = decaying(150, 110).cuda()
        for x, y in zip(rsvd(A.T, 7), rsvd(A.T.contiguous(), 7)):
            assert torch.equal(x, y)
        batch = torch.stack([A, A.flip(0)])
        strided = batch.transpose(1, 2).contiguous().transpose(1, 2)
        for x, y in zip(rsvd(strided, 7, seed=[1, 2]), rsvd(batch, 7, seed=[1, 2])):
            assert torch.equal(x, y)

    def test_edge_shapes(self):
        A = decaying(64, 40).cuda()
        U, S, V = rsvd(A, 40, oversample=10, niter=0)  # k = min(m, n): the sketch is all of A
        torch.testing.assert_close(((U * S) @ V.T).cpu(), A.cpu(), atol=1e-4, rtol=0)
        for seed in (0, torch.zeros(0, dtype=torch.int64)):
            U, S, V = rsvd(torch.empty(0, 30, 20, device="cuda"), 5, seed=seed)
            assert U.shape == (0, 30, 5) and S.shape == (0, 5) and V.shape == (0, 20, 5)

    @pytest.mark.parametrize(
        "A,k,error",
        [
            (torch.randn(5), 1, ValueError),
            (torch.randn(6, 4), 0, ValueError),
            (torch.randn(6, 4), 5, ValueError),
            (torch.randn(2, 2, 6, 4), 2, ValueError),
            (torch.ones(6, 4, dtype=torch.int32), 2, TypeError),
            (torch.randn(0, 6, 4), 5, ValueError),
        ],
    )
    def test_bad_arguments_raise_like_the_pytorch_kernel(self, A, k, error):
        with pytest.raises(error):
            rsvd(A.cuda(), k)
        with pytest.raises(error):
            rsvd_torch(A.cuda(), k)

    def test_bad_seeds_raise(self):
        A = torch.randn(2, 6, 4, device="cuda")
        with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
            rsvd(A, 2, seed=[1, 2, 3])
        with pytest.raises(TypeError, match="on the CPU"):
            rsvd(A, 2, seed=torch.tensor([1, 2], device="cuda"))

    def test_opcheck(self):
        A = decaying(40, 30).cuda()
        torch.library.opcheck(torch.ops.lowrank_kernels.rsvd.default, (A, 4, 10, 2, 0))
        torch.library.opcheck(torch.ops.lowrank_kernels.rsvd.default, (torch.stack([A, A]), 3, 2, 1, 5))
        torch.library.opcheck(torch.ops.lowrank_kernels.rsvd.default,
                              (torch.stack([A, A]), 3, 2, 1, 0, torch.tensor([7, 8])))
        torch.library.opcheck(torch.ops.lowrank_kernels.rsvd.default, (torch.empty(0, 40, 30, device="cuda"), 3, 2, 1, 0))
