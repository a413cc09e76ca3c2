"""The whole-model step engine (lowrank_kernels/engine.py) against the per-parameter path it replaced.

* host scalars (CPU default): bit-exact with the old per-parameter loop on a model mixing shapes, every
  orientation, conv weights, ranks that change at refreshes, dtypes, parameters without gradients;
* device scalars (CUDA default, forced here on CPU): close to the host path (the update is a
  multiply-add with a tensor step size instead of CPU's fused add_(alpha=)), bit-identical between
  layer-wise and whole-model steps, resumable from checkpoints, and free of host synchronisation;
* rsvd refreshes batched by shape with one seed per weight; triton tables cached; CUDA-graph API;
  torch.compile recompiles.
"""
import copy
import io

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank_kernels import GaLoreAdamW, cuda_graphs, engine, projection

STEPS, GAP = 7, 3  # refreshes before steps 1, 4 and 7


def mixed_params(seed=0, device="cpu"):
    """{name: parameter} covering every orientation, a channels_last conv weight, bf16, 1-D tensors."""
    g = torch.Generator().manual_seed(seed)

    def P(*shape, dtype=torch.float32):
        return nn.Parameter((torch.randn(*shape, generator=g) * 0.1).to(device, dtype))

    conv = P(8, 3, 3, 3)
    conv.data = conv.data.to(memory_format=torch.channels_last)
    return {
        "tall": P(30, 12), "wide": P(12, 30), "tall2": P(30, 12), "tall3": P(30, 12),  # rsvd batch of 3
        "rev": P(25, 14), "left": P(14, 25), "right": P(20, 22), "full": P(18, 16), "conv": conv,
        "energy": P(26, 20), "energy2": P(26, 20), "bf16": P(24, 10, dtype=torch.bfloat16),
        "bias": P(30), "emb": P(40, 6), "bias16": P(12, dtype=torch.bfloat16),
    }


def mixed_groups(ps):
    return [
        {"params": [ps["bias"], ps["emb"]]},
        {"params": [ps["bias16"]], "state_dtype": "float32", "weight_decay": 0.0},
        {"params": [ps["tall"], ps["wide"], ps["tall2"], ps["tall3"]], "rank": 4, "projector": "rsvd"},
        {"params": [ps["rev"]], "rank": 3, "proj_type": "reverse_std", "betas": (0.8, 0.99)},
        {"params": [ps["left"]], "rank": 5, "proj_type": "left", "lr": 3e-3},
        {"params": [ps["right"]], "rank": 2, "proj_type": "right", "moments_on_refresh": "zero"},
        {"params": [ps["full"]], "rank": 3, "proj_type": "full", "eps": 1e-3},
        {"params": [ps["conv"]], "rank": 3},
        {"params": [ps["energy"], ps["energy2"]], "rank": 6, "rank_policy": "energy", "energy_threshold": 0.3,
         "projector": "rsvd", "moments_on_refresh": "rotate"},
        {"params": [ps["bf16"]], "rank": 3, "state_dtype": "float32"},
    ]


def make(seed=0, per_parameter=False, device_scalars=None, device="cpu"):
    ps = mixed_params(seed, device)
    groups = mixed_groups(ps)
    for group in groups:
        if "rank" in group:
            group.update(update_proj_gap=GAP, scale=0.5)
    opt = GaLoreAdamW(groups, lr=1e-2, weight_decay=0.05, seed=7)
    opt._per_parameter_step = per_parameter
    opt._device_scalars = device_scalars
    return ps, opt


