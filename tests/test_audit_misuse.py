"""Adversarial audit of README's misuse promises ("refuses bad input without touching your weights", the
Errors section, checkpoints): every refused call leaves weights, gradients, the whole optimizer state
(every tensor bit for bit, every Python value) and the step counts as they were, and the next valid step
equals that of a twin optimizer that never saw the bad call. Tiny odd shapes (11x7, 13x11, 5x13, rank
2) on backend "torch" and "triton" (the interpreter on CPU), whole-model and layer-wise steps, int8
moments and the non-galore update rules."""
import copy
import io
import os
import re

import pytest
import torch
from torch import nn

from lowrank_kernels import GaLoreAdamW, quant

def _triton():
    """backend "triton" on these CPU tensors runs under the interpreter (conftest sets it without CUDA)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors run the kernels only under TRITON_INTERPRET=1")


def make(backend="torch", plain=None, **projected):
    """Weights 11x7 (tall), 13x11 (tall), 5x13 (wide) in a projected group (named), biases in a plain one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 11), nn.Tanh(), nn.Linear(11, 13), nn.Tanh(), nn.Linear(13, 5))
    weights = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    biases = [(n, p) for n, p in model.named_parameters() if p.dim() == 1]
    group = {"params": weights, "rank": 2, "update_proj_gap": 2, **projected}
    plain = {"state_dtype": projected.get("state_dtype"), **(plain or {})}
    opt = GaLoreAdamW([{"params": biases, **plain}, group], lr=1e-2, weight_decay=0.01, backend=backend, seed=3)
    return model, opt


def set_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def step(model, opt, layerwise):
    if layerwise:
        for p in model.parameters():
            opt.step_param(p)
    else:
        opt.step()


