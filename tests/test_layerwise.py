"""Layer-wise updates (steps inside backward) give exactly the ordinary loop's results."""
import pytest
import torch
from torch import nn

from lowrank_kernels import GaLoreAdamW
from lowrank_kernels.demo.model import Llama, ModelConfig
from lowrank_kernels.hf import galore_param_groups
from lowrank_kernels.layerwise import LayerwiseUpdates

ACCUM, STEPS = 3, 4  # 4 optimizer steps of 3 micro-batches; update_proj_gap=2 refreshes at steps 0 and 2


def make(seed=0, tie=False, **strategy):
    torch.manual_seed(seed)
    model = Llama(ModelConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, tie_embeddings=tie))
    groups = galore_param_groups(model, r".*\.(attn|mlp)\..*", rank=4, update_proj_gap=2, **strategy)
    opt = GaLoreAdamW(groups, lr=1e-2, weight_decay=0.1, backend="torch")
    # Warm-up then decay: every step has a different lr, so a scheduler/step mismatch would show.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2) * 0.8**s)
    return model, opt, sched


def micro_batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32, (n, 2, 9), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def assert_same(model_a, opt_a, model_b, opt_b):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(opt_a.param_groups, opt_b.param_groups):
        assert a["lr"] == b["lr"]
        for p, q in zip(a["params"], b["params"]):
            sa, sb = opt_a.state[p], opt_b.state[q]
            assert sa.keys() == sb.keys()
            for key in sa:
                equal = torch.equal(sa[key], sb[key]) if torch.is_tensor(sa[key]) else sa[key] == sb[key]
                assert equal, key


def ordinary(model, opt, sched, data, clip=None):
    for i, (x, y) in enumerate(data):
        (model.loss(x, y) / ACCUM).backward()
        if (i + 1) % ACCUM == 0:
            if clip is not None:  # what per-parameter clipping means
                for p in model.parameters():
                    torch.nn.utils.clip_grad_norm_([p], clip)
            opt.step()
            opt.zero_grad()
            sched.step()


@pytest.mark.parametrize("tie,strategy,clip", [
    (False, {}, None),
    (True, {"projector": "rsvd"}, None),  # tied embeddings: a weight used twice in the graph
    (False, {"projector": "warm", "moments_on_refresh": "rotate"}, 0.05),
])
def test_identical_to_ordinary_step(tie, strategy, clip):
    data = micro_batches(ACCUM * STEPS)
    ref_model, ref_opt, ref_sched = make(tie=tie, **strategy)
    ordinary(ref_model, ref_opt, ref_sched, data, clip)

    model, opt, sched = make(tie=tie, **strategy)
    stepped = []
    with LayerwiseUpdates(opt, accumulation_steps=ACCUM, max_grad_norm=clip) as lw:
        for x, y in data:
            steps = lw.backward(model.loss(x, y) / ACCUM)
            stepped.append(steps)
            grads = [p.grad for p in model.parameters()]
            if steps:
                assert all(g is None for g in grads)  # every full-size gradient was freed
                sched.step()
            else:
                assert all(g is not None for g in grads)  # accumulating
    assert stepped == [False, False, True] * STEPS
    assert all(opt.state[p]["refreshes"] == 2 for p in opt.param_groups[-1]["params"])
    assert_same(ref_model, ref_opt, model, opt)


def test_parameters_without_gradient_in_the_last_micro_batch_still_step():
    def run(layerwise):
        torch.manual_seed(0)
        a, b = nn.Linear(8, 8), nn.Linear(8, 8)
        opt = GaLoreAdamW([{"params": [a.bias, b.bias]}, {"params": [a.weight, b.weight], "rank": 2}], lr=0.1)
        lw = LayerwiseUpdates(opt, accumulation_steps=2) if layerwise else None
        x = torch.randn(4, 8)
        losses = [b(a(x)).square().mean(), a(x).square().mean()]  # b gets a gradient only in the first
        for loss in losses:
            lw.backward(loss) if layerwise else loss.backward()
        if not layerwise:
            opt.step()
        return [p.detach().clone() for p in (a.weight, a.bias, b.weight, b.bias)], b.weight.grad

    expected, _ = run(False)
    got, b_grad = run(True)
    assert b_grad is None
    assert all(torch.equal(e, g) for e, g in zip(expected, got))


def test_backward_outside_micro_batch_raises_and_remove_restores_plain_backward():
    model, opt, _ = make()
    (x, y), = micro_batches(1)
    lw = LayerwiseUpdates(opt)
    with pytest.raises(RuntimeError, match="outside"):
        model.loss(x, y).backward()
    opt.zero_grad()
    lw.remove()
    before = [p.detach().clone() for p in model.parameters()]
    model.loss(x, y).backward()  # no hooks: gradients stay, nothing is stepped
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert not opt.state


def test_argument_checks():
    _, opt, _ = make()
    with pytest.raises(TypeError, match="step_param"):
        LayerwiseUpdates(torch.optim.AdamW([nn.Parameter(torch.ones(2))]))
    with pytest.raises(ValueError, match="accumulation_steps"):
        LayerwiseUpdates(opt, accumulation_steps=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        LayerwiseUpdates(opt, max_grad_norm=0.0)
