"""Bad input gets a clear error and leaves weights and optimizer state untouched."""
import copy

import pytest
import torch
from torch import nn

from lowrank_kernels import GaLoreAdamW

from helpers import ToyNet, batches, galore_groups, train


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_unchanged(model, opt, snap):
    weights, sd = snap
    for a, b in zip(model.parameters(), weights):
        assert torch.equal(a, b)
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for idx, entry in sd["state"].items():
        assert now["state"][idx].keys() == entry.keys()
        for key, value in entry.items():
            got = now["state"][idx][key]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value


# ---- construction -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, -3])
def test_rank_below_one(rank):
    with pytest.raises(ValueError, match="Invalid rank"):
        GaLoreAdamW(galore_groups(ToyNet(), rank=rank))


def test_rank_too_large_names_shape_and_rank():
    with pytest.raises(ValueError, match=r"rank=12 .*shape \(12, 48\).*min\(m, n\) = 12"):
        GaLoreAdamW(galore_groups(ToyNet(), rank=12))


def test_rank_too_large_names_the_parameter_when_named():
    model = ToyNet()
    named = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    with pytest.raises(ValueError, match=r"'out.weight'.*shape \(12, 48\)"):
        GaLoreAdamW([{"params": named, "rank": 12}])


def test_one_dimensional_parameter_in_projected_group():
    with pytest.raises(ValueError, match=r"shape \(48,\).*2 or more dimensions"):
        GaLoreAdamW([{"params": [nn.Linear(4, 48).bias], "rank": 2}])


@pytest.mark.parametrize(
    "kwargs,group,match",
    [
        (dict(lr=-1.0), {}, "Invalid learning rate"),
        (dict(lr=float("nan")), {}, "Invalid learning rate"),
        (dict(betas=(1.0, 0.999)), {}, "beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), {}, "beta parameter at index 1"),
        (dict(betas=(0.9,)), {}, "Invalid betas"),
        (dict(eps=-1e-8), {}, "Invalid epsilon"),
        (dict(weight_decay=-0.1), {}, "Invalid weight_decay"),
        ({}, dict(update_proj_gap=0), "Invalid update_proj_gap"),
        ({}, dict(update_proj_gap=2.5), "Invalid update_proj_gap"),
        ({}, dict(scale=0.0), "Invalid scale"),
        ({}, dict(scale=float("inf")), "Invalid scale"),
        ({}, dict(proj_type="diagonal"), "Invalid proj_type"),
        ({}, dict(projector="qr"), "Invalid projector"),
        ({}, dict(state_dtype="int4"), "Invalid state_dtype"),
        (dict(backend="cuda"), {}, "Invalid backend"),
        (dict(seed=1.5), {}, "Invalid seed"),
    ],
)
def test_invalid_hyperparameters_at_construction(kwargs, group, match):
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW(galore_groups(ToyNet(), rank=4, **group), **kwargs)


# ---- at step time: nothing changes ------------------------------------------------------------------
def _trained(steps=2, **projected):
    model = ToyNet()
    opt = GaLoreAdamW(galore_groups(model, rank=4, update_proj_gap=3, **projected), lr=1e-2, weight_decay=0.1)
    train(model, opt, batches(steps))
    return model, opt


def _fresh_grads(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("projector", ["svd", "rsvd"])
def test_non_finite_gradient_at_refresh_raises_and_changes_nothing(projector):
    model, opt = _trained(steps=3, projector=projector)  # step 3 is a refresh (gap 3)
    _fresh_grads(model)
    model.mid.weight.grad[2, 7] = float("nan")
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"non-finite gradient in parameter #\d+ \(shape \(48, 48\)\).*refresh"):
        opt.step()
    _assert_unchanged(model, opt, snap)
    # The caller skips the batch and carries on.
    opt.zero_grad()
    _fresh_grads(model, seed=6)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state[model.mid.weight]["step"] == 4


def test_non_finite_gradient_names_a_named_parameter():
    model = ToyNet()
    named = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    opt = GaLoreAdamW([{"params": named, "rank": 4}])
    _fresh_grads(model)
    model.inp.weight.grad[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match=r"non-finite gradient in parameter 'inp.weight'"):
        opt.step()
    assert not opt.state


def test_sparse_gradient_raises_and_changes_nothing():
    model, opt = _trained()
    _fresh_grads(model)
    model.out.weight.grad = model.out.weight.grad.to_sparse()
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    _assert_unchanged(model, opt, snap)


def test_complex_gradient_raises():
    p = nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    opt = GaLoreAdamW([p])
    p.grad = torch.randn(3, 3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex gradients"):
        opt.step()
    assert not opt.state


def test_complex_parameter_in_projected_group():
    with pytest.raises(ValueError, match="complex"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.randn(6, 5, dtype=torch.complex64))], "rank": 2}])


@pytest.mark.parametrize(
    "key,value,match",
    [("lr", -0.5, "learning rate"), ("betas", (0.9, 1.5), "beta"), ("scale", -1.0, "scale"),
     ("update_proj_gap", 0, "update_proj_gap"), ("proj_type", "nope", "proj_type")],
)
def test_group_mutated_to_invalid_value_raises_at_step_and_changes_nothing(key, value, match):
    model, opt = _trained()
    opt.param_groups[1][key] = value
    _fresh_grads(model)
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    _assert_unchanged(model, opt, snap)
