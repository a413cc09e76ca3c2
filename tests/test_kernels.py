"""The fused Triton step (lowrank_kernels.kernels) against the reference, the only oracle.

Without CUDA these run under TRITON_INTERPRET=1 (set by conftest.py) on CPU tensors; with CUDA the same
tests run the compiled kernels, and the ``gpu`` tests add LLaMA shapes and the no-recompilation check.

Tolerances:

* fp32, elementwise: rtol 1e-5, atol 1e-6 x the tensor's largest magnitude. Both sides round each
  operation once in fp32 and differ only in the order of the GEMMs' sums (~1e-7 of the summed terms);
  entries that cancel to near 0 carry that error in absolute terms, hence an atol scaled to the tensor.
  Measured: at most ~40% of this bound, most entries far below.
* bf16 / fp16, norm-wise relative errors. Elementwise bounds would be brittle: an entry of R within
  rounding of 0, or an fp16 V at the edge of underflow, becomes a different N entry (N ~ M / eps there),
  which moves a whole row or column of W. The reference rounds to the low dtype after every operation
  (R, each moment op, P N, the scaling, W after the update and again after the decay) and CPU torch even
  rounds its alpha= scalars to bf16; the kernels round once per stored value. So:
  - W_T - W_0 (what the steps changed; W itself would hide a wrong step behind W_0): over the optimizer
    run (9 steps, each moving W by several of its ulps) the measured differences are <= 6% bf16 (the
    rank-5 "full" weight, which moves least) and <= 1.3% fp16: bounds 12% and 3%.
  - the moments and N: a few ulps of the dtype (2^-8 bf16, 2^-11 fp16); measured <= 0.7% bf16 and
    <= 0.1% fp16, after one call or nine steps: bounds 2% and 0.3%. fp32 moments fed a bf16 R: see
    assert_moment_matches.
  Any real defect (a wrong scale, side or transposition, a missing term) is an O(1) error.
* bf16 also gets an accuracy check that needs no tolerance tuning: against the reference run in fp64
  on the same inputs, the fused step must be no further off than the bf16 reference (measured: 35-90%
  of the reference's distance). It catches biased rounding: the interpreter's truncating casts, before
  _device.round_to, made the kernels ~1.7x further off than the reference. fp16 is left out of it: its
  V underflows to 0 for |R| < 8e-3, after which N = M / eps, a different step from fp64's by design.
"""
import inspect
import math

import pytest
import torch

pytest.importorskip("triton")

from lowrank_kernels import GaLoreAdamW, backends, projection, reference  # noqa: E402
from lowrank_kernels import kernels  # noqa: E402
from lowrank_kernels.kernels import adamw, backproject_update, project_adam  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BETA1, BETA2, EPS = 0.9, 0.999, 1e-6
# Norm-wise bounds for 16-bit results (see the module docstring).
LOW_PRECISION_TOL = {torch.bfloat16: 0.12, torch.float16: 0.03}  # W_T - W_0
LOW_PRECISION_MOMENT_TOL = {torch.bfloat16: 0.02, torch.float16: 0.003}  # moments and N
ACCURACY_SLACK = 1.1  # bf16: distance to fp64 at most 1.1x the reference's own


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def assert_fp32_close(actual, expected, label, inner=1):
    """fp32 results of ``inner``-term dot products (the GEMMs' shared length), summed in other orders.

    Two orders of a K-term fp32 sum differ by about sqrt(K) * 2^-24 relative to the sum's scale (random
    rounding errors, Higham ch. 3), so the absolute tolerance is that times the largest entry, and
    1e-6 of it at least (K <= ~280: every small shape here). Measured on an H100 at K = 4096: the
    largest difference was 2e-7 of W's largest entry, against 3.8e-6 allowed (1e-6 would fail it).
    """
    atol = max(1e-6, math.sqrt(inner) * 2.0**-24) * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=lambda m: f"{label}: {m}")


