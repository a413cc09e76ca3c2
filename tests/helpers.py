"""Small shared pieces for the tests: a toy model with tall, wide and square weights, and its groups."""
import copy
import io
from typing import Optional

import torch
from torch import nn

from lowrank_kernels import GaLoreAdamW


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


def mse_closure(model, opt, x, y):
    """A step closure (torch.optim's convention): zero the gradients, backward the MSE loss, return it."""
    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    return closure


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
    assert_same_state(opt.state_dict(), sd)


def assert_same_state(now: dict, before: dict) -> None:
    """The ``state`` of two optimizer state_dicts holds the same keys and exactly equal values."""
    assert now["state"].keys() == before["state"].keys()
    for idx, entry in before["state"].items():
        assert now["state"][idx].keys() == entry.keys()
        for key, value in entry.items():
            got = now["state"][idx][key]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value


def assert_same_state_layout(opt_a, params_a, opt_b, params_b, values: bool = True) -> None:
    """Each parameter's state in ``opt_a`` and ``opt_b`` has the same keys, tensor shapes and dtypes (and,
    with ``values``, equal non-tensor values): e.g. real state against state sized on meta tensors."""
    for p, q in zip(params_a, params_b):
        a, b = opt_a.state[p], opt_b.state[q]
        assert a.keys() == b.keys()
        for key, value in a.items():
            if torch.is_tensor(value):
                assert (value.shape, value.dtype) == (b[key].shape, b[key].dtype), key
            elif values:
                assert value == b[key], key


def roundtrip(obj, weights_only: bool = True):
    """``obj`` through torch.save and torch.load, as a checkpoint file carries it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


def resume(make, model, opt):
    """A fresh ``make()`` (model, optimizer) loaded from a saved and re-read checkpoint of ``model``, ``opt``."""
    checkpoint = roundtrip({"model": model.state_dict(), "optim": opt.state_dict()})
    resumed, resumed_opt = make()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optim"])
    return resumed, resumed_opt


def trained(steps: int = 2, gap: int = 3, **projected):
    """ToyNet and a GaLoreAdamW past ``steps`` steps (refreshes every ``gap``): every cache is warm."""
    model = ToyNet()
    opt = GaLoreAdamW(galore_groups(model, rank=4, update_proj_gap=gap, **projected), lr=1e-2, weight_decay=0.1)
    train(model, opt, batches(steps))
    return model, opt


def fresh_grads(model, seed: int = 5) -> None:
    """New random gradients for every parameter (in its dtype)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def linear_stack(backend: str, depth: int = 1, hidden: int = 40, projected: Optional[dict] = None,
                 plain: Optional[dict] = None, **optim):
    """A 13 -> 29 -> (hidden -> 29) x depth -> 7 stack of Linear layers and its optimizer: the same weight
    shapes at every depth (so the same buckets), 2-D weights in a projected group (``projected``), biases
    in a plain one (``plain``)."""
    torch.manual_seed(0)
    dims = [13, 29] + [hidden, 29] * depth + [7]
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
    weights = [p for p in model.parameters() if p.dim() == 2]
    biases = [p for p in model.parameters() if p.dim() == 1]
    opt = GaLoreAdamW([{"params": biases, **(plain or {})}, {"params": weights, **(projected or {})}],
                      **{"lr": 1e-2, "weight_decay": 0.01, "backend": backend, **optim})
    return model, opt


def train_stack(model, opt, steps: int, seed: int = 1) -> None:
    """``steps`` MSE steps of a :func:`linear_stack` on seeded random batches."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 13, generator=g), torch.randn(16, 7, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