def gradients(ps, step, seed=1):
    """Low-rank-ish gradients whose rank varies with the step (so the energy policy changes ranks);
    a few parameters get none at some steps."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    out = {}
    for name, p in ps.items():
        if (name, step % 4) in (("right", 2), ("bias", 1), ("tall2", 0), ("energy2", 3)):
            out[name] = None
            continue
        if p.dim() >= 2:
            m, n = projection.matrix_shape(p.shape)
            k = 1 + (step * 3 + len(name)) % 6
            G = torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g) + 0.01 * torch.randn(m, n, generator=g)
            out[name] = G.reshape(p.shape).to(p.dtype)
        else:
            out[name] = torch.randn(p.shape, generator=g).to(p.dtype)
    return out


def set_grads(ps, grads):
    for name, p in ps.items():
        G = grads[name]
        p.grad = None if G is None else G.to(p.device).clone().to(memory_format=torch.contiguous_format)


def assert_states_equal(opt_a, ps_a, opt_b, ps_b, exact=True):
    for name in ps_a:
        a, b = ps_a[name], ps_b[name]
        if exact:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys(), name
        for key in sa:
            if torch.is_tensor(sa[key]):
                if exact:
                    assert torch.equal(sa[key], sb[key]), (name, key)
                else:
                    torch.testing.assert_close(sa[key], sb[key], msg=lambda m: f"{name} {key}: {m}")
            else:
                assert sa[key] == sb[key], (name, key)


def run(ps, opt, steps=STEPS, start=0):
    for step in range(start, steps):
        set_grads(ps, gradients(ps, step))
        opt.step()


# ---- correctness ------------------------------------------------------------------------------------------
def test_whole_model_step_is_bit_exact_with_the_per_parameter_path():
    ps_old, old = make(per_parameter=True)
    ps_new, new = make()
    ranks = set()
    for step in range(STEPS):
        grads = gradients(ps_old, step)
        for ps, opt in ((ps_old, old), (ps_new, new)):
            set_grads(ps, grads)
            opt.step()
        assert_states_equal(old, ps_old, new, ps_new)
        ranks.add(new.state[ps_new["energy"]]["rank"])
    assert len(ranks) > 1, f"the energy policy never changed a rank ({ranks}): the test would prove less"
    assert new.state[ps_new["tall"]]["refreshes"] == 3
    assert new.state[ps_new["right"]]["step"] < STEPS  # it skipped a step without a gradient


def test_device_scalars_match_host_scalars():
    """Forced device scalars on CPU: same math, the update applied as W + U * (-s) (two roundings
    instead of CPU's fused add_(alpha=)), so fp32 agrees to a few ulps, not bitwise."""
    ps_host, host = make()
    ps_dev, dev = make(device_scalars=True)
    run(ps_host, host)
    run(ps_dev, dev)
    assert_states_equal(host, ps_host, dev, ps_dev, exact=False)
    moved = (ps_dev["left"] - mixed_params()["left"]).norm() / ps_dev["left"].norm()
    assert moved > 1e-2


@pytest.mark.parametrize("device_scalars", [None, True])
def test_layerwise_is_bit_identical_to_the_whole_model_step(device_scalars):
    ps_a, whole = make(device_scalars=device_scalars)
    ps_b, single = make(device_scalars=device_scalars)
    for step in range(STEPS):
        grads = gradients(ps_a, step)
        set_grads(ps_a, grads)
        whole.step()
        set_grads(ps_b, grads)
        for p in reversed(list(ps_b.values())):  # backward order, one parameter at a time
            if p.grad is not None:
                single.step_param(p)
    assert_states_equal(whole, ps_a, single, ps_b)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("device_scalars", [None, True])
@pytest.mark.parametrize("stop", [3, 4])  # just before and at a refresh
def test_resume_is_bit_exact(device_scalars, stop):
    ps_a, full = make(device_scalars=device_scalars)
    run(ps_a, full)
    ps_b, first = make(device_scalars=device_scalars)
    run(ps_b, first, steps=stop)
    checkpoint = _roundtrip({"params": {k: v.detach() for k, v in ps_b.items()}, "optim": first.state_dict()})
    assert all(isinstance(s["step"], int) for s in checkpoint["optim"]["state"].values())  # as before
    ps_c, resumed = make(device_scalars=device_scalars)
    with torch.no_grad():
        for name, p in ps_c.items():
            p.copy_(checkpoint["params"][name])
    resumed.load_state_dict(checkpoint["optim"])
    run(ps_c, resumed, start=stop)
    assert_states_equal(full, ps_a, resumed, ps_c)


def test_deepcopy_and_pickle_start_with_empty_caches():
    ps, opt = make(device_scalars=True)
    run(ps, opt, steps=2)
    clone = copy.deepcopy(opt)
    assert clone._engine()._device_entries == {}
    assert isinstance(engine.StepEngine().__getstate__(), dict)


# ---- no host synchronisation ------------------------------------------------------------------------------
class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(), bool(t), float(t), int(t)
            self.syncs.append(func)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
            if src.device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu":
                self.syncs.append(func)
        return func(*args, **kwargs)


def test_ordinary_step_never_synchronises():
    ps, opt = make(device_scalars=True)
    set_grads(ps, gradients(ps, 1))  # every projected weight has a gradient at step 1
    with Recorder() as refresh:
        opt.step()  # a refresh step synchronises (the finite check, the energy rank): the recorder sees it
    assert refresh.syncs
    for step in range(2, GAP + 1):
        set_grads(ps, gradients(ps, step))
        assert not opt.refresh_due()
        with Recorder() as ordinary:
            opt.step()
        assert not ordinary.syncs, f"host synchronisation in an ordinary step: {ordinary.syncs}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [{}, {"update": "fira"}, {"update": "frugal"}, {"update": "apollo"},
                                     {"state_dtype": "int8"}, {"projector": "random"}, {"projector": "dct"},
                                     {"proj_type": "full"}, {"rank_policy": "energy", "projector": "rsvd"},
                                     {"check_finite": True}],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "galore")