def deep(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: deep(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(deep(v) for v in x)
    return copy.deepcopy(x)


def assert_same(a, b, path="value"):
    """Bit for bit: tensors by dtype, shape, stride and bits (NaN included); Python values by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert (a.dtype, a.shape, a.stride(), a.device) == (b.dtype, b.shape, b.stride(), b.device), path
        if a.is_floating_point():
            a, b = (t.contiguous().view(-1).view(torch.uint8) for t in (a, b))  # bits: NaN == NaN, -0 != 0
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {a.keys()} != {b.keys()}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and (a == b or (a != a and b != b)), f"{path}: {a!r} != {b!r}"


def capture(model, opt):
    params = list(model.parameters())
    return {"weights": [deep(p) for p in params], "grads": [deep(p.grad) for p in params],
            "state": [deep(dict(opt.state[p])) if p in opt.state else None for p in params],
            "groups": [{k: deep(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]}


def assert_refused(model, opt, layerwise, match, error=(RuntimeError, ValueError, TypeError)):
    """The step (or, layer-wise, the first call that raises) raises ``match`` and changes nothing; returns
    the parameters layer-wise still has to step."""
    params = list(model.parameters())
    for k, p in enumerate(params if layerwise else [None]):
        before = capture(model, opt)
        try:
            opt.step() if p is None else opt.step_param(p)
        except error as exc:
            assert re.search(match, str(exc)), str(exc)
            assert_same(capture(model, opt), before, "after the refused call")
            return params[k:] if layerwise else None
    raise AssertionError(f"nothing raised (expected {match!r})")


# ---- bad inputs: (what to break, how to restore it, the expected message) ------------------------------
def _nan_at_refresh(model, opt):  # step 2 is a refresh (gap 2); one weight of three is bad
    model[2].weight.grad[4, 3] = float("nan")


def _inf_in_bias(model, opt):  # not a refresh for a plain group: needs check_finite
    opt.param_groups[0]["check_finite"] = True
    model[0].bias.grad[1] = float("inf")


def _resized(model, opt):  # the projected dimension grows: the stored basis no longer fits
    model[2].weight.data = torch.randn(13, 12)
    model[2].weight.grad = torch.randn(13, 12)


def _resized_projected_away(model, opt):  # the moments (13 x 2) still fit; the basis (11 -> 12 rows) does not
    model[2].weight.data = torch.randn(13, 12)
    model[2].weight.grad = torch.randn(13, 12)


def _shrunk_below_rank(model, opt):
    model[4].weight.data = torch.randn(2, 13)
    model[4].weight.grad = torch.randn(2, 13)


def _rank_edited(model, opt):
    opt.param_groups[1]["rank"] = 7  # = min(m, n) of the 11x7 weight


def _random_energy(model, opt):
    opt.param_groups[1].update(projector="random", rank_policy="energy")


def _int_gradient(model, opt):
    p = model[2].weight
    p.grad_dtype = None
    p.grad = torch.ones(p.shape, dtype=torch.int32)


BAD = {
    "nan-at-refresh": (_nan_at_refresh, r"non-finite gradient in parameter '2\.weight' \(shape \(13, 11\)\) at a basis refresh"),
    "inf-check-finite": (_inf_in_bias, r"non-finite gradient in parameter '0\.bias' \(shape \(11,\)\) \(check_finite=True\)"),
    "resized": (_resized, r"parameter '2\.weight' \(shape \(13, 12\)\).*resized"),
    "shrunk-below-rank": (_shrunk_below_rank, r"rank=2 is too large for parameter '4\.weight' \(shape \(2, 13\)\)"),
    "rank-edited": (_rank_edited, r"rank=7 is too large for parameter '0\.weight' \(shape \(11, 7\)\)"),
    "random-energy-edited": (_random_energy, r"rank_policy='energy' needs singular values.*param group 1"),
    "int-gradient": (_int_gradient, r"parameter '2\.weight' .*floating-point parameters only"),
}
OPTIONS = {"galore": {}, "int8": {"state_dtype": "int8"}, "fira": {"update": "fira"},
           "frugal": {"update": "frugal", "moments_on_refresh": "zero"}, "apollo": {"update": "apollo"},
           "random": {"projector": "random"}, "dct": {"projector": "dct"}}


def _refused_then_like_a_twin(backend, options, bad, layerwise):
    break_it, match = BAD[bad]
    (model, opt), (twin, twin_opt) = make(backend, **options), make(backend, **options)
    for m, o in ((model, opt), (twin, twin_opt)):
        for seed in (1, 2):
            set_grads(m, seed)
            step(m, o, layerwise)
    set_grads(model, 3)
    saved = [(p.data, p.grad.clone()) for p in model.parameters()]
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    break_it(model, opt)
    rest = assert_refused(model, opt, layerwise, match)
    # catch it, restore the batch, carry on: the next steps equal the twin's, bit for bit
    for p, (data, grad) in zip(model.parameters(), saved):
        p.grad = None
        p.grad_dtype = p.dtype
        p.data = data
        p.grad = grad
    for group, values in zip(opt.param_groups, groups):
        group.update(values)
    if layerwise:
        for p in rest:
            opt.step_param(p)
    else:
        opt.step()
    set_grads(twin, 3)
    step(twin, twin_opt, layerwise)
    for m, o in ((model, opt), (twin, twin_opt)):
        for seed in (4, 5):
            set_grads(m, seed)
            step(m, o, layerwise)
    assert_same(capture(model, opt)["weights"], capture(twin, twin_opt)["weights"], "weights")
    assert_same(capture(model, opt)["state"], capture(twin, twin_opt)["state"], "state")


@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "step_param"])
@pytest.mark.parametrize("bad,options", [(b, o) for b in BAD for o in OPTIONS
                                         # on "random" that edit is the group's own setting: not a misuse
                                         if not (b == "random-energy-edited" and o == "random")])
def test_refused_call_changes_nothing_and_the_run_continues_like_a_twin(bad, options, layerwise):
    _refused_then_like_a_twin("torch", OPTIONS[options], bad, layerwise)


@pytest.mark.parametrize("bad,options,layerwise", [
    ("nan-at-refresh", "int8", False), ("inf-check-finite", "fira", True), ("resized", "dct", False),
    ("int-gradient", "galore", False),
])
def test_refused_call_on_the_kernels(bad, options, layerwise):
    """The grouped triton step (interpreter on CPU): the same guarantees."""
    _triton()
    _refused_then_like_a_twin("triton", OPTIONS[options], bad, layerwise)


# ---- state_dtype edited into and out of int8 ---------------------------------------------------------------
@pytest.mark.parametrize("backend,before,after", [
    ("torch", "int8", "float32"), ("torch", "int8", None), ("torch", "float32", "int8"), ("torch", None, "int8"),
    ("triton", "int8", None), ("triton", "float32", "int8")])
def test_state_dtype_edited_into_or_out_of_int8_keeps_the_moments_values(backend, before, after):
    """README: 'A state_dtype edited later moves the existing moments to the new dtype'. The bug: int8 codes
    were cast as values (moments of ~100) and fp32 moments truncated to codes (then a crash mid-step). The
    oracle: a twin made with the new state_dtype whose moments are the old ones converted by quant's
    (bitsandbytes-tested) quantize / dequantize."""
    if backend == "triton":
        _triton()
    model, opt = make(backend, state_dtype=before)
    twin, twin_opt = make(backend, state_dtype=after)
    for m, o in ((model, opt), (twin, twin_opt)):
        set_grads(m, 1)
        o.step()
    twin.load_state_dict(model.state_dict())
    for p, q in zip(model.parameters(), twin.parameters()):
        state, twin_state = opt.state[p], twin_opt.state[q]
        twin_state.clear()
        twin_state.update(deep(dict(state)))
        if before == "int8":
            for key, signed in quant.SIGNED.items():
                twin_state[key] = quant.dequantize(twin_state[key], twin_state.pop(f"{key}_absmax"), signed)
        else:
            for key, signed in quant.SIGNED.items():
                twin_state[key], twin_state[f"{key}_absmax"] = quant.quantize(twin_state[key], signed)
    for group in opt.param_groups:
        group["state_dtype"] = after
    for m, o in ((model, opt), (twin, twin_opt)):
        for seed in (2, 3, 4):
            set_grads(m, seed)
            o.step()
    assert_same(capture(model, opt)["weights"], capture(twin, twin_opt)["weights"], "weights")
    assert_same(capture(model, opt)["state"], capture(twin, twin_opt)["state"], "state")


# ---- a gradient whose dtype changed mid-run ------------------------------------------------------------------
@pytest.mark.parametrize("backend,options", [("torch", "galore"), ("torch", "int8"), ("torch", "fira"),
                                             ("triton", "galore"), ("triton", "int8")])
def test_gradient_dtype_changed_mid_run_moves_the_basis_instead_of_failing_half_way(backend, options):
    """A gradient in another dtype than the basis was made from (grad_dtype=None, fp16 gradients of an fp32
    weight) used to fail inside the step after other weights were updated (reference: mm of mixed dtypes;
    kernels: 'basis dtype differs', or tables built for the other dtype). Now the basis follows the
    gradient's dtype (as the moments with state_dtype=None do) and every other weight steps exactly as
    in a run where nothing changed."""
    if backend == "triton":
        _triton()
    (model, opt), (twin, twin_opt) = make(backend, **OPTIONS[options]), make(backend, **OPTIONS[options])
    for m, o in ((model, opt), (twin, twin_opt)):
        set_grads(m, 1)
        o.step()
        set_grads(m, 2)  # step 2 is a refresh (gap 2): the next one, 3, is not
        o.step()
        set_grads(m, 3)
    odd = model[2].weight
    odd.grad_dtype = None
    odd.grad = odd.grad.half()
    opt.step()
    twin_opt.step()
    state = opt.state[odd]
    assert state["proj_right"].dtype == torch.float16
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p is not odd:
            assert_same(p.detach(), q.detach(), name)
            assert_same(deep(dict(opt.state[p])), deep(dict(twin_opt.state[q])), name)
    # the step of the odd weight in fp16 arithmetic: close to the fp32 twin's
    torch.testing.assert_close(odd, twin[2].weight, rtol=0, atol=2e-3)


# ---- rank bounds and option values -------------------------------------------------------------------------------
def test_min_rank_above_rank_is_refused_at_construction_at_step_and_on_load():
    """It used to be silently clamped to rank: the bounds [min_rank, max_rank (= rank)] contradict."""
    with pytest.raises(ValueError, match=r"Invalid min_rank: 5 \(must be <= max_rank, which defaults to rank=2\)"):
        make(rank_policy="energy", min_rank=5)
    model, opt = make(rank_policy="energy")
    set_grads(model, 1)
    opt.step()
    sd = opt.state_dict()
    opt.param_groups[1]["min_rank"] = 3
    set_grads(model, 2)
    before = capture(model, opt)
    with pytest.raises(ValueError, match="Invalid min_rank: 3.*param group 1; nothing was updated"):
        opt.step()
    assert_same(capture(model, opt), before)
    sd["param_groups"][1]["min_rank"] = 3
    fresh, fresh_opt = make(rank_policy="energy")
    with pytest.raises(ValueError, match="checkpoint param group 1: Invalid min_rank"):
        fresh_opt.load_state_dict(sd)
    assert not fresh_opt.state


def test_refused_group_edit_gets_no_defaults_filled_in():
    """The group is validated with its policies' defaults filled in on a copy: a refused edit leaves the
    group's keys as the user left them (before, energy_threshold/min_rank/max_rank appeared)."""
    model, opt = make()
    set_grads(model, 1)
    opt.step()
    opt.param_groups[1].update(projector="random", rank_policy="energy")
    keys = set(opt.param_groups[1])
    with pytest.raises(ValueError, match="needs singular values"):
        opt.step()
    assert set(opt.param_groups[1]) == keys


@pytest.mark.parametrize("value", [["int8"], {"float32": 1}, torch.float32, "fp8"])
def test_state_dtype_of_any_type_gets_a_clear_value_error(value):
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        make(state_dtype=value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_parameters_are_refused_before_anything_changes(dtype):
    with pytest.raises(ValueError, match="floating-point parameters only"):
        GaLoreAdamW([{"params": [torch.zeros(6, 5, dtype=dtype)], "rank": 2}])
    good = nn.Parameter(torch.randn(6, 5))
    bad = torch.zeros(4, dtype=dtype)
    opt = GaLoreAdamW([{"params": [good], "rank": 2}, {"params": [bad]}])
    good.grad, bad.grad = torch.randn(6, 5), torch.ones(4, dtype=dtype)
    before = good.detach().clone()
    with pytest.raises(TypeError, match=rf"parameter #1 \(shape \(4,\)\) has dtype {dtype}.*nothing was updated"):
        opt.step()
    assert torch.equal(good, before) and not opt.state


# ---- checkpoints ---------------------------------------------------------------------------------------------
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


W = 4  # checkpoint index of '2.weight' (13x11, right-projected: Q is 11 x 2): biases are 0-2


def _entry(key, value):
    return lambda sd: sd["state"][W].__setitem__(key, value)


def _drop(key, index=W):
    return lambda sd: sd["state"][index].pop(key)


LOAD_CASES = {
    # int8 moments: uint8 codes need their fp32 absmax per 256 entries, and only int8 codes have one
    "int8-no-absmax": ({"state_dtype": "int8"}, _drop("exp_avg_absmax"), "'exp_avg_absmax' must be a float32 tensor"),
    "int8-plain-no-absmax": ({"state_dtype": "int8"}, _drop("exp_avg_sq_absmax", 0), r"parameter '0\.bias'.*'exp_avg_sq_absmax'"),
    "int8-absmax-shape": ({"state_dtype": "int8"}, _entry("exp_avg_absmax", torch.ones(3)), r"shape \(1,\)"),
    "int8-absmax-dtype": ({"state_dtype": "int8"}, _entry("exp_avg_absmax", torch.ones(1, dtype=torch.float64)), "float32"),
    "absmax-on-float-moments": ({}, _entry("exp_avg_absmax", torch.ones(1)), "not int8 codes"),
    # random: an integer seed; dct: r distinct int64 column numbers below the projected dimension
    "random-seed-float": ({"projector": "random"}, _entry("proj_right_seed", 1.5), "'proj_right_seed' must be an integer"),
    "random-seed-tensor": ({"projector": "random"}, _entry("proj_right_seed", torch.tensor(3)), "integer seed"),
    "random-seed-overflow": ({"projector": "random"}, _entry("proj_right_seed", 2 ** 70), "integer seed"),
    "random-seed-and-basis": ({"projector": "random"}, _entry("proj_right", torch.zeros(11, 2)), "one basis per side"),
    "dct-index-float": ({"projector": "dct"}, _entry("proj_right_index", torch.tensor([0.0, 1.0])), "int64 tensor of shape"),
    "dct-index-length": ({"projector": "dct"}, _entry("proj_right_index", torch.tensor([0, 1, 2])), r"shape \(2,\)"),
    "dct-index-range": ({"projector": "dct"}, _entry("proj_right_index", torch.tensor([0, 11])), r"in \[0, 11\)"),
    "dct-index-negative": ({"projector": "dct"}, _entry("proj_right_index", torch.tensor([-1, 3])), "distinct column"),
    "dct-index-duplicate": ({"projector": "dct"}, _entry("proj_right_index", torch.tensor([3, 3])), "distinct column"),
    "dct-index-list": ({"projector": "dct"}, _entry("proj_right_index", [0, 1]), "int64 tensor"),
    # counters and the limiter
    "moment-start-past-step": ({}, _entry("moment_start", 9), "'moment_start' = 9 is past its 'step' = 2"),
    "last-refresh-past-step": ({}, _entry("last_refresh", 9), "'last_refresh' = 9 is past"),
    "limiter-norm-str": ({"update": "fira"}, _entry("limiter_norm", "x"), "'limiter_norm' must be a 0-d"),
    "limiter-norm-shape": ({"update": "fira"}, _entry("limiter_norm", torch.ones(3)), "0-d floating-point"),
}


@pytest.mark.parametrize("case", LOAD_CASES)
def test_load_state_dict_refuses_an_ill_formed_entry_and_loads_nothing(case):
    """Each of these loaded before and failed (or silently mis-stepped) at the next step."""
    options, corrupt, match = LOAD_CASES[case]
    model, opt = make(**options)
    for seed in (1, 2):
        set_grads(model, seed)
        opt.step()
    sd = _roundtrip(opt.state_dict())
    corrupt(sd)
    other, other_opt = make(**options)
    set_grads(other, 7)
    other_opt.step()
    before = capture(other, other_opt)
    with pytest.raises(ValueError, match=r"parameter '\d\.(weight|bias)' \(shape ") as info:
        other_opt.load_state_dict(sd)
    assert re.search(match, str(info.value)), str(info.value)
    assert_same(capture(other, other_opt), before)


def test_float_moments_in_an_int8_checkpoint_group_load_and_are_quantised_at_the_next_step():
    """A state_dict saved between an edit to state_dtype='int8' and the next step holds float moments in
    an int8 group: they load as floats (not cast to codes) and the next step quantises them, exactly as the
    optimizer that was saved would have."""
    model, opt = make()
    set_grads(model, 1)
    opt.step()
    for group in opt.param_groups:
        group["state_dtype"] = "int8"
    sd = _roundtrip(opt.state_dict())
    resumed, resumed_opt = make()
    resumed.load_state_dict(model.state_dict())
    resumed_opt.load_state_dict(sd)
    for m, o in ((model, opt), (resumed, resumed_opt)):
        for seed in (2, 3):
            set_grads(m, seed)
            o.step()
    assert opt.state[model[2].weight]["exp_avg"].dtype == torch.uint8
    assert_same(capture(resumed, resumed_opt)["weights"], capture(model, opt)["weights"])
    assert_same(capture(resumed, resumed_opt)["state"], capture(model, opt)["state"])


@pytest.mark.parametrize("projector", ["random", "dct"])
def test_regenerated_basis_refuses_a_resized_weight_then_restarts_after_del_state(projector):
    """A seed or column numbers keep no matrix, and the m x r moments of a right projection still fit a
    weight resized along n: README's 'a parameter resized after its state was created raises' held only
    for stored bases. Now the step engine's record of the shape it built the basis for is checked."""
    model, opt = make(projector=projector)
    set_grads(model, 1)
    opt.step()
    _resized_projected_away(model, opt)
    before = capture(model, opt)
    with pytest.raises(RuntimeError, match=r"'2\.weight' \(shape \(13, 12\)\).*made for a 13x11 matrix.*resized"):
        opt.step()
    assert_same(capture(model, opt), before)
    del opt.state[model[2].weight]  # the documented way out
    opt.step()
    assert opt.state[model[2].weight]["step"] == 1
