"""Small shared pieces for the tests: a toy model with tall, wide and square weights, and its groups."""
import copy

import torch
from torch import nn


class ToyNet(nn.Module):
    """Weights of shape 48x16 (tall), 48x48 (square) and 12x48 (wide), plus 1-D biases and a norm."""

    def __init__(self, seed: int = 0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(16, 48)
        self.mid = nn.Linear(48, 48)
        self.out = nn.Linear(48, 12)
        self.norm = nn.LayerNorm(48)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.to(dtype)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.inp(x))
        h = torch.tanh(self.mid(self.norm(h)))
        return self.out(h)


def galore_groups(model: nn.Module, **projected):
    """galore-torch's convention: 2-D weights projected, everything else plain AdamW."""
    weights = [p for n, p in model.named_parameters() if p.dim() == 2]
    others = [p for n, p in model.named_parameters() if p.dim() != 2]
    return [{"params": others}, {"params": weights, **projected}]


def batches(steps: int, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 16, generator=g).to(dtype), torch.randn(32, 12, generator=g).to(dtype))
            for _ in range(steps)]


def train(model, opt, data):
    """Run the optimizer over ``data``; returns the losses."""
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def snapshot(model, opt):
    """Weights and a deep copy of the optimizer's state_dict, for :func:`assert_unchanged`."""
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_unchanged(model, opt, snap):
    """Weights and optimizer state exactly as ``snap`` (a refused step must change nothing)."""
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