def test_default_ordinary_steps_read_no_tensor_value(backend, options):
    """As a user would check it, without forcing device scalars: an ordinary step of a default optimizer
    reads no tensor value on the host (no _local_scalar_dense), on every option of the whole-model step.
    (On CPU such a read is not a device sync, but it is the op a CUDA run would block on; the CPU path's
    cached 0-dim scalars once leaked one per bucket through foreach_add's Tensor overload.)"""
    g = torch.Generator().manual_seed(3)
    ps = [nn.Parameter(torch.randn(13, 9, generator=g)), nn.Parameter(torch.randn(9, 11, generator=g)),
          nn.Parameter(torch.randn(7, generator=g))]
    opt = GaLoreAdamW([{"params": ps[:2], "rank": 3, "update_proj_gap": 4, **options}, {"params": ps[2:]}],
                      lr=1e-2, weight_decay=0.01, backend=backend)
    ordinary = 0
    for _ in range(6):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        due = opt.refresh_due()
        with Recorder() as seen:
            opt.step()
        if not due:
            ordinary += 1
            assert not seen.syncs, f"a tensor value read on the host in an ordinary step: {seen.syncs}"
    assert ordinary == 4  # refreshes at steps 1 and 5


def test_ordinary_step_runs_on_meta_tensors():
    """On meta tensors any read of a value (.item(), bool(), .tolist()) raises: a second, independent check."""
    groups = [g for g in mixed_groups(mixed_params(device="meta")) if g.get("rank_policy") != "energy"]
    ps = {f"{i}.{j}": p for i, g in enumerate(groups) for j, p in enumerate(g["params"])}
    opt = GaLoreAdamW(groups, lr=1e-2, weight_decay=0.1)
    opt._device_scalars = True
    for _ in range(3):
        for p in ps.values():
            p.grad = torch.empty_like(p)
        opt.step()
    assert all(opt.state[p]["step"] == 3 for p in ps.values())


# ---- refresh batching -------------------------------------------------------------------------------------
def test_rsvd_refreshes_are_batched_by_shape_with_a_seed_per_weight(monkeypatch):
    calls = []
    original = engine.rsvd_batched

    def spy(mats, k, seeds):
        calls.append((tuple(mats[0].shape), k, list(seeds)))
        out = original(mats, k, seeds)
        for A, seed, (U, S, V) in zip(mats, seeds, out):  # element i depends on its own seed only
            U1, S1, V1 = projection.BASIS_SOURCES["rsvd"](A.clone(), k, seed, None, None)
            assert torch.equal(U, U1) and torch.equal(S, S1) and torch.equal(V, V1)
        return out

    monkeypatch.setattr(engine, "rsvd_batched", spy)
    ps, opt = make()
    set_grads(ps, gradients(ps, 1))  # every parameter has a gradient at step 1
    opt.step()
    positions = opt._positions()
    expected = [projection.refresh_seed(7, positions[ps[n]][2], 0) for n in ("tall", "tall2", "tall3")]
    assert ((30, 12), 4, expected) in calls
    assert sorted(c[0] for c in calls) == [(12, 30), (26, 20), (30, 12)]
    assert len(set(expected)) == 3


