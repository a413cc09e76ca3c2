"""Checkpoints: plain tensors and values only, safe loading, exact resume across a basis refresh."""

import pytest
import torch

from lowrank_kernels import GaLoreAdamW

from helpers import ToyNet, assert_same_state, batches, galore_groups, roundtrip, train

PROJECTED = dict(rank=5, update_proj_gap=4, scale=0.25, proj_type="std")


def _make(projector, dtype=torch.float32, **extra):
    model = ToyNet(dtype=dtype)
    opt = GaLoreAdamW(galore_groups(model, projector=projector, **PROJECTED, **extra), lr=2e-3,
                      weight_decay=0.01, seed=123)
    return model, opt


def _plain(value):
    if isinstance(value, dict):
        return all(_plain(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, int, float, str, bool))


@pytest.mark.parametrize("projector", ["svd", "rsvd"])
def test_state_dict_is_plain_and_loads_with_weights_only(projector):
    model, opt = _make(projector)
    train(model, opt, batches(3))
    sd = opt.state_dict()
    assert _plain(sd)
    loaded = roundtrip(sd)
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(loaded["state"][idx][key], value)
                assert loaded["state"][idx][key].stride() == value.stride()
            else:
                assert loaded["state"][idx][key] == value


@pytest.mark.parametrize("projector", ["svd", "rsvd"])
@pytest.mark.parametrize("stop", [3, 4, 6])  # before, at and after the refresh at step 4
def test_resume_is_bit_exact(projector, stop):
    data = batches(11)
    model, opt = _make(projector)
    train(model, opt, data)

    first, opt1 = _make(projector)
    train(first, opt1, data[:stop])
    checkpoint = roundtrip({"model": first.state_dict(), "optim": opt1.state_dict()})

    resumed, opt2 = _make(projector)
    resumed.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["optim"])
    train(resumed, opt2, data[stop:])

    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), resumed.parameters()):
        sa, sb = opt.state[a], opt2.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            same = torch.equal(sa[key], sb[key]) if isinstance(sa[key], torch.Tensor) else sa[key] == sb[key]
            assert same, key


def test_rsvd_replicas_agree_and_seed_matters():
    """Two replicas with the same seed compute the same bases; another seed gives other bases."""
    data = batches(5)
    runs = []
    for seed in (123, 123, 7):
        model = ToyNet()
        opt = GaLoreAdamW(galore_groups(model, projector="rsvd", **PROJECTED), lr=1e-3, seed=seed)
        train(model, opt, data)
        runs.append([opt.state[p].get("proj_left", opt.state[p].get("proj_right")) for p in model.parameters()
                     if p.dim() == 2])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not any(torch.equal(a, c) for a, c in zip(runs[0], runs[2]))


def test_loaded_state_follows_parameter_dtype():
    """As torch.optim does: state cast to the parameter's dtype, except moments at an explicit state_dtype."""
    model, opt = _make("svd")
    train(model, opt, batches(2))
    sd = opt.state_dict()

    half, opt_half = _make("svd", dtype=torch.bfloat16)
    opt_half.load_state_dict(sd)
    for p in half.parameters():
        for value in opt_half.state[p].values():
            if isinstance(value, torch.Tensor):
                assert value.dtype == torch.bfloat16

    model32, opt32 = _make("svd", state_dtype="float32")
    train(model32, opt32, batches(2))
    half32, opt_half32 = _make("svd", dtype=torch.bfloat16, state_dtype="float32")
    opt_half32.load_state_dict(opt32.state_dict())
    for p in half32.parameters():
        state = opt_half32.state[p]
        if p.dim() == 2:
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
            basis = state.get("proj_left", state.get("proj_right"))
            assert basis.dtype == torch.bfloat16


def test_state_dtype_float32_moments_for_bf16_weights():
    model, opt = _make("svd", dtype=torch.bfloat16, state_dtype="float32")
    losses = train(model, opt, batches(6, dtype=torch.bfloat16))
    assert losses[-1] < losses[0]
    for p in model.parameters():
        if p.dim() == 2:
            assert opt.state[p]["exp_avg"].dtype == torch.float32