def assert_change_matches(w, w_ref, w_start, label, w_exact=None, inner=1):
    """The fused result ``w`` against the reference's ``w_ref``, both started from ``w_start``."""
    if w.dtype == torch.float32:
        return assert_fp32_close(w, w_ref, label, inner)
    err = rel_err(w - w_start, w_ref - w_start)
    assert err <= LOW_PRECISION_TOL[w.dtype], f"{label}: W_T - W_0 norm-wise error {err:.3g}"
    if w_exact is not None and w.dtype == torch.bfloat16:
        ours, ref = rel_err(w - w_start, w_exact - w_start), rel_err(w_ref - w_start, w_exact - w_start)
        assert ours <= ACCURACY_SLACK * ref, f"{label}: {ours:.3g} from fp64, the reference only {ref:.3g}"


def assert_moment_matches(m, m_ref, label, grad_dtype, inner=1):
    if m.dtype == grad_dtype == torch.float32:
        return assert_fp32_close(m, m_ref, label, inner)
    if m.dtype == torch.float32:
        # fp32 moments fed a 16-bit R: where the two fp32 sums round R differently, R differs by an ulp
        # of its dtype, so the moments can differ by at most that much (measured: <= 3e-6).
        tol = torch.finfo(grad_dtype).eps
    else:
        tol = LOW_PRECISION_MOMENT_TOL[m.dtype]
    err = rel_err(m, m_ref)
    assert err <= tol, f"{label}: norm-wise error {err:.3g} > {tol}"


def orthonormal(rows, cols, dtype, gen, column_major=False):
    """A basis like the optimizer's: orthonormal columns, optionally stored column-major (LAPACK's U)."""
    B = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q.to(dtype)
    return (B.T.contiguous().T if column_major else B.contiguous()).to(DEVICE)


def as_fp64(*tensors):
    return [None if t is None else t.double() for t in tensors]


# ---- the fused optimizer against the reference optimizer ------------------------------------------------
# (proj_type, shape, rank). "std" on a wide and a tall weight covers both orientations; no extent is a
# multiple of a block size; ranks span 1 to 48.
PROJECTED = [
    ("std", (37, 53), 1),           # wide: left, R = P^T G
    ("std", (130, 67), 48),         # tall: right, R = G Q
    ("reverse_std", (53, 37), 8),   # tall: left
    ("left", (67, 130), 17),
    ("right", (37, 53), 12),
    ("full", (53, 37), 5),
]
BIAS = 1030  # unprojected 1-D parameter: two 1024-element blocks of the AdamW kernel, the second ragged
STEPS, GAP = 9, 4  # bases refreshed before steps 1, 5 and 9
# 16-bit runs take a 10x larger lr: at 1e-2 a step moves W (~0.02) by about one of its bf16 ulps, and
# the comparison would measure W's rounding instead of the step.
LR = {torch.float32: 1e-2, torch.bfloat16: 1e-1, torch.float16: 1e-1}
# "full" projects a gradient onto its own singular vectors at a refresh, so R = diag(S) + fp32 summation
# noise (~1e-6 off the diagonal), and N = M / (sqrt(V) + eps) turns that noise into O(0.1) entries set by
# the order of the sums, in the reference itself as much as in the kernels. A larger eps for that group
# keeps the noise entries at ~1e-4, so the comparison tests the kernels rather than the noise.
FULL_EPS = 1e-3


def run_optimizers(dtype, state_dtype, projected=PROJECTED, bias=BIAS, steps=STEPS, eps=EPS, exact=False):
    """Run the reference and the fused optimizer (and, if ``exact``, the reference in fp64) side by side.

    Every run gets the same gradients, drawn independently of the weights (and rounded to ``dtype``), so
    the trajectories differ only by the kernels' roundings: nothing feeds back through a loss. The lr
    changes half-way, as under a schedule. Returns the initial weights and {run: (params, optimizer)}.
    """
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=gen) * 0.02 for _, shape, _ in projected]
    if bias:
        start.append(torch.randn(bias, generator=gen) * 0.02)
    start = [t.to(DEVICE, dtype) for t in start]
    lr = LR[dtype]
    setups = {"torch": ("torch", dtype), "triton": ("triton", dtype)}
    if exact:
        setups["exact"] = ("torch", torch.float64)
    runs = {}
    for name, (backend, run_dtype) in setups.items():
        params = [t.to(run_dtype, copy=True).requires_grad_() for t in start]
        groups = [dict(params=[p], rank=r, proj_type=pt, update_proj_gap=GAP, scale=0.25,
                       eps=FULL_EPS if pt == "full" else eps,
                       state_dtype=None if run_dtype == torch.float64 else state_dtype)
                  for p, (pt, _, r) in zip(params, projected)]
        if bias:
            groups.append(dict(params=[params[-1]], eps=eps,
                               state_dtype=None if run_dtype == torch.float64 else state_dtype))
        runs[name] = (params, GaLoreAdamW(groups, lr=lr, weight_decay=0.1, backend=backend))
    grads = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, shape in enumerate(t.shape for t in start):
            g = torch.randn(shape, generator=grads).to(DEVICE, dtype)
            for params, _ in runs.values():
                params[i].grad = g.to(params[i].dtype, copy=True)  # no run sees another's tensor
        for _, opt in runs.values():
            if step == steps // 2:
                for group in opt.param_groups:
                    group["lr"] = lr / 3
            opt.step()
    return start, runs