# ---- CUDA graph API (host side) -------------------------------------------------------------------------
class CountingGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def test_refresh_due_advance_and_replay():
    """The host side of opt.replay on a (counting) graph: it refuses while a refresh is due; a capture counts
    nothing, each replay counts one step of exactly what the capture stepped; advance_host_counters moves
    the same counts. (tests/test_cuda_graphs.py emulates whole captures.)"""
    ps, opt = make(device_scalars=True)
    graph = CountingGraph()
    set_grads(ps, gradients(ps, 1))
    assert opt.refresh_due()  # no state yet
    with pytest.raises(RuntimeError, match="refresh is due"):
        opt.replay(graph)
    assert graph.replays == 0
    opt.step()
    assert not opt.refresh_due()
    assert "step" not in opt.state[ps["bias"]]  # no gradient at step 1
    steps = {n: opt.state[p]["step"] for n, p in ps.items() if n != "bias"}
    saved = cuda_graphs.capturing
    cuda_graphs.capturing = lambda device: True  # the host logic of a capture (its kernels do run on CPU)
    try:
        opt.step()
    finally:
        cuda_graphs.capturing = saved
    assert all(opt.state[ps[n]]["step"] == steps[n] for n in ps if n != "bias")  # the capture counted nothing
    opt.replay(graph)  # a replay of the captured ordinary step: host counters follow, for what it stepped
    assert graph.replays == 1 and all(opt.state[ps[n]]["step"] == steps[n] + 1 for n in ps if n != "bias")
    assert "step" not in opt.state[ps["bias"]]
    opt.advance_host_counters(GAP - 2)
    assert opt.refresh_due()  # the host mirror, not the device, schedules the refresh at step GAP
    refreshes = opt.state[ps["tall"]]["refreshes"]
    opt.step()
    assert opt.state[ps["tall"]]["refreshes"] == refreshes + 1


def test_refresh_keeps_storage_when_ranks_stay():
    """A refresh copies new bases and moments into the old tensors, so captured pointers stay valid."""
    ps, opt = make()
    run(ps, opt, steps=GAP)
    state = opt.state[ps["tall"]]
    before = {k: state[k].data_ptr() for k in ("proj_right", "exp_avg", "exp_avg_sq")}
    old_basis = state["proj_right"].clone()
    run(ps, opt, steps=GAP + 1, start=GAP)  # the refresh before step GAP + 1
    assert {k: state[k].data_ptr() for k in before} == before
    assert not torch.equal(state["proj_right"], old_basis)


# ---- triton tables ------------------------------------------------------------------------------------
def test_triton_tables_rebuilt_only_when_buckets_change():
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    w1, w2 = (nn.Parameter(torch.randn(20, 9, generator=g)) for _ in range(2))
    bias = nn.Parameter(torch.randn(9, generator=g))
    opt = GaLoreAdamW([{"params": [bias]}, {"params": [w1, w2], "rank": 3, "update_proj_gap": 2,
                                             "rank_policy": "energy", "energy_threshold": 0.5}],
                      lr=1e-2, backend="triton")
    for p in (w1, w2, bias):
        p.grad = torch.zeros_like(p)

    def step(k):  # gradients updated in place: same tensors, so only state changes trigger rebuilds
        G = torch.randn(20, k, generator=g) @ torch.randn(k, 9, generator=g)
        for p in (w1, w2):
            p.grad.copy_(G + 0.01 * torch.randn(20, 9, generator=g))
        bias.grad.copy_(torch.randn(9, generator=g))
        opt.step()

    eng = opt._engine()
    step(1)  # refresh: rank 1 or so
    builds = eng.table_builds
    assert builds == 2  # one projected bucket, one unprojected
    step(1)
    assert eng.table_builds == builds  # ordinary step: cached
    ranks = opt.state[w1]["rank"]
    step(3)  # refresh with another spectrum: the rank changes, the moments are new tensors
    assert opt.state[w1]["rank"] != ranks
    assert eng.table_builds == builds + 1
    extra = nn.Parameter(torch.randn(9, generator=g))
    extra.grad = torch.randn(9, generator=g)
    opt.add_param_group({"params": [extra]})
    step(3)
    assert eng.table_builds == builds + 2


