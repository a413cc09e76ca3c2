"""torch.optim conventions, checked the way torch's own optimizer tests (common_optimizers.py) check them:
deepcopy and pickle, state_dict round trips, per-group hyperparameters, tensor lr, LR schedulers, step and
state_dict hooks, printing, named parameters, and the errors torch.optim raises for malformed params."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lowrank_kernels import GaLoreAdamW, backends, reference

from helpers import ToyNet, batches, galore_groups, mse_closure, train

PROJECTED = dict(rank=4, update_proj_gap=2)


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device)


def _same_state(a: GaLoreAdamW, b: GaLoreAdamW):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for idx, entry in sa["state"].items():
        assert entry.keys() == sb["state"][idx].keys()
        for key, value in entry.items():
            other = sb["state"][idx][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


def test_default_backend_is_auto_and_picks_the_reference_on_cpu():
    opt = GaLoreAdamW(ToyNet().parameters())
    assert opt.backend == "auto"
    assert backends.step_function(opt.backend, torch.zeros(3)) is reference.galore_step


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_deepcopy_copies_all_public_attributes_and_steps_like_the_original(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    model = ToyNet().to("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the interpreter runs triton
    opt = GaLoreAdamW(galore_groups(model, **PROJECTED), lr=1e-2, backend=backend, seed=5, check_finite=True)
    device = next(model.parameters()).device
    train(model, opt, [(x.to(device), y.to(device)) for x, y in batches(3)])
    twin = copy.deepcopy(opt)
    public = lambda o: {k: v for k, v in o.__dict__.items() if not k.startswith("_")}  # noqa: E731
    assert public(twin).keys() == public(opt).keys() and twin.backend == backend
    # The copy has its own parameters and state: step both with the same gradients.
    originals = [p for g in opt.param_groups for p in g["params"]]
    copies = [p for g in twin.param_groups for p in g["params"]]
    assert all(a is not b and torch.equal(a, b) for a, b in zip(originals, copies))
    for seed in range(3):
        _grads(originals, seed)
        _grads(copies, seed)
        opt.step()
        twin.step()
    assert all(torch.equal(a, b) for a, b in zip(originals, copies))
    _same_state(opt, twin)


def test_pickle_round_trip_keeps_backend_and_state():
    model = ToyNet()
    opt = GaLoreAdamW(galore_groups(model, **PROJECTED), lr=1e-2, backend="torch")
    train(model, opt, batches(3))
    restored = pickle.loads(pickle.dumps(opt))
    assert restored.backend == "torch"
    _same_state(opt, restored)
    params = [p for g in restored.param_groups for p in g["params"]]
    _grads(params, 0)
    restored.step()  # works, and registers as a hooked step
    restored.register_step_post_hook(lambda *a: None)


def test_state_dict_round_trip_is_deterministic():
    """torch's test_state_dict_deterministic: a loaded optimizer steps exactly like the original."""
    model = ToyNet()
    opt = GaLoreAdamW(galore_groups(model, **PROJECTED, projector="rsvd"), lr=1e-2, weight_decay=0.1)
    train(model, opt, batches(3))
    clone = ToyNet()
    clone.load_state_dict(model.state_dict())
    opt2 = GaLoreAdamW(galore_groups(clone, **PROJECTED, projector="rsvd"), lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(opt.state_dict())
    _same_state(opt, opt2)
    for seed in range(4):  # across a refresh (gap 2)
        _grads(model.parameters(), seed)
        _grads(clone.parameters(), seed)
        opt.step()
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clone.parameters()))
    _same_state(opt, opt2)


def test_each_group_uses_its_own_hyperparameters():
    """Groups with different lr, betas, eps, weight decay, rank, gap, scale and proj_type step exactly as
    separate one-group optimizers would."""
    settings = [dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-5, weight_decay=0.1, rank=3, update_proj_gap=2,
                     scale=0.5, proj_type="left"),
                dict(lr=3e-3, weight_decay=0.0, rank=5, update_proj_gap=3, proj_type="full"),
                dict(lr=5e-2, betas=(0.5, 0.9), weight_decay=0.2)]
    shapes = [(9, 13), (17, 11), (23,)]
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g) for s in shapes]
    joint = [nn.Parameter(t.clone()) for t in start]
    alone = [nn.Parameter(t.clone()) for t in start]
    opt = GaLoreAdamW([{"params": [p], **s} for p, s in zip(joint, settings)], lr=1.0, betas=(0.9, 0.999))
    singles = [GaLoreAdamW([{"params": [p], **s}], lr=1.0, betas=(0.9, 0.999)) for p, s in zip(alone, settings)]
    for seed in range(5):
        _grads(joint, seed)
        _grads(alone, seed)
        opt.step()
        for single in singles:
            single.step()
    for a, b, t in zip(joint, alone, start):
        assert torch.equal(a, b) and not torch.equal(a, t)