def check_optimizer_runs(start, runs, labels, steps):
    (ref_params, ref_opt), (fused_params, fused_opt) = runs["torch"], runs["triton"]
    exact_params = runs["exact"][0] if "exact" in runs else [None] * len(start)
    for label, w0, p_ref, p_fused, p_exact in zip(labels, start, ref_params, fused_params, exact_params):
        moved = rel_err(p_ref.detach(), w0)
        assert moved > 0.02, f"{label}: the reference barely moved the weight ({moved:.3g}); vacuous test"
        inner = min(w0.shape) if w0.dim() == 2 else 1  # the projection's sum runs over the smaller side
        assert_change_matches(p_fused.detach(), p_ref.detach(), w0, label,
                              None if p_exact is None else p_exact.detach(), inner)
        s_ref, s_fused = ref_opt.state[p_ref], fused_opt.state[p_fused]
        assert s_ref["step"] == s_fused["step"] == steps
        for key in ("exp_avg", "exp_avg_sq"):
            assert s_fused[key].dtype == s_ref[key].dtype
            assert_moment_matches(s_fused[key], s_ref[key], f"{label}: {key}", w0.dtype, inner)


@pytest.mark.parametrize("dtype,state_dtype", [
    (torch.float32, None),
    (torch.bfloat16, None),
    (torch.float16, None),
    (torch.bfloat16, "float32"),  # fp32 moments of a bf16 weight
], ids=["fp32", "bf16", "fp16", "bf16-fp32moments"])
def test_fused_optimizer_matches_reference(dtype, state_dtype):
    start, runs = run_optimizers(dtype, state_dtype, exact=dtype == torch.bfloat16)
    labels = [f"{pt} {shape} r={r}" for pt, shape, r in PROJECTED] + [f"bias ({BIAS},)"]
    check_optimizer_runs(start, runs, labels, STEPS)