# ---- torch.compile --------------------------------------------------------------------------------------
def test_compiled_train_step_does_not_recompile_per_step():
    """opt.step() is a graph break (it runs eagerly); nothing in it is guarded on, so steps spanning a
    refresh compile nothing new. (Tracing the step itself recompiled at every step until the cache limit.)"""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = GaLoreAdamW([{"params": [model[0].bias, model[2].bias]},
                       {"params": [model[0].weight, model[2].weight], "rank": 2, "update_proj_gap": 3}], lr=1e-2)
    counter = CompileCounter()

    @torch.compile(backend=counter)
    def train_step(x, y):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    g = torch.Generator().manual_seed(1)
    for step in range(8):  # refreshes before steps 1, 4 and 7
        train_step(torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g))
        if step == 1:
            after_two = counter.frame_count
    assert counter.frame_count == after_two <= 3
    assert opt.state[model[0].weight]["refreshes"] == 3 and opt.state[model[0].weight]["step"] == 8
    torch._dynamo.reset()


# ---- CUDA graphs on a GPU -------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_replay_equals_eager(backend):
    """Capture a whole ordinary training step (forward, backward, opt.step()) and replay it; refresh
    steps run eagerly. Equals the same loop run eagerly, bit for bit, through an lr and a betas change
    (uploaded by opt.replay). backend="triton": the grouped kernels read the device scalar table."""
    torch.manual_seed(0)
    data = [(torch.randn(16, 32, device="cuda"), torch.randn(16, 8, device="cuda")) for _ in range(10)]
    change_at = 6  # data index where the lr halves and, for triton, the betas change

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 8)).cuda()
        opt = GaLoreAdamW([{"params": [model[0].bias, model[2].bias]},
                           {"params": [model[0].weight, model[2].weight], "rank": 4, "update_proj_gap": 4}],
                          lr=1e-2, weight_decay=0.1, backend=backend)
        return model, opt

    def loss_of(model, x, y):
        return nn.functional.mse_loss(model(x), y)

    def schedule(opt, i):
        if i == change_at:
            for group in opt.param_groups:
                group["lr"] /= 2
                if backend == "triton":  # backend "torch" bakes the betas in at capture (documented)
                    group["betas"] = (0.85, 0.99)

    eager_model, eager_opt = build()
    for i, (x, y) in enumerate(data):
        schedule(eager_opt, i)
        eager_opt.zero_grad(set_to_none=False)
        loss_of(eager_model, x, y).backward()
        eager_opt.step()

    model, opt = build()
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # eager warm-up: the first step refreshes
        opt.zero_grad(set_to_none=False)
        loss_of(model, static_x, static_y).backward()
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static_x.copy_(data[1][0])
    static_y.copy_(data[1][1])
    with torch.cuda.graph(graph):
        opt.zero_grad(set_to_none=False)
        loss_of(model, static_x, static_y).backward()
        opt.step()
    replays = 0  # the capture ran and counted nothing: every replay, the first too, is one step
    for i, (x, y) in enumerate(data[1:], start=1):
        schedule(opt, i)
        static_x.copy_(x)
        static_y.copy_(y)
        if opt.refresh_due():
            opt.zero_grad(set_to_none=False)
            loss_of(model, static_x, static_y).backward()
            opt.step()
        else:
            opt.replay(graph)
            replays += 1
    assert replays >= 5
    for a, b in zip(eager_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
        assert opt.state[b]["step"] == eager_opt.state[a]["step"] == len(data)
