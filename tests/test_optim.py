"""torch.optim conventions and the optimizer's additions: N-D weights, closures, groups, step_param."""
import pytest
import torch
from torch import nn

from lowrank_kernels import GaLoreAdamW

from helpers import ToyNet, batches, galore_groups, mse_closure, train


# ---- N-D weights --------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_weight_is_optimised_as_its_matrix_form(channels_last):
    """A (C_out, C_in, kh, kw) weight steps exactly like the (C_out, C_in*kh*kw) matrix."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Parameter(torch.randn(8, 3, 3, 3, generator=g))
    if channels_last:
        conv.data = conv.data.to(memory_format=torch.channels_last)
    mat = nn.Parameter(conv.detach().reshape(8, 27).clone())
    opts = [GaLoreAdamW([{"params": [p], "rank": 3, "update_proj_gap": 2}], lr=1e-2, weight_decay=0.1)
            for p in (conv, mat)]
    for _ in range(5):
        grad = torch.randn(8, 3, 3, 3, generator=g)
        conv.grad, mat.grad = grad.clone(), grad.reshape(8, 27).clone()
        for opt in opts:
            opt.step()
    assert torch.equal(conv.detach().reshape(8, 27), mat.detach())
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last


# ---- torch.optim conventions ------------------------------------------------------------------------
def test_closure_zero_grad_and_param_groups():
    model = ToyNet()
    opt = GaLoreAdamW(galore_groups(model, rank=4), lr=1e-2)
    closure = mse_closure(model, opt, *batches(1)[0])

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor)
    for _ in range(5):
        last = opt.step(closure)
    assert last < first
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert opt.param_groups[1]["update_proj_gap"] == 200 and opt.param_groups[1]["scale"] == 0.25
    assert "rank" not in opt.param_groups[0]
    extra = nn.Parameter(torch.randn(10, 6))
    opt.add_param_group({"params": extra, "rank": 2, "proj_type": "left"})
    with pytest.raises(ValueError, match="rank=6"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(10, 6))], "rank": 6})


def test_parameters_without_grad_are_skipped():
    model = ToyNet()
    opt = GaLoreAdamW(galore_groups(model, rank=4), lr=1e-2)
    train(model, opt, batches(2))
    before = model.mid.weight.detach().clone()
    step = opt.state[model.mid.weight]["step"]
    _random_grads(model, 3)
    model.mid.weight.grad = None
    opt.step()
    assert torch.equal(model.mid.weight, before)
    assert opt.state[model.mid.weight]["step"] == step


def _random_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_step_param_one_by_one_equals_step():
    """Stepping each parameter alone (as a backward hook does) is the same as one step()."""
    whole, single = ToyNet(), ToyNet()
    opts = [GaLoreAdamW(galore_groups(m, rank=4, update_proj_gap=2, projector="rsvd"), lr=1e-2, weight_decay=0.1)
            for m in (whole, single)]
    for step in range(5):
        for m in (whole, single):
            _random_grads(m, step)
        opts[0].step()
        for p in reversed(list(single.parameters())):  # backward order
            opts[1].step_param(p)
    for a, b in zip(whole.parameters(), single.parameters()):
        assert torch.equal(a, b)


def test_step_param_rejects_a_foreign_tensor():
    model = ToyNet()
    opt = GaLoreAdamW(galore_groups(model, rank=4))
    stranger = nn.Parameter(torch.randn(3, 3))
    stranger.grad = torch.randn(3, 3)
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt.step_param(stranger)
    assert not opt.state
