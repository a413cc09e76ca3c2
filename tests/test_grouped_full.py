"""The "full" projection (R = P^T G Q) in grouped launches (kernels/grouped_full.py) against the reference.

Interpreter on CPU, odd shapes, several weights of different shapes and ranks in one bucket, fp32 and bf16.
Tolerances are test_kernels.py's (its helpers' docstrings derive them): the grouped launches compute the
reference's products in its association, R = (P^T G) Q and U = (P N) Q^T, each rounded once to the gradient
dtype as the reference's matmuls round, so only the GEMMs' summation order differs.
"""
import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from lowrank_kernels import reference  # noqa: E402
from lowrank_kernels.kernels import grouped_full  # noqa: E402
from test_grouped_kernels import LaunchCounter, ordinary_launches  # noqa: E402
from helpers import linear_stack, train_stack  # noqa: E402
from test_kernels import assert_change_matches, assert_moment_matches, orthonormal  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(37, 53, 3), (64, 29, 5), (23, 70, 7)]  # (m, n, r): no extent a multiple of a block size


def problems(dtype, gen):
    out, twins = [], []
    for i, (m, n, r) in enumerate(SHAPES):
        p = dict(param=(torch.randn(m, n, generator=gen) * 0.02).to(DEVICE, dtype),
                 grad=torch.randn(m, n, generator=gen).to(DEVICE, dtype),
                 P=orthonormal(m, r, dtype, gen, column_major=i == 1), Q=orthonormal(n, r, dtype, gen),
                 exp_avg=(torch.randn(r, r, generator=gen) * 0.1).to(DEVICE, dtype),
                 exp_avg_sq=(torch.rand(r, r, generator=gen) * 0.01).to(DEVICE, dtype),
                 N=torch.empty(r, r, dtype=dtype, device=DEVICE), beta1=0.9, beta2=0.99 + 0.001 * i, eps=1e-6)
        out.append(p)
        twins.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in p.items()})
    return out, twins


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grouped_full_step_matches_the_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    probs, twins = problems(dtype, gen)
    start = [p["param"].clone() for p in probs]
    tables = grouped_full.build_full_tables(probs)
    lr, wd = (1e-2 if dtype == torch.float32 else 1e-1), 0.05  # 16-bit: a step spans W's ulps
    scalars = torch.zeros(len(probs), 4, device=DEVICE)
    for step in range(1, 4):
        grads = [torch.randn(p["param"].shape, generator=gen).to(DEVICE, dtype) for p in probs]
        sizes = [reference.adam_step_size(lr, t["beta1"], t["beta2"], step) for t in twins]
        scalars.copy_(torch.tensor([[s, 0.5, lr * wd, 0.0] for s in sizes]))
        grouped_full.grouped_full_step(tables, scalars, grads=grads)
        for t, g, s in zip(twins, grads, sizes):
            reference.galore_step(t["param"], g, t["P"], t["Q"], t["exp_avg"], t["exp_avg_sq"], beta1=t["beta1"],
                                  beta2=t["beta2"], eps=t["eps"], step_size=s, scale=0.5, lr=lr, weight_decay=wd)
    for i, (p, t, w0) in enumerate(zip(probs, twins, start)):
        m, n, r = SHAPES[i]
        assert_change_matches(p["param"], t["param"], w0, f"W{i}", inner=max(m, n))
        for k in ("exp_avg", "exp_avg_sq"):
            assert_moment_matches(p[k], t[k], f"{k}{i}", dtype, inner=max(m, n))


def test_build_full_tables_refuses_bad_problems_before_anything():
    gen = torch.Generator().manual_seed(1)
    probs, _ = problems(torch.float32, gen)
    probs[1] = dict(probs[1], N=torch.empty(3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="problem 1: N has shape"):
        grouped_full.build_full_tables(probs)
    probs, _ = problems(torch.float32, gen)
    probs = [dict(p, Q=p["Q"].bfloat16()) for p in probs]
    with pytest.raises(TypeError, match="Q dtype"):
        grouped_full.build_full_tables(probs)


def _full_model(backend, depth=1):
    return linear_stack(backend, depth, projected=dict(rank=4, proj_type="full", update_proj_gap=3))


_train = train_stack


def test_full_projections_in_the_whole_model_step(monkeypatch):
    """backend="triton": full projections take the grouped launches (five per bucket, whatever the depth),
    follow the reference across refreshes, and layer-wise steps equal whole-model ones."""
    ref, ref_opt = _full_model("torch")
    _train(ref, ref_opt, 5)
    ker, ker_opt = _full_model("triton")
    counter = LaunchCounter(monkeypatch)
    _train(ker, ker_opt, 5)
    monkeypatch.undo()
    assert "_project_adam_kernel" not in counter.counts and "_backproject_update_kernel" not in counter.counts
    for (name, a), b in zip(ref.named_parameters(), ker.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")

    def build(depth):
        model, opt = _full_model("triton", depth)
        _train(model, opt, 1)  # the refresh step
        g = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        return model, opt

    counts = ordinary_launches(monkeypatch, build, (1, 2))
    assert counts[1] == counts[2], counts


def test_full_layerwise_steps_equal_whole_model_steps():
    from lowrank_kernels.layerwise import LayerwiseUpdates
    model, opt = _full_model("triton")
    _train(model, opt, 4)
    lw_model, lw_opt = _full_model("triton")
    hooks = LayerwiseUpdates(lw_opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(16, 13, generator=g), torch.randn(16, 7, generator=g)
        hooks.backward(nn.functional.mse_loss(lw_model(x), y))
    hooks.remove()
    for a, b in zip(model.parameters(), lw_model.parameters()):
        assert torch.equal(a, b)
