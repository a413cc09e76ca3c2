"""Bad input gets a clear error and leaves weights and optimizer state untouched."""
import re

import pytest
import torch
from torch import nn

from lowrank_kernels import GaLoreAdamW

from helpers import ToyNet, assert_unchanged, batches, fresh_grads, galore_groups, snapshot, train, trained


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
@pytest.mark.parametrize("projector", ["svd", "rsvd"])
def test_non_finite_gradient_at_refresh_raises_and_changes_nothing(projector):
    model, opt = trained(steps=3, projector=projector)  # step 3 is a refresh (gap 3)
    fresh_grads(model)
    model.mid.weight.grad[2, 7] = float("nan")
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"non-finite gradient in parameter #\d+ \(shape \(48, 48\)\).*refresh"):
        opt.step()
    assert_unchanged(model, opt, snap)
    # The caller skips the batch and carries on.
    opt.zero_grad()
    fresh_grads(model, seed=6)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state[model.mid.weight]["step"] == 4


def test_non_finite_gradient_names_a_named_parameter():
    model = ToyNet()
    named = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    opt = GaLoreAdamW([{"params": named, "rank": 4}])
    fresh_grads(model)
    model.inp.weight.grad[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match=r"non-finite gradient in parameter 'inp.weight'"):
        opt.step()
    assert not opt.state


def test_sparse_gradient_raises_and_changes_nothing():
    model, opt = trained()
    fresh_grads(model)
    model.out.weight.grad = model.out.weight.grad.to_sparse()
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert_unchanged(model, opt, snap)


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
    model, opt = trained()
    opt.param_groups[1][key] = value
    fresh_grads(model)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_unchanged(model, opt, snap)


def test_set_of_params_raises_type_error_as_torch_optim_does():
    with pytest.raises(TypeError, match="ordered collections"):
        GaLoreAdamW([{"params": set(ToyNet().parameters())}])
    with pytest.raises(TypeError, match="ordered collections"):
        GaLoreAdamW([{"params": {p for p in ToyNet().parameters() if p.dim() == 2}, "rank": 2}])


def test_tensor_lr_must_have_one_element():
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        GaLoreAdamW(ToyNet().parameters(), lr=torch.tensor([1e-3, 1e-3]))


# ---- group keys edited after construction (7a) --------------------------------------------------------
@pytest.mark.parametrize("key,value", [("rank", 12), ("rank", 48), ("rank", 2.0), ("rank", True)])
def test_rank_edited_too_large_raises_naming_the_parameter_and_changes_nothing(key, value):
    model = ToyNet()
    named = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    opt = GaLoreAdamW([{"params": named, "rank": 4, "update_proj_gap": 3}], lr=1e-2)
    train(model, opt, batches(2))
    opt.param_groups[0][key] = value
    fresh_grads(model)
    snap = snapshot(model, opt)
    match = r"rank=12 is too large for parameter 'out.weight'.*\(12, 48\)" if value == 12 else \
        r"rank=48 is too large for parameter 'inp.weight'" if value == 48 else "Invalid rank"
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_unchanged(model, opt, snap)


def test_max_rank_edited_too_large_raises_and_changes_nothing():
    model, opt = trained(rank_policy="energy")
    opt.param_groups[1]["max_rank"] = 30  # >= min(m, n) = 12 for the 12x48 weight, = 16 for 48x16
    fresh_grads(model)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"rank=30 is too large .*shape \(48, 16\)"):
        opt.step()
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("key,choice,new_keys", [
    ("rank_policy", "energy", {"energy_threshold", "min_rank", "max_rank"}),
    ("refresh_policy", "lazy", {"similarity_threshold", "patience", "gap_growth"}),
    ("refresh_policy", "converged", {"convergence_tol"}),
])
def test_policy_switched_later_gets_its_defaults(key, choice, new_keys):
    """A policy chosen by editing param_groups gets its keys' defaults at the next step, as at construction."""
    model, opt = trained(steps=2)
    group = opt.param_groups[1]
    assert not new_keys & group.keys()
    group[key] = choice
    train(model, opt, batches(5, seed=4))  # crosses a refresh (gap 3), where the policy acts
    assert new_keys <= group.keys()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    reference = GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(4, 4))], "rank": 2, key: choice}])
    assert {k: group[k] for k in new_keys} == {k: reference.param_groups[0][k] for k in new_keys}


