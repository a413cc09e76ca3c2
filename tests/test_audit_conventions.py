"""torch.optim conventions, audited as an outside user would check them, on backend "torch" and on backend
"triton" (the grouped kernels; the Triton interpreter on CPU): tiny odd shapes (13x9, 9x13 and a 5x3x4
weight at rank 3, a 1-D and a 0-D parameter), both the whole-model step and layer-wise updates.

What tests/test_optim_conventions.py already covers on the reference (deepcopy, pickle, per-group
hyperparameters, OneCycleLR, step hooks, printing, torch.optim's param errors) is checked here on the
grouped triton path, under schedules and gradients that come and go, and with the misuse torch's own
optimizer tests (torch/testing/_internal/common_optimizers.py) apply.

Every comparison is exact (torch.equal): a continuation, a copy, a reload or a schedule must reproduce
the same arithmetic on the same backend, so any difference is a bug, not roundoff.
"""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

from lowrank_kernels import GaLoreAdamW, LayerwiseUpdates

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.filterwarnings("ignore"))]
SHAPES = [(13, 9), (9, 13), (5, 3, 4)]  # tall, wide and a 3-D weight (optimised as 5x12): multiples of no block
PLAIN_SHAPES = [(13,), ()]  # a 1-D and a 0-D parameter, in the group without rank
GROUP = dict(rank=3, update_proj_gap=2)  # refreshes at steps 0, 2, 4, ...


@pytest.fixture(autouse=True)
def _needs_triton(request):
    if "triton" in request.node.name:
        pytest.importorskip("triton")


def make(backend, projected=None, plain=None, seed=0, **optim):
    """Weights (projected group, listed first) and plain parameters, and their optimizer."""
    g = torch.Generator().manual_seed(seed)
    weights = [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    others = [nn.Parameter(torch.randn(s, generator=g)) for s in PLAIN_SHAPES]
    opt = GaLoreAdamW([{"params": others, **(plain or {})}, {"params": weights, **GROUP, **(projected or {})}],
                      **{"lr": 1e-2, "weight_decay": 0.05, "backend": backend, **optim})
    return weights + others, opt


def set_grads(params, seed, skip=()):
    """Seeded gradients; parameters at the positions in ``skip`` get None."""
    g = torch.Generator().manual_seed(1000 + seed)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g)
        p.grad = None if i in skip else grad


def run(params, opt, steps, start=0, skip=None):
    for s in range(start, start + steps):
        set_grads(params, s, (skip or {}).get(s, ()))
        opt.step()


def same_params(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def same_state(sa, sb):
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for idx, entry in sa["state"].items():
        assert entry.keys() == sb["state"][idx].keys(), idx
        for key, value in entry.items():
            other = sb["state"][idx][key]
            if torch.is_tensor(value):
                assert value.dtype == other.dtype and torch.equal(value, other), (idx, key)
            else:
                assert value == other, (idx, key)


def saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---- param groups -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_with_rank_after_steps_equals_a_group_present_from_the_start(backend):
    """A weight added mid-training steps exactly like one that was there all along without a gradient."""
    params, opt = make(backend)
    late_params, late = make(backend)
    g = torch.Generator().manual_seed(7)
    start = torch.randn(11, 7, generator=g)
    extra, extra_late = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    opt.add_param_group({"params": [extra], "rank": 2, "lr": 3e-2})
    everything = params + [extra]
    run(everything, opt, 3, skip={s: (len(params),) for s in range(3)})
    run(late_params, late, 3)
    late.add_param_group({"params": [extra_late], "rank": 2, "lr": 3e-2})
    group = late.param_groups[-1]
    # torch.optim fills the optimizer's defaults in; GaLore's keys get theirs
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-6, 0.05)
    assert (group["update_proj_gap"], group["scale"], group["proj_type"], group["projector"]) == (200, 0.25, "std", "svd")
    run(everything, opt, 3, start=3)
    run(late_params + [extra_late], late, 3, start=3)
    assert same_params(everything, late_params + [extra_late])
    assert late.state[extra_late]["step"] == 3 and late.state[extra_late]["rank"] == 2
    same_state(opt.state_dict(), late.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_refuses_a_parameter_already_present_and_changes_nothing(backend):
    params, opt = make(backend)
    run(params, opt, 1)
    groups_before = [dict(g, params=list(g["params"])) for g in opt.param_groups]
    for bad in ({"params": [params[0]], "rank": 2}, {"params": [params[3]]},
                {"params": [nn.Parameter(torch.randn(4, 4)), params[1]], "rank": 2}):
        with pytest.raises(ValueError, match="more than one parameter group"):
            opt.add_param_group(bad)
    assert len(opt.param_groups) == 2
    for g, before in zip(opt.param_groups, groups_before):
        assert g.keys() == before.keys() and all(a is b for a, b in zip(g["params"], before["params"]))
    run(params, opt, 1, start=1)  # still steps


def test_groups_with_and_without_rank_in_one_optimizer_keep_their_keys():
    params, opt = make("torch")
    plain, projected = opt.param_groups
    assert "rank" not in plain and "proj_type" not in plain and "update_proj_gap" not in plain
    assert projected["rank"] == 3 and projected["update_proj_gap"] == 2
    run(params, opt, 2)
    assert "rank" not in opt.state[params[3]] and opt.state[params[0]]["rank"] == 3


@pytest.mark.parametrize("shape", [(7,), ()])
def test_a_1d_or_0d_parameter_in_a_group_with_rank_is_refused_at_construction(shape):
    """README: "1-D parameters belong in a group without rank"."""
    w = nn.Parameter(torch.randn(shape))
    with pytest.raises(ValueError, match="rank"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.randn(6, 5)), w], "rank": 2}])
    opt = GaLoreAdamW([nn.Parameter(torch.randn(6, 5))])
    with pytest.raises(ValueError, match="rank"):
        opt.add_param_group({"params": [w], "rank": 2})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["item", "list"])