# ---- each launcher against the reference functions ------------------------------------------------------
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("side,m,n,r,transposed_grad,moment_dtype", [
    ("left", 37, 53, 1, False, None),
    ("left", 130, 67, 48, True, None),            # column-major P and a transposed (non-contiguous) grad
    ("right", 130, 67, 20, True, None),
    ("right", 53, 37, 33, False, torch.float32),  # fp32 moments whatever the grad's dtype
])
def test_project_adam(dtype, side, m, n, r, transposed_grad, moment_dtype):
    gen = torch.Generator().manual_seed(2)
    G = torch.randn(n, m, generator=gen).T if transposed_grad else torch.randn(m, n, generator=gen)
    G = G.to(DEVICE, dtype)
    assert G.is_contiguous() != transposed_grad
    P = orthonormal(m, r, dtype, gen, column_major=True) if side == "left" else None
    Q = orthonormal(n, r, dtype, gen) if side == "right" else None
    shape = projection.lowrank_shape(side, m, n, r)
    M0 = (torch.randn(shape, generator=gen) * 0.1).to(DEVICE, moment_dtype or dtype)
    V0 = (torch.rand(shape, generator=gen) * 0.01).to(DEVICE, moment_dtype or dtype)
    M, V, M_ref, V_ref = M0.clone(), V0.clone(), M0.clone(), V0.clone()

    N = project_adam.project_adam(G, P, Q, M, V, beta1=BETA1, beta2=BETA2, eps=EPS)
    N_ref = reference.adam_normalize(reference.project(G, P, Q), M_ref, V_ref, BETA1, BETA2, EPS)

    assert N.dtype == dtype and N.shape == shape
    # V is far from 0 here, so N amplifies nothing and gets the moments' bound.
    for label, out, ref in (("exp_avg", M, M_ref), ("exp_avg_sq", V, V_ref), ("N", N, N_ref)):
        assert_moment_matches(out, ref, label, dtype)
    if dtype == torch.bfloat16:
        M64, V64, G64, P64, Q64 = as_fp64(M0, V0, G, P, Q)
        N64 = reference.adam_normalize(reference.project(G64, P64, Q64), M64, V64, BETA1, BETA2, EPS)
        for label, out, ref, exact in (("exp_avg", M, M_ref, M64), ("N", N, N_ref, N64)):
            ours, theirs = rel_err(out, exact), rel_err(ref, exact)
            assert ours <= ACCURACY_SLACK * theirs, f"{label}: {ours:.3g} from fp64, reference {theirs:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("side,m,n,r,weight_decay,strided_weight", [
    ("left", 37, 53, 1, 0.1, False),
    ("left", 130, 67, 48, 0.0, True),   # W a column slice of a wider tensor; no decay
    ("right", 67, 130, 17, 0.1, True),
    ("right", 53, 37, 36, 0.1, False),
])
def test_backproject_update(dtype, side, m, n, r, weight_decay, strided_weight):
    gen = torch.Generator().manual_seed(3)
    P = orthonormal(m, r, dtype, gen, column_major=True) if side == "left" else None
    Q = orthonormal(n, r, dtype, gen) if side == "right" else None
    N = (torch.randn(projection.lowrank_shape(side, m, n, r), generator=gen) * 3).to(DEVICE, dtype)
    # W ~ 0.02 (an LLM init) and a step of the same order: the change spans many of W's ulps.
    W_full = (torch.randn(m, n + 5, generator=gen) * 0.02).to(DEVICE, dtype)
    W = W_full[:, 2:n + 2] if strided_weight else W_full[:, :n].contiguous()
    assert W.is_contiguous() != strided_weight
    W_start, W_ref, around = W.clone(), W.clone(), W_full.clone()
    hyper = dict(step_size=0.05, lr=0.1, weight_decay=weight_decay)

    backproject_update.backproject_update(W, N, P, Q, scale=0.25, **hyper)
    reference.apply_update(W_ref, reference.project_back(N, P, Q, 0.25), **hyper)

    W_exact = W_start.double()
    N64, P64, Q64 = as_fp64(N, P, Q)
    reference.apply_update(W_exact, reference.project_back(N64, P64, Q64, 0.25), **hyper)
    assert_change_matches(W, W_ref, W_start, "W", W_exact)
    if strided_weight:  # the columns around the view are untouched
        assert torch.equal(W_full[:, :2], around[:, :2]) and torch.equal(W_full[:, n + 2:], around[:, n + 2:])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["flat", "transposed_grad", "transposed_param"])
def test_adamw_update(dtype, layout):
    """First step of a plain-AdamW parameter (zero moments), as the kernel sees it for a bias."""
    gen = torch.Generator().manual_seed(4)
    shape = (BIAS,) if layout == "flat" else (37, 29)
    G = torch.randn(shape, generator=gen)
    G.view(-1)[:8] = 1e-3  # fp16: (1 - b2) g^2 underflows to V = 0, so N = M / eps; both must agree
    G = G.to(DEVICE, dtype)
    W = (torch.randn(shape, generator=gen) * 0.02).to(DEVICE, dtype)
    if layout == "transposed_grad":
        G = G.T.contiguous().T
    if layout == "transposed_param":
        W = W.T.contiguous().T
    M, V = torch.zeros_like(W), torch.zeros_like(W)
    W_start, W_ref, M_ref, V_ref = W.clone(), W.clone(), M.clone(), V.clone()
    hyper = dict(beta1=BETA1, beta2=BETA2, eps=EPS, step_size=reference.adam_step_size(0.1, BETA1, BETA2, 1),
                 scale=1.0, lr=0.1, weight_decay=0.1)

    adamw.adamw_update(W, G, M, V, **hyper)
    reference.galore_step(W_ref, G, None, None, M_ref, V_ref, **hyper)

    assert W.stride() == W_start.stride()  # updated in place, layout kept
    assert_change_matches(W, W_ref, W_start, "W")
    assert_moment_matches(M, M_ref, "exp_avg", dtype)
    assert_moment_matches(V, V_ref, "exp_avg_sq", dtype)