def test_policy_key_edited_to_invalid_raises_and_changes_nothing():
    model, opt = trained(refresh_policy="lazy")
    opt.param_groups[1]["patience"] = 0
    fresh_grads(model)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"Invalid patience: 0.*param group 1"):
        opt.step()
    assert_unchanged(model, opt, snap)


def _side(state):
    return {k for k in ("proj_left", "proj_right") if k in state}


@pytest.mark.parametrize("new_type", ["reverse_std", "full", "left"])
def test_proj_type_changed_mid_run_restarts_those_weights(new_type):
    """Documented rule: a weight whose projected side changes gets a new basis and fresh moments (its
    bias correction restarts) at the next step; weights whose side is unchanged carry on untouched."""
    model, opt = trained(steps=2)  # mid-gap (gap 3): no refresh due at the next step
    weights = [model.inp.weight, model.mid.weight, model.out.weight]
    before = {p: dict(opt.state[p]) for p in weights}
    opt.param_groups[1]["proj_type"] = new_type
    fresh_grads(model)
    opt.step()
    for p in weights:
        m, n = p.shape
        side = {"reverse_std": "left" if m >= n else "right", "full": "full", "left": "left"}[new_type]
        keys = {"left": {"proj_left"}, "right": {"proj_right"}, "full": {"proj_left", "proj_right"}}[side]
        state = opt.state[p]
        assert _side(state) == keys
        assert state["step"] == 3
        if _side(before[p]) == keys:  # same side: an ordinary non-refresh step with the old basis
            assert state["refreshes"] == before[p]["refreshes"]
            for key in keys:
                assert torch.equal(state[key], before[p][key])
        else:  # restarted: one refresh, moments from this step only, bias correction from here
            assert state["refreshes"] == 1 and state["last_refresh"] == 2 and state["moment_start"] == 2
            grad = p.grad.float()
            R = grad @ state["proj_right"] if keys == {"proj_right"} else state["proj_left"].T @ grad
            if keys == {"proj_left", "proj_right"}:
                R = R @ state["proj_right"]
            torch.testing.assert_close(state["exp_avg"], 0.1 * R, rtol=1e-5, atol=1e-7)
    train(model, opt, batches(5, seed=9))  # and it trains on, across refreshes
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_rank_added_to_or_removed_from_a_group_restarts_its_weights():
    model, opt = trained(steps=2)
    plain, projected = opt.param_groups
    del projected["rank"]
    plain_weight = nn.Parameter(torch.randn(20, 10))
    opt.add_param_group({"params": [plain_weight]})
    plain_weight.grad = torch.randn(20, 10)
    opt.step()
    for p in projected["params"]:
        assert not _side(opt.state[p]) and "rank" not in opt.state[p]
        assert opt.state[p]["exp_avg"].shape == p.shape and opt.state[p]["step"] == 3
    opt.param_groups[2]["rank"] = 3
    plain_weight.grad = torch.randn(20, 10)
    opt.step()
    state = opt.state[plain_weight]
    assert _side(state) == {"proj_right"} and state["rank"] == 3 and state["exp_avg"].shape == (20, 3)
    assert state["step"] == 2 and state["moment_start"] == 1


# ---- backends (7b) --------------------------------------------------------------------------------------
def _two_params(dtype_last):
    # CUDA tensors where there is a GPU; CPU ones run the kernels under the interpreter (conftest.py)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    first = nn.Parameter(torch.randn(6, 5, device=device))
    last = nn.Parameter(torch.randn(7, 4, dtype=dtype_last, device=device))
    for p in (first, last):
        p.grad = torch.randn_like(p)
    return first, last


def test_triton_backend_with_float64_raises_before_any_parameter_changes():
    pytest.importorskip("triton")
    first, last = _two_params(torch.float64)  # the fp32 one would be stepped first
    opt = GaLoreAdamW([{"params": [first], "rank": 2}, {"params": [last]}], backend="triton")
    before = first.detach().clone()
    with pytest.raises(TypeError, match=r"parameter #1 \(shape \(7, 4\)\).*float64.*backend='auto'"):
        opt.step()
    assert torch.equal(first, before) and not opt.state