@pytest.mark.gpu
def test_state_follows_parameter_device():
    model, opt = _make("svd")
    train(model, opt, batches(2))
    cuda_model, cuda_opt = _make("svd")
    cuda_model.cuda()
    cuda_opt.load_state_dict(opt.state_dict())
    for p in cuda_model.parameters():
        for value in cuda_opt.state[p].values():
            if isinstance(value, torch.Tensor):
                assert value.is_cuda


# ---- loading refuses what does not fit, and then loads nothing (7c) -------------------------------------
def _trained_opt(**extra):
    model, opt = _make("svd", **extra)
    train(model, opt, batches(3))
    return model, opt


def _assert_refused(opt, state_dict, match):
    before = roundtrip(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state_dict)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert_same_state(after, before)


def _corrupt(**change):
    """A real checkpoint of the same setup, with the entry of parameter #7 (out.weight, 12x48: left side,
    P 12x5, moments 5x48) changed: a value replaces the key's, None deletes it."""
    _, source = _trained_opt()
    sd = roundtrip(source.state_dict())
    entry = sd["state"][7]
    for key, value in change.items():
        if value is None:
            del entry[key]
        else:
            entry[key] = value
    return sd


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "step", "rank", "proj_left", "refreshes"])
def test_missing_state_key_is_refused(key):
    _, opt = _trained_opt()
    _assert_refused(opt, _corrupt(**{key: None}), rf"parameter #7 \(shape \(12, 48\)\): checkpoint state has no '{key}'")


@pytest.mark.parametrize("key,value,match", [
    ("exp_avg", torch.zeros(5, 47), r"'exp_avg' has shape \(5, 47\), expected \(5, 48\)"),
    ("exp_avg_sq", torch.zeros(48, 5), r"'exp_avg_sq' has shape \(48, 5\), expected \(5, 48\)"),
    ("exp_avg", torch.zeros(5, 48, dtype=torch.int64), "'exp_avg' must be a real floating-point tensor"),
    ("proj_left", torch.zeros(5, 12), r"'proj_left' has shape \(5, 12\), expected \(12, 5\)"),
    ("proj_left", [[0.0] * 5] * 12, "'proj_left' must be a real floating-point tensor"),
    ("proj_right", torch.zeros(48, 5), r"has \['proj_right'\], but proj_type='std' projects the left side"),
    ("step", -1, "'step' must be an integer >= 0"),
    ("step", 2.5, "'step' must be an integer >= 0"),
    ("step", torch.tensor(3.0), "'step' must be an integer >= 0.*torch.optim's format"),
    ("rank", 12, r"'rank' = 12 is outside \[1, min\(m, n\) = 12\)"),
    ("rank", "5", "'rank' must be an integer"),
    ("rank", 4, r"'exp_avg' has shape \(5, 48\), expected \(4, 48\)"),
])
def test_ill_formed_state_value_is_refused(key, value, match):
    _, opt = _trained_opt()
    _assert_refused(opt, _corrupt(**{key: value}), r"parameter #7 \(shape \(12, 48\)\): checkpoint state .*" + match)


def test_checkpoint_of_a_model_with_other_shapes_is_refused():
    def make(width):
        model = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.Linear(width, 12))
        return model, GaLoreAdamW(galore_groups(model, rank=4))
    small, small_opt = make(20)
    train(small, small_opt, batches(2))
    big, big_opt = make(30)
    train(big, big_opt, batches(2))
    _assert_refused(big_opt, small_opt.state_dict(), r"parameter #0 \(shape \(30,\)\): checkpoint state 'exp_avg' "
                    r"has shape \(20,\), expected \(30,\) \(is the checkpoint from a model with other shapes")


def test_torch_adamw_checkpoint_is_refused_with_a_migration_hint():
    model, opt = _trained_opt()
    adamw_model = ToyNet()
    adamw = torch.optim.AdamW(galore_groups(adamw_model, **PROJECTED), lr=1e-3)  # it takes unknown group keys
    train(adamw_model, adamw, batches(2))
    _assert_refused(opt, adamw.state_dict(),
                    r"param group 0 \(parameter #0 .*has no 'correct_bias'.*torch.optim.*load the model's weights only")