def test_a_parameter_swapped_into_a_group_is_the_one_stepped(backend, how):
    """torch.optim reads param_groups afresh at every step: a tensor put in place of another (the same
    number of parameters, so only identities change) is stepped, and the one it replaced is not. It then
    steps exactly like a parameter that was in the group from the start without a gradient until now.
    (A cache keyed on the groups' sizes stepped the old tensor and never the new one.)"""
    params, opt = make(backend)
    ref_params, ref = make(backend)
    run(params, opt, 2)
    run(ref_params, ref, 2, skip={0: (0,), 1: (0,)})  # ref's 13x9 weight: no gradient so far
    new = nn.Parameter(ref_params[0].detach().clone())
    if how == "item":
        opt.param_groups[1]["params"][0] = new
    else:
        opt.param_groups[1]["params"] = [new] + opt.param_groups[1]["params"][1:]
    old, old_value = params[0], params[0].detach().clone()
    params[0] = new
    old.grad = torch.ones_like(old)
    run(params, opt, 3, start=2)
    run(ref_params, ref, 3, start=2)
    assert torch.equal(old, old_value) and opt.state[old]["step"] == 2  # its state stays, as in torch.optim
    assert same_params(params, ref_params)
    assert opt.state[new]["step"] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_param_follows_a_swapped_parameter(backend):
    params, opt = make(backend)
    run(params, opt, 1)
    new = nn.Parameter(params[1].detach().clone())
    opt.param_groups[1]["params"][1] = new
    new.grad = torch.ones_like(new)
    opt.step_param(new)
    assert opt.state[new]["step"] == 1
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt.step_param(params[1])


@pytest.mark.parametrize("key,value", [("betas", (torch.tensor(0.9), 0.999)), ("betas", (0.9, torch.tensor(0.99))),
                                       ("eps", torch.tensor(1e-6)), ("weight_decay", torch.tensor(0.1))])
def test_tensor_hyperparameters_other_than_lr_are_refused_clearly(key, value):
    """torch.optim.AdamW takes tensor betas; here only lr may be a tensor, and the error says so (it said
    "tensor(0.9000) must be in [0, 1)"), at construction and when a group is edited later."""
    with pytest.raises(ValueError, match="must be a Python number; only lr may be a tensor"):
        GaLoreAdamW([nn.Parameter(torch.randn(3))], **{key: value})
    params, opt = make("torch")
    run(params, opt, 1)
    before = [p.detach().clone() for p in params]
    opt.param_groups[1][key] = value
    set_grads(params, 1)
    with pytest.raises(ValueError, match="only lr may be a tensor.*param group 1; nothing was updated"):
        opt.step()
    assert same_params(params, before)


