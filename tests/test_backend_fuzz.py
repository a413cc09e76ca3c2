"""backend="triton" against backend="torch" on random small odd shapes, and the one eps rule (7g).

Under TRITON_INTERPRET=1 (conftest.py, without CUDA) the kernels run on CPU. A short seeded loop draws
shapes (2 to 40, 3-D weights too), ranks, proj_types, dtypes and state dtypes; both optimizers get the
same gradients, drawn independently of the weights, so the runs differ only by the kernels' roundings.
Tolerances are those of test_kernels.py, which justifies them: fp32 elementwise (rtol 1e-5, atol 1e-6 x
the largest magnitude); 16-bit norm-wise on what the steps changed, W_T - W_0 (bf16 12%, fp16 3%).
"""
import random

import pytest
import torch

pytest.importorskip("triton")

from lowrank_kernels import GaLoreAdamW, reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CHANGE_TOL = {torch.bfloat16: 0.12, torch.float16: 0.03}
CASES = 10


def _case(seed):
    """A drawn case; a shape with min(m, n) < 2 (no rank below it) is drawn again, never skipped."""
    rng = random.Random(seed)
    dtype = DTYPES[seed % 3]
    while True:
        shape = (rng.randint(2, 40), rng.randint(2, 40))
        if rng.random() < 0.3:
            shape = (shape[0], rng.randint(1, 4), rng.randint(2, 6))  # a conv-like weight: (m, a * b)
        m, n = shape[0], shape[1] * (shape[2] if len(shape) == 3 else 1)
        if min(m, n) >= 2:
            break
    return dict(dtype=dtype, shape=shape, rank=rng.randint(1, min(m, n) - 1),
                proj_type=rng.choice(PROJ_TYPES), bias=rng.randint(1, 70),
                state_dtype=rng.choice([None, "float32"]), gap=rng.randint(1, 3))


@pytest.mark.parametrize("seed", range(CASES))
def test_triton_matches_torch_on_random_shapes(seed):
    case = _case(seed)
    dtype, shape = case["dtype"], case["shape"]
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(shape, generator=gen) * 0.02, torch.randn(case["bias"], generator=gen) * 0.02]
    start = [t.to(DEVICE, dtype) for t in start]
    lr = 1e-2 if dtype == torch.float32 else 1e-1  # 16-bit: steps of several ulps, not rounding noise
    runs = {}
    for backend in ("torch", "triton"):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        # eps 1e-3 for "full": a refresh makes R = diag(S) + summation noise, and a small eps would turn
        # that noise into O(0.1) entries of N decided by the order of the sums (see test_kernels.py).
        eps = 1e-3 if case["proj_type"] == "full" else 1e-6
        groups = [dict(params=[params[0]], rank=case["rank"], proj_type=case["proj_type"], eps=eps,
                       update_proj_gap=case["gap"], state_dtype=case["state_dtype"]),
                  dict(params=[params[1]], state_dtype=case["state_dtype"])]
        runs[backend] = (params, GaLoreAdamW(groups, lr=lr, weight_decay=0.05, backend=backend))
    grads = torch.Generator().manual_seed(100 + seed)
    for _ in range(4):
        for i, t in enumerate(start):
            g = torch.randn(t.shape, generator=grads).to(DEVICE, dtype)
            for params, _ in runs.values():
                params[i].grad = g.clone()
        for _, opt in runs.values():
            opt.step()
    (ref, _), (fused, _) = runs["torch"], runs["triton"]
    for w0, a, b in zip(start, fused, ref):
        label = f"{case}"
        assert torch.isfinite(a).all(), label
        if dtype == torch.float32:
            atol = 1e-6 * b.abs().max().item()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{label}: {m}")
        else:
            change, want = (a - w0).double(), (b - w0).double()
            err = ((change - want).norm() / want.norm()).item()
            assert err <= CHANGE_TOL[dtype], f"{label}: W_T - W_0 norm-wise error {err:.3g}"


# ---- one eps rule (7g) ----------------------------------------------------------------------------------
def test_reference_computes_n_in_fp32_from_16_bit_moments():
    """N = M / (sqrt(V) + eps) in fp32 from the moments as stored: an eps below fp16's smallest subnormal
    (6e-8) still counts; added in fp16 it would round to 0, and M / 0 would be inf."""
    R = torch.full((2, 3), 1e-4)
    M, V = torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, 3, dtype=torch.float16)
    N = reference.adam_normalize(R, M, V, 0.9, 0.999, 1e-10)
    assert V.eq(0).all()  # (1 - 0.999) * 1e-8 underflows in fp16
    assert torch.equal(N, M.float() / 1e-10) and torch.isfinite(N).all()


@pytest.mark.parametrize("projected", [True, False])
def test_fp16_moments_with_tiny_eps_agree_across_backends(projected):
    start = torch.randn(9, 13, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = []
    for backend in ("torch", "triton"):
        p = torch.nn.Parameter(start.clone())
        group = dict(params=[p], state_dtype="float16", eps=1e-10, **(dict(rank=3) if projected else {}))
        opt = GaLoreAdamW([group], lr=1e-6, backend=backend)
        for seed in range(3):
            p.grad = torch.randn(9, 13, generator=torch.Generator().manual_seed(seed)).to(DEVICE) * 1e-4
            opt.step()
        assert opt.state[p]["exp_avg_sq"].eq(0).any()  # V underflowed: N = M / eps somewhere
        results.append(p.detach())
    assert all(torch.isfinite(r).all() for r in results)
    # Both round the same stored moments' fp32 quotient; M itself may differ by an fp16 ulp (2^-11).
    change = [r - start for r in results]
    assert ((change[0] - change[1]).norm() / change[1].norm()).item() < 2e-3
