"""CUDA graphs of the ordinary step, host side (lowrank_kernels/cuda_graphs.py), on the CPU.

No CPU stream can be captured, so these tests emulate one, keeping the host logic real:
* ``emulated_capture(opt, step)`` runs ``step`` with the engine told that its stream is capturing
  (``cuda_graphs.capturing``), then writes back every value the step changed (weights, state tensors,
  device step scalars) in place: a real capture launches nothing;
* ``EmulatedGraph.replay()`` runs the captured step again under the same flag: the kernels run, and the
  host bookkeeping is the capture's (it counts nothing), which is what a replay does on the device.
Device step scalars are forced (``opt._device_scalars``), as on CUDA. tests/test_engine.py's
``test_cuda_graph_replay_equals_eager`` and tests/test_methods_gpu.py capture real graphs on a GPU.
"""
import contextlib

import pytest
import torch
from torch import nn

from lowrank_kernels import GaLoreAdamW, cuda_graphs

BACKENDS = ["torch", "triton"]  # "triton": the grouped kernels, under the interpreter on CPU


@contextlib.contextmanager
def capturing():
    saved = cuda_graphs.capturing
    cuda_graphs.capturing = lambda device: True
    try:
        yield
    finally:
        cuda_graphs.capturing = saved


def _written(opt) -> list:
    """Every tensor a step may write: weights, state tensors, the engine's device step scalars and bases."""
    eng = opt._engine()
    out = [p for group in opt.param_groups for p in group["params"]]
    out += [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    for entry in eng._device_entries.values():
        out += [entry.steps, entry.hyper, entry.table]
    return out


def emulated_capture(opt, step) -> None:
    tensors = _written(opt)
    before = [t.detach().clone() for t in tensors]
    with capturing():
        step()
    with torch.no_grad():
        for t, b in zip(tensors, before):
            t.copy_(b)


class EmulatedGraph:
    def __init__(self, step):
        self.step, self.replays = step, 0

    def replay(self):
        with capturing():
            self.step()
        self.replays += 1


def model_and_opt(backend, seed=0, **options):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(11, 13), nn.Tanh(), nn.Linear(13, 7), nn.Tanh(), nn.Linear(7, 5))
    weights = [model[0].weight, model[2].weight, model[4].weight]
    others = [model[0].bias, model[2].bias, model[4].bias]
    group = dict(rank=3, update_proj_gap=4, scale=0.5, **options)
    opt = GaLoreAdamW([{"params": others}, {"params": weights, **group}], lr=1e-2, weight_decay=0.05,
                      backend=backend)
    opt._device_scalars = True
    return model, opt


def data(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(9, 11, generator=g), torch.randn(9, 5, generator=g)) for _ in range(steps)]


def forward_backward(model, opt, x, y):
    opt.zero_grad(set_to_none=False)  # static gradients: a graph's backward writes into the same tensors
    nn.functional.mse_loss(model(x), y).backward()


def schedule(opt, i, backend):
    if i == 7:
        for group in opt.param_groups:
            group["lr"] /= 2
            if backend == "triton":  # backend "torch" fixes the betas at capture (documented)
                group["betas"] = (0.85, 0.99)


def states(opt):
    return [(s.get("step"), s.get("refreshes")) for s in opt.state.values()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_replayed_steps_equal_eager_steps_and_counts_match(backend):
    """The documented pattern (eager refresh steps, opt.replay(graph) otherwise; the first replay right after
    the capture is counted like every other) equals eager training bit for bit, and so do the host step
    and refresh counts."""
    batches = data(12)
    eager_model, eager_opt = model_and_opt(backend)
    for i, (x, y) in enumerate(batches):
        schedule(eager_opt, i, backend)
        forward_backward(eager_model, eager_opt, x, y)
        eager_opt.step()

    model, opt = model_and_opt(backend)
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()

    def train_step():
        forward_backward(model, opt, static_x, static_y)
        opt.step()

    train_step()  # eager: the refresh step at step 1
    counts = states(opt)
    emulated_capture(opt, train_step)
    assert states(opt) == counts  # the capture counted nothing
    graph, replays = EmulatedGraph(train_step), 0
    for i, (x, y) in enumerate(batches[1:], start=1):
        schedule(opt, i, backend)
        static_x.copy_(x)
        static_y.copy_(y)
        if opt.refresh_due():
            train_step()
        else:
            opt.replay(graph)
            replays += 1
    assert replays == graph.replays >= 8
    assert states(opt) == states(eager_opt)
    for a, b in zip(eager_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(eager_model.parameters(), model.parameters()):
        for key, value in eager_opt.state[p].items():
            if torch.is_tensor(value):
                assert torch.equal(value, opt.state[q][key]), key


def low_rank_grads(model, k, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 2:
            m, n = p.shape
            p.grad = torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g)
        else:
            p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_replay_after_a_rank_change_or_a_reload_refuses_the_stale_graph(backend):
    model, opt = model_and_opt(backend, rank_policy="energy", energy_threshold=0.05, projector="rsvd")
    low_rank_grads(model, 1, seed=0)  # rank 1 at the first refresh
    opt.step()
    emulated_capture(opt, opt.step)
    graph = EmulatedGraph(opt.step)
    opt.replay(graph)
    opt.replay(graph)
    assert opt.refresh_due() is False
    opt.advance_host_counters(1)  # the next step refreshes (gap 4)
    assert opt.refresh_due()
    ranks = [opt.state[p]["rank"] for p in model.parameters() if p.dim() == 2]
    low_rank_grads(model, 2, seed=1)  # rank 2 at this refresh: moments and bases are reallocated
    opt.step()
    assert [opt.state[p]["rank"] for p in model.parameters() if p.dim() == 2] == [r + 1 for r in ranks]
    with pytest.raises(RuntimeError, match="stale"):
        opt.replay(graph)
    assert graph.replays == 2

    emulated_capture(opt, opt.step)  # a new capture replays again
    opt.replay(graph)
    opt.load_state_dict(opt.state_dict())  # copies: the graph's tensors are no longer the state's
    with pytest.raises(RuntimeError, match="stale"):
        opt.replay(graph)
    assert graph.replays == 3


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            # (torch.optim's state is a defaultdict: a refused step may leave an empty entry, which is no state)
            [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for s in opt.state.values() if s])


def same(a, b):
    (pa, sa), (pb, sb) = a, b
    return (all(torch.equal(x, y) for x, y in zip(pa, pb)) and len(sa) == len(sb)
            and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]
                                                 for k in x) for x, y in zip(sa, sb)))