def test_galore_step_dispatch_full():
    """The dispatcher's "full" composition (P^T G by matmul, kernel (a) on Q; P N by matmul, kernel (b))."""
    gen = torch.Generator().manual_seed(5)
    m, n, r = 53, 37, 6
    G = torch.randn(m, n, generator=gen).to(DEVICE)
    P, Q = orthonormal(m, r, torch.float32, gen, column_major=True), orthonormal(n, r, torch.float32, gen)
    W = (torch.randn(m, n, generator=gen) * 0.02).to(DEVICE)
    M = (torch.randn(r, r, generator=gen) * 0.1).to(DEVICE)
    V = (torch.rand(r, r, generator=gen) * 0.01).to(DEVICE)
    W_ref, M_ref, V_ref = W.clone(), M.clone(), V.clone()
    hyper = dict(beta1=BETA1, beta2=BETA2, eps=EPS, step_size=0.05, scale=0.25, lr=0.1, weight_decay=0.1)

    kernels.galore_step(W, G, P, Q, M, V, **hyper)
    reference.galore_step(W_ref, G, P, Q, M_ref, V_ref, **hyper)

    assert_fp32_close(W, W_ref, "W")
    assert_fp32_close(M, M_ref, "exp_avg")
    assert_fp32_close(V, V_ref, "exp_avg_sq")


# ---- launcher input checks ------------------------------------------------------------------------------
def test_launchers_reject_bad_inputs():
    G, P, Q = torch.randn(8, 6), torch.randn(8, 2), torch.randn(6, 2)
    M, V = torch.zeros(2, 6), torch.zeros(2, 6)
    adam = dict(beta1=BETA1, beta2=BETA2, eps=EPS)
    update = dict(step_size=0.1, scale=0.25, lr=0.1, weight_decay=0.0)
    with pytest.raises(ValueError, match="exactly one of P"):
        project_adam.project_adam(G, P, Q, M, V, **adam)
    with pytest.raises(ValueError, match="exactly one of P"):
        backproject_update.backproject_update(G, M, None, None, **update)
    with pytest.raises(ValueError, match=r"P has shape \(6, 2\), expected \(8, 2\)"):
        project_adam.project_adam(G, Q, None, M, V, **adam)
    with pytest.raises(ValueError, match=r"exp_avg has shape \(2, 6\), expected \(8, 2\)"):
        project_adam.project_adam(G, None, Q, M, V, **adam)
    with pytest.raises(ValueError, match=r"N has shape \(2, 6\), expected \(8, 2\)"):
        backproject_update.backproject_update(G, M, None, Q, **update)
    with pytest.raises(TypeError, match="basis dtype torch.float16 differs"):
        project_adam.project_adam(G, P.half(), None, M, V, **adam)
    with pytest.raises(TypeError, match="must be float32, bfloat16 or float16"):
        adamw.adamw_update(G.long(), G, G, G, **adam, **update)
    with pytest.raises(ValueError, match="one device"):  # the meta device stands in for a second device
        project_adam.project_adam(G, P.to("meta"), None, M, V, **adam)
    with pytest.raises(ValueError, match="one device"):
        backproject_update.backproject_update(G.to("meta"), M, P, None, **update)


