"""Checkpoints: plain tensors and values only, safe loading, exact resume across a basis refresh."""
import io

import pytest
import torch

from lowrank_kernels import GaLoreAdamW

from helpers import ToyNet, batches, galore_groups, train

PROJECTED = dict(rank=5, update_proj_gap=4, scale=0.25, proj_type="std")


def _make(projector, dtype=torch.float32, **extra):
    model = ToyNet(dtype=dtype)
    opt = GaLoreAdamW(galore_groups(model, projector=projector, **PROJECTED, **extra), lr=2e-3,
                      weight_decay=0.01, seed=123)
    return model, opt


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


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
    loaded = _roundtrip(sd)
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
    checkpoint = _roundtrip({"model": first.state_dict(), "optim": opt1.state_dict()})

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