def test_group_layout_mismatches_are_refused():
    _, opt = _trained_opt()
    sd = _corrupt()
    sd["param_groups"] = sd["param_groups"][:1]
    _assert_refused(opt, sd, "different number of parameter groups")
    sd = _corrupt()
    sd["param_groups"][1]["params"] = sd["param_groups"][1]["params"][:2]
    _assert_refused(opt, sd, "doesn't match the size of optimizer's group: group 1 has 2")
    sd = _corrupt()
    del sd["param_groups"][1]["rank"]
    _assert_refused(opt, sd, "param group 1 .*projected .* in this optimizer but not in the checkpoint")
    sd = _corrupt()
    sd["param_groups"][1]["scale"] = -1.0
    _assert_refused(opt, sd, "checkpoint param group 1: Invalid scale")
    sd = _corrupt()
    sd["state"][42] = sd["state"].pop(7)
    _assert_refused(opt, sd, "parameter index 42")
    _assert_refused(opt, {"state": {}}, "'state' and 'param_groups'")


def test_older_checkpoint_without_newer_group_keys_loads():
    """Keys added since a checkpoint was written (check_finite) get their defaults."""
    model, opt = _trained_opt()
    sd = _corrupt()
    for group in sd["param_groups"]:
        del group["check_finite"]
    opt.load_state_dict(sd)
    assert all(group["check_finite"] is False for group in opt.param_groups)
    train(model, opt, batches(2))


def test_load_state_dict_hooks_see_the_moments():
    """torch.optim's load_state_dict pre- and post-hooks run, and see moments, state_dtype ones included."""
    source_model, source = _make("svd", dtype=torch.bfloat16, state_dtype="float32")
    _, opt = _make("svd", dtype=torch.bfloat16, state_dtype="float32")
    train(source_model, source, batches(2, dtype=torch.bfloat16))
    seen = []

    def pre(optimizer, state_dict):
        seen.append(("pre", sorted(state_dict["state"][7])))
        state_dict = dict(state_dict, param_groups=[dict(g, lr=0.5) for g in state_dict["param_groups"]])
        return state_dict  # a pre-hook may return a replacement

    def post(optimizer):
        state = optimizer.state[optimizer.param_groups[1]["params"][2]]
        seen.append(("post", state["exp_avg"].dtype, state["exp_avg_sq"].dtype, optimizer.param_groups[0]["lr"]))

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(source.state_dict())
    assert seen == [("pre", ["exp_avg", "exp_avg_sq", "last_refresh", "proj_left", "rank", "refreshes", "step"]),
                    ("post", torch.float32, torch.float32, 0.5)]


def test_loaded_state_does_not_alias_the_checkpoint():
    model, source = _trained_opt()
    sd = source.state_dict()
    frozen = roundtrip(sd)
    loaded_model, opt = _make("svd")
    opt.load_state_dict(sd)
    train(loaded_model, opt, batches(2, seed=3))
    for idx, entry in frozen["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(source.state_dict()["state"][idx][key], value), key


# ---- galore-torch checkpoints are converted -------------------------------------------------------------
@pytest.mark.peers
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("stop", [3, 4])  # gap 4: mid-gap, and just before the refresh at step 4
def test_galore_torch_checkpoint_is_converted_and_resumes_exactly(proj_type, stop):
    """Save galore-torch's state_dict after a few steps, load it into GaLoreAdamW, continue both: the
    weights stay bit-identical (fp32, CPU), across the next refresh."""
    import warnings
    galore_torch = pytest.importorskip("galore_torch")
    groups = dict(rank=5, update_proj_gap=4, scale=0.25, proj_type=proj_type)
    data = batches(9)
    theirs = ToyNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # galore-torch's HF deprecation warning
        their_opt = galore_torch.GaLoreAdamW(galore_groups(theirs, **groups), lr=2e-3, weight_decay=0.01)
    train(theirs, their_opt, data[:stop])
    # galore-torch's state holds a projector object: not weights_only
    checkpoint = roundtrip({"model": theirs.state_dict(), "optim": their_opt.state_dict()}, weights_only=False)

    ours = ToyNet()
    our_opt = GaLoreAdamW(galore_groups(ours, **groups), lr=2e-3, weight_decay=0.01)
    ours.load_state_dict(checkpoint["model"])
    our_opt.load_state_dict(checkpoint["optim"])
    assert our_opt.param_groups[1]["projector"] == "svd" and our_opt.param_groups[1]["seed"] == 0
    train(theirs, their_opt, data[stop:])
    train(ours, our_opt, data[stop:])
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), name
    # and our state is our own format: it saves and loads with weights_only=True
    roundtrip(our_opt.state_dict())
