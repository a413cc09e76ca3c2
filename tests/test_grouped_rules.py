"""The update rules (fira, frugal, apollo, apollo-mini) in the grouped kernels, against the reference.

Without CUDA these run under TRITON_INTERPRET=1 (conftest.py) on small odd shapes. The oracle is
update_rules.run_step(backend "torch") (the reference math every backend uses per parameter).

Tolerances. fp32: both sides round each operation once in fp32 and differ in summation orders (the GEMMs,
the norms: the kernels sum squares of tiles and then channels, torch.norm in its own order, and the
limiter's ||S|| comes in closed form from those sums, not from S); a relative error of a few 1e-6 on the
change of W, hence rtol 1e-4 on W_T - W_0 norm-wise and 1e-5 elementwise-relative to W's scale. bf16: the
reference rounds to bf16 after every operation (the ratio, S, the limiter, the sum U) and the kernels keep
fp32 until the store, so the change of W agrees to a few bf16 ulps of the update: 5% norm-wise (test_kernels'
bf16 bound of 12% is for three steps of galore; the rules' bounds are measured below with margin).
"""
import pytest
import torch

pytest.importorskip("triton")

from lowrank_kernels import reference  # noqa: E402
from lowrank_kernels.kernels import grouped_project_adam as gpa  # noqa: E402
from test_kernels import orthonormal  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_only_mode_writes_R(side, dtype):
    """adam=False: R = P^T G / G Q rounded to the gradient's dtype, in the N buffer; nothing else read."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(37, 23, 5), (23, 41, 9), (50, 19, 3)]
    problems, expected = [], []
    for m, n, r in shapes:
        G = torch.randn(m, n, generator=gen).to(DEVICE, dtype)
        basis = orthonormal(m if side == "left" else n, r, dtype, gen)
        low = (r, n) if side == "left" else (m, r)
        problems.append(dict(grad=G, basis=basis, N=torch.full(low, float("nan"), dtype=dtype, device=DEVICE)))
        expected.append(reference.project(G, basis, None) if side == "left" else reference.project(G, None, basis))
    table = gpa.build(side, problems, DEVICE, dtype, dtype, dtype, sms=0, adam=False)
    gpa.launch(table, torch.zeros(len(problems), 5, device=DEVICE))
    for p, R in zip(problems, expected):
        # fp32: summation order only; bf16: one rounding of the same fp32 sum, so at most one bf16 ulp
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-2)
        torch.testing.assert_close(p["N"].float(), R.float(), **tol)