def test_triton_backend_on_cpu_without_interpreter_raises_before_anything_changes(monkeypatch):
    pytest.importorskip("triton")
    model, opt = trained(steps=2)
    opt.backend = "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fresh_grads(model)
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"parameter #0 .*needs CUDA tensors"):
        opt.step()
    assert_unchanged(model, opt, snap)


# ---- gradients and parameters that no longer fit (7e) ---------------------------------------------------
def test_gradient_of_another_shape_raises_and_changes_nothing():
    model, opt = trained()
    fresh_grads(model)
    model.mid.weight.data = torch.randn(50, 48)  # the gradient stays 48x48
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"gradient of parameter #\d+ \(shape \(50, 48\)\) has shape \(48, 48\)"):
        opt.step()
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("which,key", [("mid", "proj_right"), ("norm", "exp_avg")])
def test_parameter_resized_after_its_state_exists_raises_naming_the_key(which, key):
    model, opt = trained()
    module = getattr(model, which)
    new_shape = (48, 40) if which == "mid" else (50,)
    module.weight.data = torch.randn(new_shape)
    fresh_grads(model)
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=re.escape(f"shape {tuple(new_shape)}") + rf"\).*state '{key}' has shape.*resized"):
        opt.step()
    assert_unchanged(model, opt, snap)
    del opt.state[module.weight]  # the documented way out
    opt.step()
    assert opt.state[module.weight]["step"] == 1


# ---- non-finite gradients between refreshes (7h) --------------------------------------------------------
def test_non_finite_gradient_between_refreshes_poisons_the_moments_without_check_finite():
    """Documented: off the refresh steps a NaN enters the moments for good (and P spreads it)."""
    model, opt = trained(steps=2)  # step 3 is not a refresh (gap 3)
    fresh_grads(model)
    model.mid.weight.grad[2, 7] = float("nan")
    opt.step()
    assert not torch.isfinite(opt.state[model.mid.weight]["exp_avg"]).all()
    assert not torch.isfinite(model.mid.weight).all()


@pytest.mark.parametrize("where", ["optimizer", "group"])
def test_check_finite_refuses_a_non_finite_gradient_at_any_step(where):
    model = ToyNet()
    groups = galore_groups(model, rank=4, update_proj_gap=3, **({"check_finite": True} if where == "group" else {}))
    opt = GaLoreAdamW(groups, lr=1e-2, **({"check_finite": True} if where == "optimizer" else {}))
    train(model, opt, batches(2))
    for bad in (model.mid.weight, model.norm.bias):  # a projected and a plain parameter
        if where == "group" and bad.dim() == 1:
            continue  # the flag is on the projected group only
        fresh_grads(model)
        bad.grad.view(-1)[3] = float("inf")
        snap = snapshot(model, opt)
        with pytest.raises(RuntimeError, match=r"non-finite gradient in parameter #\d+ .*check_finite=True.*step 2"):
            opt.step()
        assert_unchanged(model, opt, snap)
    fresh_grads(model)
    opt.step()
    assert opt.state[model.mid.weight]["step"] == 3


def test_check_finite_must_be_a_bool():
    with pytest.raises(ValueError, match="Invalid check_finite"):
        GaLoreAdamW(ToyNet().parameters(), check_finite="yes")


def test_state_dtype_edited_mid_run_moves_the_moments():
    model, opt = trained(steps=2)
    weight = model.mid.weight
    before = opt.state[weight]["exp_avg"].clone()
    opt.param_groups[1]["state_dtype"] = "bfloat16"
    fresh_grads(model)
    opt.step()
    assert opt.state[weight]["exp_avg"].dtype == opt.state[weight]["exp_avg_sq"].dtype == torch.bfloat16
    expected = (0.9 * before.bfloat16().float() + 0.1 * (weight.grad @ opt.state[weight]["proj_right"]))
    # bf16 rounds each moment op (2^-8 relative), and entries that cancel lose more: a norm-wise check
    assert (opt.state[weight]["exp_avg"].float() - expected).norm() / expected.norm() < 1e-2
    opt.param_groups[1]["state_dtype"] = None  # back to the gradient's dtype
    fresh_grads(model, seed=7)
    opt.step()
    assert opt.state[weight]["exp_avg"].dtype == torch.float32