def test_tensor_lr_equals_float_lr():
    results = []
    for lr in (1e-2, torch.tensor(1e-2, dtype=torch.float64)):
        model = ToyNet()
        opt = GaLoreAdamW(galore_groups(model, **PROJECTED), lr=lr, weight_decay=0.1)
        train(model, opt, batches(2))
        if isinstance(lr, torch.Tensor):
            lr.fill_(3e-3)  # a tensor lr changed in place takes effect
        else:
            for group in opt.param_groups:
                group["lr"] = 3e-3
        train(model, opt, batches(2, seed=2))
        results.append(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_lr_schedulers_drive_the_optimizer():
    """A scheduler's lr (and OneCycleLR's betas) are what the step uses: same as setting them by hand."""
    scheduled, manual = ToyNet(), ToyNet()
    opt = GaLoreAdamW(galore_groups(scheduled, **PROJECTED), lr=1e-2)
    by_hand = GaLoreAdamW(galore_groups(manual, **PROJECTED), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=6, cycle_momentum=True,
                                                base_momentum=0.8, max_momentum=0.95)
    seen = set()
    for step, (x, y) in enumerate(batches(6)):
        for group, twin in zip(opt.param_groups, by_hand.param_groups):
            twin["lr"], twin["betas"] = group["lr"], group["betas"]
            seen.add((group["lr"], group["betas"]))
        train(scheduled, opt, [(x, y)])
        train(manual, by_hand, [(x, y)])
        sched.step()
    assert len(seen) == 6  # lr and beta1 really changed every step
    assert all(torch.equal(a, b) for a, b in zip(scheduled.parameters(), manual.parameters()))
    state = sched.state_dict()  # schedulers checkpoint alongside
    assert state["last_epoch"] == 6


def test_step_hooks_run_once_per_step_and_not_on_a_refused_step():
    model = ToyNet()
    opt = GaLoreAdamW(galore_groups(model, **PROJECTED), lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt)))
    handle = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global", True)))
    try:
        train(model, opt, batches(2))
        assert calls == [("global", True), ("pre", True), ("post", True)] * 2
        calls.clear()
        _grads(model.parameters(), 0)
        model.mid.weight.grad[0, 0] = float("nan")  # step 2 refreshes (gap 2): refused
        with pytest.raises(RuntimeError, match="non-finite"):
            opt.step()
        assert calls == [("global", True), ("pre", True)]  # no post hook for a step that did not happen
    finally:
        handle.remove()


def test_step_pre_hook_can_replace_the_closure():
    model = ToyNet()
    opt = GaLoreAdamW(galore_groups(model, **PROJECTED), lr=1e-2)
    closure = mse_closure(model, opt, *batches(1)[0])

    opt.register_step_pre_hook(lambda o, args, kwargs: (args[:1], {"closure": closure}))  # args[0] is self
    loss = opt.step()
    assert isinstance(loss, torch.Tensor) and opt.state[model.mid.weight]["step"] == 1


def test_state_dict_hooks_and_zero_grad():
    model = ToyNet()
    opt = GaLoreAdamW(galore_groups(model, **PROJECTED), lr=1e-2)
    train(model, opt, batches(1))
    opt.register_state_dict_pre_hook(lambda o: None)
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    assert opt.state_dict()["extra"] == 1
    _grads(model.parameters(), 0)
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    opt.step()  # zero gradients are a valid step
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_printing_and_named_parameters():
    model = ToyNet()
    named = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    others = [(n, p) for n, p in model.named_parameters() if p.dim() != 2]
    opt = GaLoreAdamW([{"params": others}, {"params": named, **PROJECTED}], lr=1e-2)
    text = repr(opt)
    assert text.startswith("GaLoreAdamW (") and "rank: 4" in text and "proj_type: std" in text
    train(model, opt, batches(1))
    sd = opt.state_dict()
    assert sd["param_groups"][1]["param_names"] == ["inp.weight", "mid.weight", "out.weight"]
    twin_model = ToyNet()
    twin = GaLoreAdamW([{"params": [p for n, p in twin_model.named_parameters() if p.dim() != 2]},
                        {"params": [p for n, p in twin_model.named_parameters() if p.dim() == 2], **PROJECTED}])
    twin.load_state_dict(sd)
    assert twin.param_groups[1]["param_names"] == ["inp.weight", "mid.weight", "out.weight"]


def test_torch_optim_param_errors():
    p, q = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3, 3))
    with pytest.raises(TypeError, match="params argument given to the optimizer should be an iterable"):
        GaLoreAdamW(p)
    with pytest.raises(ValueError, match="empty parameter list"):
        GaLoreAdamW([])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        GaLoreAdamW([{"params": [p]}, {"params": [p]}])
    with pytest.warns(UserWarning, match="duplicate parameters"):
        GaLoreAdamW([p, p])
    with pytest.raises(ValueError, match="Some param names are missing"):
        GaLoreAdamW([("w", p), q])
    with pytest.raises(TypeError, match="optimizer can only optimize Tensors"):
        GaLoreAdamW([{"params": [p, 3.0]}])
    with pytest.raises(ValueError, match="non-leaf"):
        GaLoreAdamW([p * 2])


def test_add_param_group_after_steps_then_checkpoint():
    model = ToyNet()
    opt = GaLoreAdamW(galore_groups(model, **PROJECTED), lr=1e-2)
    train(model, opt, batches(2))
    extra = nn.Parameter(torch.randn(10, 7))
    opt.add_param_group({"params": [extra], "rank": 2, "proj_type": "right", "lr": 5e-3})
    extra.grad = torch.randn(10, 7)
    opt.step()
    assert opt.state[extra]["proj_right"].shape == (7, 2) and opt.param_groups[2]["lr"] == 5e-3
    sd = opt.state_dict()
    twin_model, twin_extra = ToyNet(), nn.Parameter(torch.randn(10, 7))
    twin = GaLoreAdamW(galore_groups(twin_model, **PROJECTED), lr=1e-2)
    twin.add_param_group({"params": [twin_extra], "rank": 2, "proj_type": "right"})
    twin.load_state_dict(sd)
    assert twin.param_groups[2]["lr"] == 5e-3
    assert torch.equal(twin.state[twin_extra]["proj_right"], opt.state[extra]["proj_right"])