# ---- backend selection ----------------------------------------------------------------------------------
def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors .* TRITON_INTERPRET=1"):
        backends.step_function("triton", torch.zeros(3))
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.ones(3)
    opt = GaLoreAdamW([w], backend="triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        opt.step()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.step_function("triton", torch.zeros(3)) is kernels.galore_step


def test_auto_backend_uses_the_reference_on_cpu():
    assert backends.step_function("auto", torch.zeros(3)) is reference.galore_step
    if torch.cuda.is_available():
        assert backends.step_function("auto", torch.zeros(3, device="cuda")) is kernels.galore_step
        # fp64 is not a kernel dtype: auto falls back instead of raising
        assert backends.step_function("auto", torch.zeros(3, device="cuda", dtype=torch.float64)) \
            is reference.galore_step


# ---- no recompilation when the step scalars change ------------------------------------------------------
ADAM_SCALARS = {"beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps"}
KERNELS = {  # kernel, its step-dependent scalar arguments
    "project_adam": (project_adam._project_adam_kernel, ADAM_SCALARS),
    "backproject_update": (backproject_update._backproject_update_kernel, {"alpha", "decay"}),
    "adamw": (adamw._adamw_kernel, ADAM_SCALARS | {"alpha", "decay"}),
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_step_scalars_are_runtime_arguments(name):
    """lr, step size, betas, eps and decay are kernel arguments, not constexprs: a schedule never recompiles.

    (The interpreter compiles nothing, so this checks the signatures; test_no_recompile_on_gpu checks the
    compiled cache.)
    """
    kernel, scalars = KERNELS[name]
    params = inspect.signature(kernel.fn).parameters
    assert scalars <= set(params), f"{name}: expected step scalars {sorted(scalars - set(params))}"
    constexprs = {p for p, spec in params.items() if "constexpr" in str(spec.annotation)}
    assert constexprs, f"{name}: no constexprs found; the signature check is broken"
    assert not constexprs & scalars, f"{name}: step scalars as constexprs: {sorted(constexprs & scalars)}"


def compiled_variants(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)  # triton >= 3.2: device -> (kernel cache, ...)
    if caches is not None:
        return sum(len(cache[0]) for cache in caches.values())
    return sum(len(cache) for cache in kernel.cache.values())  # older triton 3.x: device -> {key: kernel}


@pytest.mark.gpu
def test_no_recompile_on_gpu():
    from lowrank_kernels.kernels import grouped_backproject_update, grouped_project_adam, multi_tensor_adamw

    # The optimizer steps std weights and the bias with the grouped kernels, "full" with the per-parameter
    # GEMM kernels (the per-parameter AdamW kernel is its fallback only).
    used = {"project_adam": project_adam._project_adam_kernel,
            "backproject_update": backproject_update._backproject_update_kernel,
            "grouped_project_adam": grouped_project_adam._grouped_project_adam_kernel,
            "grouped_backproject_update": grouped_backproject_update._grouped_backproject_update_kernel,
            "multi_tensor_adamw": multi_tensor_adamw._multi_tensor_adamw_kernel}
    projected = [("std", (256, 384), 32), ("std", (384, 256), 32), ("full", (256, 384), 16)]
    run_optimizers(torch.bfloat16, None, projected=projected, steps=1)  # compiles every variant used
    before = {name: compiled_variants(k) for name, k in used.items()}
    assert all(before.values()), f"some kernel never compiled: {before}"
    # Same shapes and dtypes, new lr (changed half-way), new step sizes and bias corrections.
    run_optimizers(torch.bfloat16, None, projected=projected, steps=3)
    after = {name: compiled_variants(k) for name, k in used.items()}
    assert after == before


# ---- LLaMA shapes on the GPU ----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,rank", [
    ((4096, 4096), 128), ((4096, 4096), 512), ((4096, 11008), 512), ((11008, 4096), 512),
], ids=["4096x4096-r128", "4096x4096-r512", "4096x11008-r512", "11008x4096-r512"])
def test_llama_shapes_on_gpu(dtype, shape, rank):
    """The optimizer comparison at LLaMA-7B shapes: 5 steps, a refresh before steps 1 and 5.

    eps 1e-4: at 45M entries some R entries lie within eps of 0, where N's slope is 0.1 / eps and the
    order of 4096-11008-term fp32 sums decides N; a larger eps keeps the comparison on the kernels.
    """
    start, runs = run_optimizers(dtype, None, projected=[("std", shape, rank)], bias=4096 * 3 + 1, steps=5,
                                 eps=1e-4, exact=dtype == torch.bfloat16)
    check_optimizer_runs(start, runs, [f"{shape} r={rank}", "bias"], 5)
