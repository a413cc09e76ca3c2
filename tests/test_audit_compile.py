"""torch.compile audit: compiled training steps (and compiled optimizer calls) equal the eager loop bit for
bit and stop compiling after a warm-up, on backend "torch" and "triton" (the interpreter on CPU).

The compiled regions run dynamo's graphs with the "eager" backend (the option matrix, for time) or through
AOTAutograd ("aot_eager": a compiled backward, where LayerwiseUpdates' hooks fire), whose arithmetic
equals eager's, so equality is exact; Inductor is left out for time (its fusions change the forward's
rounding, not what the optimizer does). Recompiles are checked two ways:
dynamo's frame counter stops after the first steps, and ``error_on_recompile`` turns any later guard
failure (a recompile) into an error.
"""
import contextlib

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from lowrank_kernels import GaLoreAdamW, LayerwiseUpdates


class Net(nn.Module):
    """A conv weight (5x3x3x3: the 5x27 matrix), 13x80 and 7x13 weights, and a layer that gets no grad."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.fc1 = nn.Linear(80, 13)
        self.fc2 = nn.Linear(13, 7)
        self.unused = nn.Linear(7, 11)  # never called: its parameters keep grad None

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(h)))


def build(backend="torch", lr=1e-2, weight_decay=0.0, **group):
    torch.manual_seed(0)
    model = Net()
    weights = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    opt = GaLoreAdamW([{"params": others}, {"params": weights, "rank": 3, "update_proj_gap": 2, **group}],
                      lr=lr, weight_decay=weight_decay, backend=backend)
    return model, opt


def inputs(steps, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 6, 6, generator=g) for _ in range(steps)]


def train_step(model, opt, x):
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def assert_same(a, b):
    """Weights and optimizer states equal bit for bit (state tensors compared with torch.equal)."""
    for p, q in zip(a[0].parameters(), b[0].parameters()):
        assert torch.equal(p, q)
    sa, sb = a[1].state_dict()["state"], b[1].state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k, v in sa[i].items():
            w = sb[i][k]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w, (i, k)


class Frames:
    """Counts every frame dynamo converts (resume functions after graph breaks included, graph or not);
    ``settled()`` then makes any recompile an error."""

    def __init__(self):
        torch._dynamo.reset()
        counters.clear()
        self.stack = contextlib.ExitStack()

    @property
    def total(self):
        return counters["frames"]["total"]

    def settled(self):
        self.after_warmup = self.total
        self.stack.enter_context(torch._dynamo.config.patch(error_on_recompile=True))

    def close(self):
        self.stack.close()
        torch._dynamo.reset()


@pytest.fixture
def frames():
    f = Frames()
    yield f
    f.close()


# ---- 1. a compiled training step over every option family --------------------------------------------------
OPTIONS = {
    "galore": {}, "weight_decay": dict(weight_decay=0.1),
    "reverse_std": dict(proj_type="reverse_std"), "left": dict(proj_type="left"),
    "right": dict(proj_type="right"), "full": dict(proj_type="full"),
    "fira": dict(update="fira"), "fira_left": dict(update="fira", proj_type="left"),
    "frugal": dict(update="frugal"), "frugal_full": dict(update="frugal", proj_type="full"),
    "apollo": dict(update="apollo"), "apollo_random": dict(update="apollo", projector="random"),
    "apollo_mini": dict(update="apollo-mini", rank=1, scale=128),
    "int8": dict(state_dtype="int8"), "bf16": dict(state_dtype="bfloat16"), "fp32": dict(state_dtype="float32"),
    "rsvd": dict(projector="rsvd"), "random": dict(projector="random"), "dct": dict(projector="dct"),
    "warm": dict(projector="warm"), "energy": dict(rank_policy="energy", energy_threshold=0.5),
    "lazy": dict(refresh_policy="lazy", similarity_threshold=0.0, patience=1),
    "converged": dict(refresh_policy="converged", convergence_tol=0.5),
    "zero": dict(moments_on_refresh="zero"), "rotate": dict(moments_on_refresh="rotate"),
    "rotate_energy": dict(moments_on_refresh="rotate", rank_policy="energy", energy_threshold=0.5),
}
# backend "triton" (the interpreter costs ~2 s a run): the grouped routes, one of each kind
TRITON = ("weight_decay", "full", "fira", "int8", "rotate_energy")


@pytest.mark.parametrize("backend,option", [("torch", o) for o in OPTIONS] + [("triton", o) for o in TRITON])
def test_compiled_train_step_equals_eager_and_stops_compiling(frames, backend, option):
    group = dict(OPTIONS[option])
    wd = group.pop("weight_decay", 0.0)
    counter = CompileCounter()
    compiled, eager = build(backend, weight_decay=wd, **group), build(backend, weight_decay=wd, **group)
    step_c = torch.compile(train_step, backend=counter)
    for i, x in enumerate(inputs(7 if backend == "torch" else 5)):  # refreshes at 0, 2, 4, 6 (fixed policy)
        if i == 2:
            graphs = counter.frame_count
            frames.settled()
        loss_c = step_c(*compiled, x)
        loss_e = train_step(*eager, x)
        assert torch.equal(loss_c, loss_e)
    assert counter.frame_count == graphs == 1  # the forward: nothing else makes a graph
    assert frames.total == frames.after_warmup
    assert_same(compiled, eager)
    model, opt = compiled
    stepped = [p for p in model.parameters() if p in opt.state]
    assert len(stepped) == 6 and all(opt.state[p]["step"] == i + 1 for p in stepped)
    assert not any(p in opt.state for p in model.unused.parameters())
    if "energy" in option:  # ranks changed at refreshes, under the compiled loop too
        assert {opt.state[p]["rank"] for p in (model.conv.weight, model.fc1.weight, model.fc2.weight)} != {3}


# ---- 2. LR schedulers, float and tensor lr; betas and weight decay edited between steps -------------------
SCHEDULERS = {
    "steplr": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20),
    "lambdalr": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i)),
}


@pytest.mark.parametrize("backend,sched,lr,inside", [
    ("torch", s, lr, inside) for s in SCHEDULERS for lr in ("float", "tensor") for inside in (False, True)
] + [("triton", "onecycle", "tensor", True)])
def test_schedulers_float_and_tensor_lr_under_compile(frames, backend, sched, lr, inside):
    """torch's pattern for compiled optimizers is a tensor lr (an lr change must not recompile); the
    scheduler steps inside the compiled function or after it. betas and weight decay change at step 4."""
    def make():
        value = torch.tensor(0.01) if lr == "tensor" else 0.01
        model, opt = build(backend, lr=value, weight_decay=0.1)
        return model, opt, SCHEDULERS[sched](opt)

    def step(model, opt, scheduler, x, with_scheduler):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        if with_scheduler:
            scheduler.step()
        opt.zero_grad()
        return loss

    compiled, eager = make(), make()
    step_c = torch.compile(step, backend="eager")
    lrs = []
    for i, x in enumerate(inputs(7)):
        if i == 2:
            frames.settled()
        if i == 4:
            for _, opt, _ in (compiled, eager):
                opt.param_groups[1]["betas"] = (0.8, 0.99)
                opt.param_groups[0]["weight_decay"] = 0.3
        step_c(*compiled, x, inside)
        step(*eager, x, True)
        if not inside:
            compiled[2].step()
        lrs.append(float(compiled[1].param_groups[1]["lr"]))
        assert float(compiled[1].param_groups[1]["lr"]) == float(eager[1].param_groups[1]["lr"])
    assert frames.total == frames.after_warmup
    assert len(set(lrs)) >= 3  # the schedule did move the lr
    assert isinstance(compiled[1].param_groups[0]["lr"], torch.Tensor) == (lr == "tensor")
    assert_same(compiled[:2], eager[:2])


# ---- 3. compiling opt.step itself; fullgraph=True ------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_opt_step_as_in_torchs_tutorial(frames, backend):
    """torch.compile(opt.step), and a function calling opt.step() then scheduler.step() (tensor lr), run,
    equal eager and compile nothing after the first steps."""
    def make():
        model, opt = build(backend, lr=torch.tensor(0.01), weight_decay=0.1)
        return model, opt, torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)

    compiled, eager = make(), make()
    opt_step = torch.compile(compiled[1].step, backend="aot_eager")

    @torch.compile(backend="aot_eager")
    def step_and_schedule():
        compiled[1].step()
        compiled[2].step()

    for i, x in enumerate(inputs(7)):
        if i == 2:
            frames.settled()
        for model, opt, scheduler in (compiled, eager):
            model(x).square().mean().backward()
        if i % 2:
            step_and_schedule()
        else:
            opt_step()
            compiled[2].step()
        eager[1].step()
        eager[2].step()
        for _, opt, _ in (compiled, eager):
            opt.zero_grad()
    assert frames.total == frames.after_warmup
    lrs = [opt.param_groups[0]["lr"] for _, opt, _ in (compiled, eager)]
    assert torch.equal(*lrs) and lrs[0].item() == pytest.approx(0.01)  # the schedule ran to its end
    assert_same(compiled[:2], eager[:2])


def test_fullgraph_step_fails_with_a_clear_error_and_the_supported_pattern_works(frames):
    """fullgraph=True cannot hold opt.step() (it runs eagerly behind a graph break): the error names
    GaLoreAdamW and what to do, and changes nothing. Compiling the model with fullgraph=True and calling
    opt.step() outside (README) equals eager."""
    model, opt = build()
    x = inputs(1)[0]
    model(x).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]

    def step():
        opt.step()

    for fn in (step, opt.step):
        with pytest.raises(torch._dynamo.exc.Unsupported, match="GaLoreAdamW steps run eagerly") as info:
            torch.compile(fn, backend="aot_eager", fullgraph=True)()
        assert "fullgraph=True" in str(info.value) and "outside" in str(info.value)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and not opt.state

    compiled, eager = build(), build()
    forward = torch.compile(compiled[0], backend="aot_eager", fullgraph=True)
    for x in inputs(5):
        forward(x).square().mean().backward()
        compiled[1].step()
        compiled[1].zero_grad()
        train_step(*eager, x)
    assert_same(compiled, eager)


# ---- step_param under compile (LayerwiseUpdates' entry point) ----------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_step_param_steps_the_parameter_it_is_given(frames, backend):
    """step_param traced by dynamo re-stepped the parameter its frame was first compiled for (dict lookups
    keyed by tensor identity are not guarded) and recompiled at every step: it must run eagerly."""
    compiled, eager = build(backend), build(backend)

    @torch.compile(backend="aot_eager")
    def step_each(model, opt, x):
        model(x).square().mean().backward()
        for p in model.parameters():
            if p.grad is not None:
                opt.step_param(p)
        opt.zero_grad()

    for i, x in enumerate(inputs(6)):
        if i == 2:
            frames.settled()
        step_each(*compiled, x)
        train_step(*eager, x)
        assert all(compiled[1].state[p]["step"] == i + 1 for p in compiled[1].state)
    assert frames.total == frames.after_warmup
    assert_same(compiled, eager)


# ---- 4. LayerwiseUpdates under a compiled forward/backward -------------------------------------------------
@pytest.mark.parametrize("backend,where", [
    ("torch", "model"), ("torch", "step"), ("torch", "compiled_autograd"), ("triton", "model"), ("triton", "step")])
def test_layerwise_under_compile_equals_the_ordinary_loop(frames, backend, where):
    """The hooks step inside backward: with a compiled model (eager hooks, the common case), with
    lw.backward() inside a compiled step (the hooks then fire in a graph break, where dynamo compiles every
    frame it enters), and under compiled autograd (the hooks traced into the backward graph). Two
    micro-batches per step."""
    compiled, eager = build(backend), build(backend)
    lw = LayerwiseUpdates(compiled[1], accumulation_steps=2)
    model_c = torch.compile(compiled[0], backend="aot_eager") if where != "step" else compiled[0]

    def micro(x):
        return lw.backward(model_c(x).square().mean())

    micro_c = torch.compile(micro, backend="aot_eager") if where == "step" else micro
    stepped = []
    for i, x in enumerate(inputs(8)):
        if i == 4:
            frames.settled()
        ctx = (torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager"))
               if where == "compiled_autograd" else contextlib.nullcontext())
        with ctx:
            stepped.append(micro_c(x))
        eager[0](x).square().mean().backward()
        if i % 2:
            eager[1].step()
            eager[1].zero_grad()
    lw.remove()
    assert stepped == [False, True] * 4
    assert frames.total == frames.after_warmup
    assert all(p.grad is None for p in compiled[0].parameters())
    assert_same(compiled, eager)


# ---- 5. closures and zero_grad ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,set_to_none", [("torch", True), ("torch", False), ("triton", False)])
def test_compiled_step_with_closure_and_zero_grad(frames, backend, set_to_none):
    """opt.step(closure) inside a compiled function (the closure is made there), zero_grad either way: the
    loss comes back, results equal eager, no recompiles."""
    def step(model, opt, x):
        def closure():
            opt.zero_grad(set_to_none=set_to_none)
            loss = model(x).square().mean()
            loss.backward()
            return loss
        return opt.step(closure)

    compiled, eager = build(backend, weight_decay=0.1), build(backend, weight_decay=0.1)
    step_c = torch.compile(step, backend="aot_eager")
    for i, x in enumerate(inputs(6)):
        if i == 2:
            frames.settled()
        loss_c, loss_e = step_c(*compiled, x), step(*eager, x)
        assert loss_c.requires_grad and torch.equal(loss_c, loss_e)
    assert frames.total == frames.after_warmup
    w = compiled[0].fc1.weight
    assert w.grad is not None and torch.count_nonzero(w.grad) > 0  # the closure's backward
    compiled[1].zero_grad(set_to_none=set_to_none)
    assert (w.grad is None) == set_to_none and (set_to_none or torch.count_nonzero(w.grad) == 0)
    assert_same(compiled, eager)