@pytest.mark.parametrize("case", ["refresh due", "per-parameter rule", "int8 fira"])
def test_uncapturable_steps_raise_before_anything_changes(case):
    """A refresh (host SVDs) or a step whose step sizes are host numbers (the per-parameter reference) would
    be frozen into the graph: the capture raises, and weights, state and host counts are untouched."""
    options = {"per-parameter rule": dict(update="fira"), "int8 fira": dict(update="fira", state_dtype="int8"),
               "refresh due": {}}[case]
    backend = "triton" if case == "int8 fira" else "torch"
    model, opt = model_and_opt(backend, **options)
    low_rank_grads(model, 2, seed=0)
    if case != "refresh due":
        opt.step()  # the refresh step, eager
    before = snapshot(model, opt)
    with capturing(), pytest.raises(RuntimeError, match="refresh is due" if case == "refresh due" else "per-parameter"):
        opt.step()
    assert same(snapshot(model, opt), before)
    assert opt._engine().capture is None


def test_replay_needs_a_capture_and_no_refresh_due():
    model, opt = model_and_opt("torch")
    graph = EmulatedGraph(opt.step)
    low_rank_grads(model, 2, seed=0)
    with pytest.raises(RuntimeError, match="refresh is due"):
        opt.replay(graph)
    opt.step()
    with pytest.raises(RuntimeError, match="no step of this optimizer was captured"):
        opt.replay(graph)
    assert graph.replays == 0


def test_replay_points_the_grouped_tables_back_at_the_captured_gradients():
    """An eager refresh step with fresh gradient tensors (zero_grad(set_to_none=True)) points the grouped
    tables at them; the graph's backward writes the captured ones, so the replay points the tables back."""
    model, opt = model_and_opt("triton")
    low_rank_grads(model, 2, seed=0)
    opt.step()
    captured = [p.grad for p in model.parameters()]
    emulated_capture(opt, opt.step)
    record = opt._engine().capture
    opt.advance_host_counters(3)  # as three replays would: the next step refreshes
    opt.zero_grad(set_to_none=True)
    low_rank_grads(model, 2, seed=1)  # new tensors
    opt.step()
    def signature(grads):
        return tuple((g.data_ptr(), g.stride()) for g in grads)

    assert any(c.tables.grad_signature != signature(grads) for c, _, grads in record.grouped)  # re-pointed
    opt._engine().before_replay(opt)
    for cached, _, grads in record.grouped:
        assert all(any(g is c for c in captured) for g in grads)
        assert cached.tables.grad_signature == signature(grads)


@pytest.mark.parametrize("option", [dict(refresh_policy="converged"), dict(check_finite=True)])
@pytest.mark.parametrize("layerwise", [False, True])
def test_options_that_read_the_device_every_step_refuse_capture(option, layerwise):
    """refresh_policy="converged" and check_finite read a device value at every step: inside a capture that
    is a CUDA error deep in the step; the capture raises first, with weights and state untouched."""
    model, opt = model_and_opt("torch", **option)
    low_rank_grads(model, 2, seed=0)
    opt.step()
    before = snapshot(model, opt)
    with capturing(), pytest.raises(RuntimeError, match="cannot be captured.*" + next(iter(option))):
        if layerwise:
            opt.step_param(model[0].weight)
        else:
            opt.step()
    assert same(snapshot(model, opt), before)


def test_layerwise_steps_captured_in_one_graph_replay_like_eager_layerwise_steps():
    """LayerwiseUpdates steps each parameter inside backward: one capture records all those steps (one
    record), and each replay counts every parameter once. Backend "torch" (the emulated replay reruns the
    backward, whose fresh CPU gradients the grouped tables would see as moved)."""
    from lowrank_kernels import LayerwiseUpdates

    batches = data(10)

    def run(graphed):
        model, opt = model_and_opt("torch")
        lw = LayerwiseUpdates(opt)
        static_x, static_y = batches[0][0].clone(), batches[0][1].clone()

        def train_step():
            lw.backward(nn.functional.mse_loss(model(static_x), static_y))

        train_step()
        if graphed:
            emulated_capture(opt, train_step)
            assert len(opt._engine().capture.items) == 6
        graph = EmulatedGraph(train_step)
        for x, y in batches[1:]:
            static_x.copy_(x)
            static_y.copy_(y)
            if not graphed:
                train_step()
            elif opt.refresh_due():  # asks the captured parameters although layer-wise freed their gradients
                train_step()
            else:
                opt.replay(graph)
        lw.remove()
        return model, opt, graph.replays

    eager_model, eager_opt, _ = run(False)
    model, opt, replays = run(True)
    assert replays == 7  # steps 2-10: the refreshes (steps 5 and 9, gap 4) run eagerly
    assert states(opt) == states(eager_opt)
    for a, b in zip(eager_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