# ---- state_dict / load_state_dict ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_training_through_weights_only_load_continues_bit_for_bit(backend):
    """Stop after 3 steps (one weight skipped a step), save with torch.save, load with weights_only=True
    into a fresh optimizer built with OTHER group hyperparameters: the checkpoint's win (torch.optim's rule)
    and the run continues exactly as the uninterrupted one, across the refresh at step 4."""
    skip = {1: (1, 4), 3: (2,), 4: (0,)}
    params, opt = make(backend)
    run(params, opt, 3, skip=skip)
    checkpoint = saved({"params": [p.detach().clone() for p in params], "optim": opt.state_dict()})
    resumed, opt2 = make(backend, projected=dict(lr=5.0, scale=1.0), plain=dict(betas=(0.5, 0.6)), seed=3,
                         lr=1.0, weight_decay=0.0)
    with torch.no_grad():
        for p, q in zip(resumed, checkpoint["params"]):
            p.copy_(q)
    opt2.load_state_dict(checkpoint["optim"])
    assert opt2.param_groups[1]["lr"] == 1e-2 and opt2.param_groups[1]["scale"] == 0.25
    assert opt2.param_groups[0]["betas"] == (0.9, 0.999) and opt2.param_groups[0]["weight_decay"] == 0.05
    same_state(opt.state_dict(), opt2.state_dict())
    run(params, opt, 4, start=3, skip=skip)
    run(resumed, opt2, 4, start=3, skip=skip)
    assert same_params(params, resumed)
    same_state(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_loading_an_earlier_checkpoint_into_the_same_optimizer_rewinds_it(backend):
    """Load the step-3 checkpoint back into the optimizer that has since taken 3 more steps (the grouped
    path's cached tables and device step counts point at the replaced state): it continues exactly as a
    run that stopped at step 3. A parameter that had no state at step 3 loses the state it gained since."""
    skip = {s: (4,) for s in range(3)}
    params, opt = make(backend)
    run(params, opt, 3, skip=skip)
    checkpoint = saved({"params": [p.detach().clone() for p in params], "optim": opt.state_dict()})
    run(params, opt, 3, start=3)
    with torch.no_grad():
        for p, q in zip(params, checkpoint["params"]):
            p.copy_(q)
    opt.load_state_dict(checkpoint["optim"])
    assert params[4] not in opt.state
    ref_params, ref = make(backend)
    run(ref_params, ref, 3, skip=skip)
    run(params, opt, 3, start=3)
    run(ref_params, ref, 3, start=3)
    assert same_params(params, ref_params)
    same_state(opt.state_dict(), ref.state_dict())


def test_a_checkpoint_moves_between_backends():
    """The triton and torch backends keep the same state layout: a checkpoint of one resumes on the other.
    Across backends the sums run in another order (tiled kernels against BLAS), so agreement is to fp32
    roundoff accumulated over 5 steps (relative 1e-5 of the update), not bitwise."""
    pytest.importorskip("triton")
    tri_params, tri = make("triton")
    run(tri_params, tri, 3)
    checkpoint = saved(tri.state_dict())
    params, opt = make("torch")
    with torch.no_grad():
        for p, q in zip(params, tri_params):
            p.copy_(q)
    opt.load_state_dict(checkpoint)
    same_state(opt.state_dict(), checkpoint)
    start = [p.detach().clone() for p in params]
    run(tri_params, tri, 2, start=3)
    run(params, opt, 2, start=3)  # step 4 refreshes: the SVD of nearly equal gradients, bases nearly equal
    for p, q, s in zip(params, tri_params, start):
        torch.testing.assert_close(p - s, q - s, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_steps_the_optimizer_like_unscaled_gradients(backend):
    """torch.amp.GradScaler unscales in place through param_groups, then calls step(); an inf skips it."""
    params, opt = make(backend)
    ref_params, ref = make(backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1000)
    for s in range(3):
        scaler.scale(torch.ones(()))  # the scale exists once a loss was scaled
        set_grads(params, s)
        set_grads(ref_params, s)
        for p in params:
            p.grad.mul_(scaler.get_scale())  # exact: a power of two
        if s == 1:
            params[0].grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        if s != 1:
            ref.step()
    assert scaler.get_scale() == 4.0  # halved once, at the skipped step
    assert same_params(params, ref_params)
    assert opt.state[params[0]]["step"] == 2


def test_state_dict_is_plain_python_and_tensors():
    params, opt = make("torch")
    run(params, opt, 3, skip={0: (4,)})

    def plain(value):
        if isinstance(value, dict):
            return all(type(k) in (int, str) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or type(value) in (int, float, str, bool) or type(value) is torch.Tensor

    sd = opt.state_dict()
    assert plain(sd)
    same_state(sd, saved(sd))


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_saved_in_another_dtype_loads_in_the_parameters_dtype(backend):
    """A checkpoint whose floating tensors were cast (to float64 here, as a converter might) loads back in
    the parameters' dtype (torch.optim's rule), and the step runs (triton refuses float64 tensors)."""
    params, opt = make(backend)
    run(params, opt, 3)
    sd = opt.state_dict()
    wide = {"param_groups": sd["param_groups"],
            "state": {i: {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                          for k, v in entry.items()} for i, entry in sd["state"].items()}}
    twin_params, twin = make(backend)
    with torch.no_grad():
        for p, q in zip(twin_params, params):
            p.copy_(q)
    twin.load_state_dict(wide)
    for p in twin_params:
        for key, value in twin.state[p].items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert value.dtype == torch.float32, key
    run(params, opt, 2, start=3)
    run(twin_params, twin, 2, start=3)
    # the float64 round trip is exact for float32 values
    assert same_params(params, twin_params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_checkpoint_mutates_nothing_and_runs_no_post_hook(backend):
    params, opt = make(backend)
    run(params, opt, 2)
    good = copy.deepcopy(opt.state_dict())
    calls = []
    opt.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    bad = copy.deepcopy(good)
    # state_dict numbers parameters group by group: 0, 1 the plain ones, 2, 3, 4 the weights
    bad["state"][3]["exp_avg"] = bad["state"][3]["exp_avg"][:, :2]  # wrong shape for the 9x13 weight
    bad["param_groups"][1]["lr"] = 9.0
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict(bad)
    assert calls == []
    same_state(opt.state_dict(), good)
    run(params, opt, 1, start=2)


# ---- hooks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_hook_fires_once_per_call_on_the_whole_model_path(backend):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    params, opt = make(backend)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    handle = register_optimizer_step_post_hook(lambda o, a, k: calls.append("global-post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post-first"), prepend=True)
    try:
        run(params, opt, 3)
        assert calls == ["pre", "post", "global-post"] * 3
        calls.clear()
        opt.load_state_dict(opt.state_dict())
        assert calls == ["sd-pre", "sd-post", "load-pre", "load-post-first", "load-post"]
    finally:
        handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_layerwise_updates_fire_the_step_hooks_once_per_optimizer_step(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 13), nn.Tanh(), nn.Linear(13, 5))
    weights = [model[0].weight, model[2].weight]
    opt = GaLoreAdamW([{"params": [model[0].bias, model[2].bias]}, {"params": weights, **GROUP}],
                      lr=1e-2, backend=backend)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    g = torch.Generator().manual_seed(0)
    with LayerwiseUpdates(opt, accumulation_steps=2) as lw:
        for micro in range(4):
            before = len(calls)
            stepped = lw.backward(model(torch.randn(3, 9, generator=g)).square().mean())
            assert stepped == (micro % 2 == 1) and calls[before:] == (["pre", "post"] if stepped else [])
    assert calls == ["pre", "post"] * 2
    assert opt.state[weights[0]]["step"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_layerwise_updates_under_a_scheduler_equal_the_whole_model_step(backend):
    """Layer-wise steps (one step composition per parameter on the device-scalar path) follow an lr and
    beta1 schedule exactly as the whole-model step does."""
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(9, 13), nn.Tanh(), nn.Linear(13, 5))
        opt = GaLoreAdamW([{"params": [model[0].bias, model[2].bias]},
                           {"params": [model[0].weight, model[2].weight], **GROUP}], lr=1e-2, backend=backend)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-2, total_steps=5, base_momentum=0.7,
                                                    max_momentum=0.95)
        return model, opt, sched

    whole, layerwise = build(), build()
    g = torch.Generator().manual_seed(4)
    with LayerwiseUpdates(layerwise[1]) as lw:
        for _ in range(4):
            x = torch.randn(3, 9, generator=g)
            whole[1].zero_grad()
            whole[0](x).square().mean().backward()
            whole[1].step()
            assert lw.backward(layerwise[0](x).square().mean())
            whole[2].step()
            layerwise[2].step()
    assert same_params(whole[0].parameters(), layerwise[0].parameters())


# ---- closure and zero_grad ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_is_called_once_with_grad_enabled_and_its_loss_returned(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 13), nn.Tanh(), nn.Linear(13, 5))
    opt = GaLoreAdamW([{"params": [model[0].bias, model[2].bias]},
                       {"params": [model[0].weight, model[2].weight], **GROUP}], lr=1e-2, backend=backend)
    x = torch.randn(4, 9)
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    with torch.no_grad():  # a step taken inside no_grad still evaluates the closure with grad
        loss = opt.step(closure)
    assert seen == [True] and isinstance(loss, torch.Tensor) and loss.requires_grad
    assert opt.step() is None  # no closure: None, as torch.optim
    assert opt.state[model[0].weight]["step"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_grad_set_to_none_false_keeps_zero_tensors_that_still_step(backend):
    params, opt = make(backend)
    twin_params, twin = make(backend)
    run(params, opt, 2)
    run(twin_params, twin, 2)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    opt.step()  # weight decay and moments still move the weights
    for p in twin_params:
        p.grad = torch.zeros_like(p)
    twin.step()
    assert same_params(params, twin_params)
    assert opt.state[params[0]]["step"] == 3
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_with_no_gradients_is_a_no_op(backend):
    """common_optimizers' test_step_is_noop_when_params_have_no_grad: no change, no state created."""
    params, opt = make(backend)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert same_params(params, before) and len(opt.state) == 0
    frozen = nn.Parameter(torch.randn(13, 9), requires_grad=False)
    opt.add_param_group({"params": [frozen], "rank": 3})
    run(params, opt, 2)
    assert frozen not in opt.state
    sd = opt.state_dict()
    assert len(sd["state"]) == len(params)
    twin_params, twin = make(backend)
    twin.add_param_group({"params": [nn.Parameter(torch.randn(13, 9), requires_grad=False)], "rank": 3})
    twin.load_state_dict(sd)  # a checkpoint without state for a parameter loads


# ---- LR schedulers and tensor lr --------------------------------------------------------------------------
SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, [lambda e: 1.0 / (e + 1), lambda e: 0.5 ** e]),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[3e-2, 5e-2], total_steps=7,
                                                                base_momentum=0.7, max_momentum=0.95),
    "plateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.2, patience=0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers_change_the_applied_step(backend, name):
    """The scheduled run equals a run whose lr (and OneCycleLR's beta1) are set by hand to the same values
    each step, and differs from the constant-lr run: the device-side step scalars of the grouped path see
    every change."""
    params, opt = make(backend)
    manual_params, manual = make(backend)
    const_params, const = make(backend)
    sched = SCHEDULERS[name](opt)
    seen = set()
    for s in range(6):
        for group, twin in zip(opt.param_groups, manual.param_groups):
            twin["lr"], twin["betas"] = group["lr"], group["betas"]
            seen.add((group["lr"], group["betas"]))
        for ps, o in ((params, opt), (manual_params, manual), (const_params, const)):
            run(ps, o, 1, start=s, skip={2: (3,)})
        if name == "plateau":
            sched.step(1.0)  # never improves: the lr drops at every step after the first
        else:
            sched.step()
    assert len(seen) >= 3
    assert same_params(params, manual_params)
    assert not torch.equal(params[0], const_params[0]) and not torch.equal(params[3], const_params[3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_follows_in_place_changes_and_equals_a_float_lr(backend):
    lr = torch.tensor(1e-2)
    params, opt = make(backend, lr=lr)
    float_params, float_opt = make(backend, lr=float(lr))
    run(params, opt, 2)
    run(float_params, float_opt, 2)
    lr.fill_(4e-3)  # both groups hold this tensor (the default)
    for group in float_opt.param_groups:
        group["lr"] = float(torch.tensor(4e-3))
    run(params, opt, 3, start=2)
    run(float_params, float_opt, 3, start=2)
    assert opt.param_groups[1]["lr"] is lr
    assert same_params(params, float_params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_on_one_group_leaves_the_other_alone(backend):
    params, opt = make(backend)
    ref_params, ref = make(backend)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda e: 1.0, lambda e: 0.1 ** e])
    for s in range(4):
        run(params, opt, 1, start=s)
        run(ref_params, ref, 1, start=s)
        sched.step()
    assert same_params(params[3:], ref_params[3:])  # the plain group's lr never changed
    assert not any(torch.equal(a, b) for a, b in zip(params[:3], ref_params[:3]))


# ---- copies -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_mid_training_continues_identically(backend, how):
    """A deepcopy or a pickle round trip of (parameters, optimizer) taken mid-training, with a scheduler's
    lr and a skipped gradient, steps exactly as the original from there on."""
    params, opt = make(backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for s in range(3):
        run(params, opt, 1, start=s, skip={1: (0,)})
        sched.step()
    bundle = (params, opt)
    copied, twin = copy.deepcopy(bundle) if how == "deepcopy" else pickle.loads(pickle.dumps(bundle))
    assert twin.backend == backend and all(a is not b for a, b in zip(params, copied))
    assert [g["params"] for g in twin.param_groups] == [copied[3:], copied[:3]]
    assert twin.param_groups[1]["lr"] == opt.param_groups[1]["lr"]
    run(params, opt, 3, start=3, skip={4: (2,)})
    run(copied, twin, 3, start=3, skip={4: (2,)})
    assert same_params(params, copied)
    same_state(opt.state_dict(), twin.state_dict())


# ---- gradients that come and go -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_without_gradient_some_steps_or_ever(backend):
    """A parameter whose gradient is None is not touched and its step count stands still; one that never
    gets a gradient has no state and no checkpoint entry; a run with skips equals the same parameter
    stepped only on its own steps."""
    params, opt = make(backend)
    never = 4  # the 0-D parameter never gets a gradient
    skip = {s: (never,) + ((0,) if s in (1, 2) else ()) for s in range(6)}
    run(params, opt, 6, skip=skip)
    assert params[4] not in opt.state and 1 not in opt.state_dict()["state"]  # 1: its state_dict number
    assert opt.state[params[0]]["step"] == 4 and opt.state[params[1]]["step"] == 6
    # The 13x9 weight alone, stepped at exactly the steps it had a gradient, in a one-weight optimizer.
    alone_params, alone = make(backend)
    g = alone_params[0]
    solo = GaLoreAdamW([{"params": [g], **GROUP}], lr=1e-2, weight_decay=0.05, backend=backend)
    for s in range(6):
        if s in (1, 2):
            continue
        set_grads(alone_params, s)
        solo.step()
    assert torch.equal(g, params[0])


# ---- torch.compile ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_train_step_equals_eager_and_compiles_once(backend):
    from torch._dynamo.testing import CompileCounter

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(9, 13), nn.Tanh(), nn.Linear(13, 5))
        opt = GaLoreAdamW([{"params": [model[0].bias, model[2].bias]},
                           {"params": [model[0].weight, model[2].weight], **GROUP}], lr=1e-2, backend=backend)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return model, opt, sched

    def train_step(model, opt, x):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = build()
    eager = build()
    step_c = torch.compile(train_step, backend=counter)
    g = torch.Generator().manual_seed(2)
    for step in range(6):  # refreshes at 0, 2, 4; the lr halves every 2 steps
        x = torch.randn(4, 9, generator=g)
        step_c(compiled[0], compiled[1], x)
        train_step(eager[0], eager[1], x)
        compiled[2].step()
        eager[2].step()
        if step == 1:
            frames = counter.frame_count
    assert counter.frame_count == frames
    assert same_params(compiled[0].parameters(), eager[0].parameters())
    torch._dynamo.reset()


# ---- printing ---------------------------------------------------------------------------------------------
def test_repr_lists_every_group_with_its_keys():
    params, opt = make("triton")
    text = repr(opt)
    assert text.count("Parameter Group") == 2 and "rank: 3" in text and "update_proj_gap: 2" in text
