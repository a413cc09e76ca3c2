"""An outside audit of the whole-model fused step (engine.py + the grouped kernels), beyond test_engine*.py:

* launches per ordinary step at depths 2, 5 and 9 for every option family (update rules, int8 moments,
  random/dct/warm/rsvd-energy bases, proj_type full, no weight decay, bf16, a mixed fp32+bf16 model), and
  the ops that touch floating-point data outside the kernels: independent of depth, <= 12 for one dtype;
* no host read of a tensor value (_local_scalar_dense) in an ordinary step in device-scalar mode, on both
  backends, layer-wise, right after load_state_dict, after deepcopy, after add_param_group, under an LR
  scheduler and with a tensor lr;
* grouped tables built once, rebuilt only when a tensor they point at changes shape (energy rank change,
  add_param_group, load_state_dict), never at an ordinary step or a refresh that keeps the ranks;
* batched rsvd refreshes: a weight's basis equals the single call with its own seed, whatever shares
  its batch (a same-shaped neighbour added or taken away);
* checkpoints taken mid-run resume bit-exactly on each backend and across backends;
* layer-wise steps with gradient accumulation equal whole-model steps, bit for bit, per option family;
* a model mixing orientations, ranks that change at refreshes, fp32/bf16/fp16, contiguous conv weights,
  frozen parameters and parameters without gradients against backend torch across 4 refreshes.

All under TRITON_INTERPRET=1 on CPU (conftest.py), small odd shapes (no multiple of a block size).
"""
import copy
import io

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import test_engine as te  # noqa: E402
from helpers import linear_stack  # noqa: E402
from test_kernels import assert_change_matches, assert_moment_matches, rel_err  # noqa: E402

from lowrank_kernels import GaLoreAdamW, engine, projection  # noqa: E402
from lowrank_kernels.layerwise import LayerwiseUpdates  # noqa: E402
from test_grouped_kernels import LaunchCounter as te_launches  # noqa: E402

ADV, MTA, GPA, GBU = ("_advance_step_scalars_kernel", "_multi_tensor_adamw_kernel", "_grouped_project_adam_kernel",
                      "_grouped_backproject_update_kernel")
GRS, INT8 = "_grouped_rule_scales_kernel", "_grouped_int8_adam_kernel"


def grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---- launches per ordinary step ---------------------------------------------------------------------------
class CountOnly:
    """Counts triton launches by kernel name WITHOUT running them (only how many launches a step makes is
    measured here, so depth 9 costs nothing under the interpreter)."""

    def __init__(self, monkeypatch):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
        self.counts = counts = {}

        def run(kernel, *args, **kwargs):
            counts[kernel.fn.__name__] = counts.get(kernel.fn.__name__, 0) + 1
        for cls in (JITFunction, InterpretedFunction):
            monkeypatch.setattr(cls, "run", run)


class FloatOps(te.TorchDispatchMode):
    """Counts aten ops that read or write floating-point data (not meta tensors, not the int64 host
    tables): on a GPU these would be launches or copies besides the triton kernels."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
        if any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta" for t in leaves):
            self.count += 1
        return out


FAMILIES = {
    "galore": {}, "fira": dict(update="fira"), "frugal": dict(update="frugal"), "apollo": dict(update="apollo"),
    "apollo-mini": dict(update="apollo-mini", rank=1), "int8": dict(state_dtype="int8"),
    "random": dict(projector="random"), "dct": dict(projector="dct"), "warm": dict(projector="warm"),
    "rsvd-energy": dict(projector="rsvd", rank_policy="energy", energy_threshold=0.5),
    "full": dict(proj_type="full"), "no-decay": {}, "bf16": {}, "fp32+bf16": {},
}


def family_stack(family, depth, backend="triton"):
    options = FAMILIES[family]
    projected = {"rank": 3, "update_proj_gap": 50, **options}
    plain = {"state_dtype": "int8"} if options.get("state_dtype") == "int8" else None
    model, opt = linear_stack(backend, depth=depth, projected=projected, plain=plain,
                              weight_decay=0.0 if family == "no-decay" else 0.01)
    if family == "bf16":
        model.to(torch.bfloat16)
    elif family == "fp32+bf16":
        for i, layer in enumerate(model):
            if i % 2:
                layer.to(torch.bfloat16)
    return model, opt


@pytest.mark.parametrize("family", list(FAMILIES))
def test_launches_per_ordinary_step_do_not_depend_on_depth(monkeypatch, family):
    """linear_stack's weights come in 4 shapes (29x13 and 40x29 right-projected, 29x40 and 7x29 left), each
    its own tile config, so B = 4 projected buckets per dtype at any depth (``_tile_configs`` keeps a
    problem's rounding the same in every launch: see engine's docstring). Per ordinary step: 1 launch of
    the device scalars, 2 per projected bucket (+1 for the limiting rules' scales), 1 multi-tensor AdamW
    per dtype (int8: one int8 launch per bucket instead), full projections 4 triton launches (+ a zero_).
    Measured: galore/frugal/random/dct/warm/rsvd-energy/no-decay/bf16 10, fira/apollo/apollo-mini 14,
    int8 14, full 18, fp32+bf16 11."""
    counts, float_ops = {}, {}
    for depth in (2, 5, 9):
        model, opt = family_stack(family, depth)
        opt._fused_scalars = True  # the one-launch advance, as on CUDA
        counter = CountOnly(monkeypatch)
        for seed in range(2):  # the refresh step, then the step where a limiter first has a norm
            grads(model, seed)
            opt.step()
        grads(model, 7)
        assert not opt.refresh_due()
        builds = opt._engine().table_builds
        counter.counts.clear()
        with FloatOps() as ops:
            opt.step()
        monkeypatch.undo()
        assert opt._engine().table_builds == builds, "an ordinary step rebuilt a table"
        counts[depth], float_ops[depth] = counter.counts, ops.count
    assert counts[2] == counts[5] == counts[9], counts
    assert float_ops[2] == float_ops[5] == float_ops[9], float_ops
    got = counts[2]
    buckets = 4
    if family in ("fira", "apollo", "apollo-mini"):
        expected = {ADV: 1, MTA: 1, GPA: buckets, GRS: buckets, GBU: buckets}
    elif family == "int8":
        expected = {ADV: 1, INT8: buckets + 1, GPA: buckets, GBU: buckets}
    elif family == "full":
        expected = {ADV: 1, MTA: 1, GPA: 2 * buckets, GBU: 2 * buckets}
    elif family == "fp32+bf16":  # fp32 layers 29x13, 29x40; bf16 layers 40x29, 7x29: still 4 buckets
        expected = {ADV: 1, MTA: 2, GPA: buckets, GBU: buckets}
    else:
        expected = {ADV: 1, MTA: 1, GPA: buckets, GBU: buckets}
    assert got == expected, got
    if family in ("galore", "bf16", "no-decay", "random", "dct", "warm", "rsvd-energy"):
        assert sum(got.values()) <= 12


# ---- no host read in an ordinary step ---------------------------------------------------------------------
def _small(backend, options=None, lr=1e-2, depth=1):
    model, opt = linear_stack(backend, depth=depth, projected={"rank": 3, "update_proj_gap": 5, **(options or {})},
                              plain={"state_dtype": "int8"} if (options or {}).get("state_dtype") == "int8" else None,
                              lr=lr)
    opt._device_scalars = True
    return model, opt


def _whole(model, opt):
    opt.step()


def _layerwise(model, opt):
    for p in reversed(list(model.parameters())):
        opt.step_param(p)


def _after_load(model, opt, backend, options):
    checkpoint = roundtrip({"model": model.state_dict(), "optim": opt.state_dict()})
    model, opt = _small(backend, options)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optim"])
    return model, opt, _whole


def _after_deepcopy(model, opt, backend, options):
    pair = copy.deepcopy((model, opt))  # one memo: the copy's optimizer steps the copy's parameters
    return pair[0], pair[1], _whole


def _after_add_param_group(model, opt, backend, options):
    extra = nn.Linear(11, 5)  # a new projected weight and a new plain bias
    model.append(extra)
    opt.add_param_group({"params": [extra.bias]})
    opt.add_param_group({"params": [extra.weight], "rank": 2, "update_proj_gap": 5, **options})
    grads(extra, 3)
    opt.step()  # the new weight's first step refreshes its basis (may read); the next one is ordinary
    return model, opt, _whole


def _under_scheduler(model, opt, backend, options):
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    return model, opt, lambda m, o: (o.step(), sched.step())


def _layerwise_accumulating(model, opt, backend, options):
    return model, opt, _layerwise


SCENARIOS = {"step": None, "layerwise": _layerwise_accumulating, "load_state_dict": _after_load,
             "deepcopy": _after_deepcopy, "add_param_group": _after_add_param_group, "scheduler": _under_scheduler}


def _assert_ordinary_steps_read_nothing(model, opt, stepper, steps=2, seed=10):
    for k in range(steps):
        grads(model, seed + k)
        assert not opt.refresh_due()
        with te.Recorder() as seen:
            stepper(model, opt)
        assert not seen.syncs, f"host read in an ordinary step: {seen.syncs}"


@pytest.mark.parametrize("backend,options", [("torch", {}), ("triton", {}), ("triton", {"update": "fira"}),
                                             ("triton", {"state_dtype": "int8"}), ("triton", {"projector": "dct"})],
                         ids=["torch", "triton", "triton-fira", "triton-int8", "triton-dct"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ordinary_steps_read_no_tensor_value(backend, options, scenario):
    """Device-scalar mode: no _local_scalar_dense and no device-to-host copy (test_engine.Recorder)."""
    model, opt = _small(backend, options)
    grads(model, 0)
    opt.step()  # the refresh
    grads(model, 1)
    opt.step()  # a limiting rule's first step with a previous norm (a table flag flips)
    stepper = _whole
    if SCENARIOS[scenario] is not None:
        model, opt, stepper = SCENARIOS[scenario](model, opt, backend, options)
    before = [p.detach().clone() for p in model.parameters()]
    _assert_ordinary_steps_read_nothing(model, opt, stepper)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "some parameter never moved"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scheduled", [False, True], ids=["constant", "scheduler"])
def test_tensor_lr_ordinary_steps_read_no_tensor_value(backend, scheduled):
    """A 1-element tensor lr: an ordinary step does not read it on the host while it is unchanged, and reads
    it once when a scheduler changed it (validation checks the value); the run equals the float-lr run."""
    lr = torch.tensor(1e-2, dtype=torch.float64)
    model, opt = _small(backend, lr=lr)
    ref_model, ref = _small(backend, lr=1e-2)
    scheds = [torch.optim.lr_scheduler.StepLR(o, 1, 0.5) for o in (opt, ref)] if scheduled else []
    for k in range(4):  # refresh at step 0, then ordinary steps
        for m, o in ((model, opt), (ref_model, ref)):
            grads(m, k)
            due = o.refresh_due()
            with te.Recorder() as seen:
                o.step()
            # unchanged: no read at all; changed in place by the scheduler: read once (not once per group
            # and parameter: 10 reads here before validation.lr_value), the host value the checks need
            allowed = 1 if scheduled and o is opt else 0
            assert due or len(seen.syncs) <= allowed, f"host reads in an ordinary step (step {k}): {seen.syncs}"
        for s in scheds:
            s.step()
    assert opt.param_groups[0]["lr"] is lr
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


# ---- grouped tables: built once, rebuilt only when a tensor they point at changes -------------------------
@pytest.mark.parametrize("options", [{}, {"update": "fira", "moments_on_refresh": "rotate"},
                                     {"state_dtype": "int8", "moments_on_refresh": "zero"},
                                     {"projector": "random"}, {"projector": "dct"}, {"proj_type": "full"}],
                         ids=["galore", "fira-rotate", "int8-zero", "random", "dct", "full"])
def test_tables_are_rebuilt_only_on_shape_changes(options):
    model, opt = _small("triton", options)
    eng = opt._engine()
    grads(model, 0)
    opt.step()  # first step: every bucket's tables are built
    built = eng.table_builds
    assert built >= 2
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.7)
    for k in range(1, 11):  # refreshes before steps 5 and 10: fixed ranks, so every tensor keeps its storage
        if k == 5:
            opt.param_groups[1]["betas"] = (0.8, 0.99)  # a hyperparameter edit rewrites tables in place
        grads(model, k)
        opt.step()
        sched.step()
        assert eng.table_builds == built, f"step {k}: tables rebuilt ({eng.table_builds - built})"
    assert opt.state[model[0].weight]["refreshes"] == 3
    # load_state_dict: new state tensors, so every bucket once more
    opt.load_state_dict(roundtrip(opt.state_dict()))
    grads(model, 20)
    opt.step()
    assert eng.table_builds == 2 * built
    # add_param_group: the buckets' composition changes
    extra = nn.Linear(11, 5)
    model.append(extra)
    opt.add_param_group({"params": [extra.weight, extra.bias]})
    grads(model, 21)
    opt.step()
    after_add = eng.table_builds
    assert after_add > 2 * built
    grads(model, 22)
    opt.step()
    assert eng.table_builds == after_add


def test_tables_rebuild_when_an_energy_refresh_changes_a_rank():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(23, 11) * 0.1)
    b = nn.Parameter(torch.randn(11) * 0.1)
    opt = GaLoreAdamW([{"params": [b]}, {"params": [w], "rank": 6, "update_proj_gap": 2, "rank_policy": "energy",
                                          "energy_threshold": 0.3}], lr=1e-2, backend="triton")
    g = torch.Generator().manual_seed(0)
    eng, history = opt._engine(), []
    for k in range(8):  # refreshes before steps 0, 2, 4, 6 with gradients of rank 1, 5, 1, 5
        r = 1 if k % 4 < 2 else 5
        w.grad = torch.randn(23, r, generator=g) @ torch.randn(r, 11, generator=g)
        b.grad = torch.randn(11, generator=g)
        before = eng.table_builds
        opt.step()
        history.append((opt.state[w]["rank"], eng.table_builds - before))
    ranks = [r for r, _ in history]
    assert len(set(ranks)) > 1, ranks
    for k, (rank, rebuilt) in enumerate(history):
        if k == 0:
            assert rebuilt == 2
        elif k % 2 or rank == history[k - 1][0]:
            assert rebuilt == 0, history  # ordinary step, or a refresh that kept the rank
        else:
            assert rebuilt == 1, history  # the projected bucket only


# ---- batched rsvd refreshes ---------------------------------------------------------------------------------
def _rsvd_bases(neighbour_shape, spy_calls, monkeypatch, backend="torch"):
    """Three weights in one group; the middle one's shape decides whether it shares the rsvd batch. The
    positions (and so the seeds) of the first and the last weight do not change."""
    g = torch.Generator().manual_seed(0)
    ws = [nn.Parameter(torch.randn(*s, generator=g) * 0.1) for s in ((19, 7), neighbour_shape, (19, 7))]
    opt = GaLoreAdamW([{"params": ws, "rank": 3, "update_proj_gap": 2, "projector": "rsvd"}], lr=1e-2,
                      seed=5, backend=backend)
    original = engine.rsvd_batched

    def spy(mats, k, seeds):
        spy_calls.append((len(mats), tuple(mats[0].shape)))
        return original(mats, k, seeds)

    monkeypatch.setattr(engine, "rsvd_batched", spy)
    bases = []
    for step in range(3):  # refreshes before steps 0 and 2
        gg = torch.Generator().manual_seed(100 + step)
        for w in (ws[0], ws[2]):
            w.grad = torch.randn(w.shape, generator=gg)
        ws[1].grad = torch.randn(ws[1].shape, generator=torch.Generator().manual_seed(999 + step))
        opt.step()
        if step != 1:
            bases.append([opt.state[ws[i]]["proj_right"].clone() for i in (0, 2)])
    monkeypatch.undo()
    return bases, ws, opt


def test_batched_rsvd_basis_does_not_depend_on_its_batch_neighbours(monkeypatch):
    calls_shared, calls_apart = [], []
    shared, ws, opt = _rsvd_bases((19, 7), calls_shared, monkeypatch)
    apart, _, _ = _rsvd_bases((17, 7), calls_apart, monkeypatch)
    assert (3, (19, 7)) in calls_shared and (2, (19, 7)) in calls_apart  # one batched call per shape
    for a, b in zip(shared, apart):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    # and each equals the single-weight rsvd with its own seed (the last refresh: count 1)
    positions = opt._positions()
    for i, w in ((0, ws[0]), (1, ws[2])):
        seed = projection.refresh_seed(5, positions[w][2], 1)
        gg = torch.Generator().manual_seed(102)
        G = [torch.randn(19, 7, generator=gg) for _ in range(2)][i]
        U, S, V = projection.BASIS_SOURCES["rsvd"](G, 3, seed, None, None)
        single = projection.compute_basis(G, "right", opt.param_groups[0], seed, {}, (U, S, V))
        assert torch.equal(single["proj_right"], shared[1][i])
    assert not torch.equal(shared[1][0], shared[1][1])  # different seeds, different gradients: different bases


def test_batched_rsvd_refresh_is_one_call_with_a_seed_tensor(monkeypatch):
    """The op sees ONE call per shape with a 1-D int64 tensor of per-element seeds."""
    import lowrank_kernels.linalg as linalg
    seen = []
    original = engine.rsvd

    def spy(A, k, **kwargs):
        seen.append((tuple(A.shape), kwargs.get("seed")))
        return original(A, k, **kwargs)

    monkeypatch.setattr(engine, "rsvd", spy)
    g = torch.Generator().manual_seed(0)
    ws = [nn.Parameter(torch.randn(13, 9, generator=g)) for _ in range(5)]
    opt = GaLoreAdamW([{"params": ws, "rank": 2, "projector": "rsvd"}], lr=1e-2, backend="triton")
    for w in ws:
        w.grad = torch.randn(w.shape, generator=g)
    opt.step()
    assert len(seen) == 1 and seen[0][0] == (5, 13, 9), seen
    seeds = seen[0][1]
    assert torch.is_tensor(seeds) and seeds.dtype == torch.int64 and seeds.shape == (5,)
    assert len(set(seeds.tolist())) == 5
    assert linalg is not None


# ---- checkpoints mid-run ------------------------------------------------------------------------------------
def lowrank_grads(model, step, seed=0):
    """Gradients of rank 1..3 varying with the step (so energy ranks change), drawn apart from the weights."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    for p in model.parameters():
        if p.dim() >= 2:
            m, n = projection.matrix_shape(p.shape)
            k = 1 + (step + m) % 3
            G = torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g) + 0.01 * torch.randn(m, n, generator=g)
        else:
            G = torch.randn(p.shape, generator=g)
        p.grad = G.reshape(p.shape).to(p.dtype)


CKPT_CASES = {  # (projected options, checkpoint after this many steps, steps in all); refreshes every 2 steps
    "between-refreshes": ({}, 3, 6),
    "before-a-refresh": ({"projector": "rsvd"}, 4, 6),
    "energy-ranks-changed": ({"projector": "rsvd", "rank_policy": "energy", "energy_threshold": 0.1,
                              "moments_on_refresh": "rotate"}, 4, 7),
    "int8": ({"state_dtype": "int8", "update": "galore"}, 3, 6),
    "lazy-mid-growth": ({"refresh_policy": "lazy", "similarity_threshold": 0.0, "patience": 1}, 4, 8),
    "fira": ({"update": "fira"}, 3, 5),
}


def _ckpt_stack(backend, options):
    return linear_stack(backend, depth=1, projected={"rank": 3, "update_proj_gap": 2, **options},
                        plain={"state_dtype": "int8"} if options.get("state_dtype") == "int8" else None, seed=3)


def _assert_same_run(model_a, opt_a, model_b, opt_b):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys(), name
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), (name, key)
            else:
                assert sa[key] == sb[key], (name, key)


# every case on each backend; across backends (both ways) the two whose state differs most from galore's
CKPT_RUNS = ([(case, (b, b)) for case in CKPT_CASES for b in ("torch", "triton")]
             + [(case, b) for case in ("energy-ranks-changed", "int8") for b in (("triton", "torch"), ("torch", "triton"))])


@pytest.mark.parametrize("case,backends", CKPT_RUNS, ids=[f"{c}-{'->'.join(b)}" for c, b in CKPT_RUNS])
def test_checkpoint_mid_run_resumes_bit_exactly(case, backends):
    """Saved after ``stop`` steps on backends[0], loaded into a fresh model and optimizer on backends[1]:
    equals the uninterrupted run that switches backend at the same step, bit for bit."""
    options, stop, steps = CKPT_CASES[case]
    full_model, full = _ckpt_stack(backends[0], options)
    ranks = set()
    for k in range(steps):
        if k == stop:
            full.backend = backends[1]
        lowrank_grads(full_model, k)
        full.step()
        ranks.add(full.state[full_model[0].weight]["rank"])
    model, opt = _ckpt_stack(backends[0], options)
    for k in range(stop):
        lowrank_grads(model, k)
        opt.step()
    checkpoint = roundtrip({"model": model.state_dict(), "optim": opt.state_dict()})
    resumed_model, resumed = _ckpt_stack(backends[1], options)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optim"])
    for k in range(stop, steps):
        lowrank_grads(resumed_model, k)
        resumed.step()
    _assert_same_run(full_model, full, resumed_model, resumed)
    state = full.state[full_model[0].weight]
    if case == "energy-ranks-changed":
        assert len(ranks) > 1, ranks
    if case == "lazy-mid-growth":
        assert state["refreshes"] == 3 and state.get("last_refresh") == 6, state.keys()
    if case == "int8":
        assert state["exp_avg"].dtype == torch.uint8


# ---- layer-wise steps with gradient accumulation ---------------------------------------------------------
LAYERWISE_FAMILIES = ["fira", "frugal", "apollo-mini", "int8", "dct", "full", "rsvd-energy", "fp32+bf16"]


@pytest.mark.parametrize("family", LAYERWISE_FAMILIES)
def test_layerwise_with_accumulation_is_bit_identical_to_the_whole_model_step(family):
    """LayerwiseUpdates(accumulation_steps=2) inside backward against backward twice, step(), zero_grad():
    3 optimizer steps with refreshes before the first and the third (gap 2), backend triton."""
    def build():
        model, opt = family_stack(family, 1)
        for group in opt.param_groups:
            if "rank" in group:
                group["update_proj_gap"] = 2
        return model, opt

    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(9, 13, generator=g), torch.randn(9, 7, generator=g)) for _ in range(6)]

    def loss(model, x, y):
        dtype = model[0].weight.dtype
        out = x.to(dtype)
        for layer in model:
            out = layer(out.to(layer.weight.dtype))
        return nn.functional.mse_loss(out.float(), y) / 2

    ref_model, ref = build()
    for i, (x, y) in enumerate(data):
        loss(ref_model, x, y).backward()
        if i % 2:
            ref.step()
            ref.zero_grad()
    model, opt = build()
    with LayerwiseUpdates(opt, accumulation_steps=2) as lw:
        for x, y in data:
            lw.backward(loss(model, x, y))
    start = family_stack(family, 1)[0]
    for a, w0 in zip(ref_model.parameters(), start.parameters()):
        assert not torch.equal(a, w0)
    _assert_same_run(ref_model, ref, model, opt)
    assert ref.state[ref_model[0].weight]["refreshes"] == 2


# ---- a mixed model against backend torch across refreshes with rank changes --------------------------------
def mixed_model(seed=0):
    g = torch.Generator().manual_seed(seed)

    def P(*shape, dtype=torch.float32, grad=True):
        return nn.Parameter((torch.randn(*shape, generator=g) * 0.1).to(dtype), requires_grad=grad)

    return {
        "conv32": P(8, 3, 3, 3), "conv16b": P(6, 4, 3, 3, dtype=torch.bfloat16),  # contiguous: grouped
        "tall16": P(21, 9, dtype=torch.float16), "wide16": P(9, 23, dtype=torch.float16),
        "left16b": P(17, 11, dtype=torch.bfloat16), "square": P(15, 15), "sometimes": P(19, 5),
        "frozen": P(13, 7, grad=False), "bias32": P(11), "bias16b": P(7, dtype=torch.bfloat16),
        "bias16": P(5, dtype=torch.float16),
    }


def mixed_optimizer(ps, backend):
    common = dict(update_proj_gap=2, scale=0.5)
    energy = dict(rank_policy="energy", energy_threshold=0.15, projector="rsvd", moments_on_refresh="rotate")
    return GaLoreAdamW([
        {"params": [ps["bias32"], ps["bias16b"], ps["bias16"]]},
        {"params": [ps["conv32"], ps["square"]], "rank": 5, **energy, **common},
        {"params": [ps["conv16b"]], "rank": 2, **common},
        {"params": [ps["tall16"]], "rank": 4, **energy, **common},
        {"params": [ps["wide16"]], "rank": 3, "proj_type": "reverse_std", "state_dtype": "float32", **common},
        {"params": [ps["left16b"]], "rank": 3, "proj_type": "left", "update": "fira", **common},
        {"params": [ps["sometimes"], ps["frozen"]], "rank": 2, "proj_type": "right", **common},
    ], lr=2e-2, weight_decay=0.05, seed=11, backend=backend)


def mixed_grads(ps, step):
    g = torch.Generator().manual_seed(500 + step)
    for name, p in ps.items():
        if not p.requires_grad or (name == "sometimes" and step % 3 == 1):
            p.grad = None
            continue
        if p.dim() >= 2:
            m, n = projection.matrix_shape(p.shape)
            k = 1 + (step * 2 + m) % 4
            G = torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g) + 0.02 * torch.randn(m, n, generator=g)
        else:
            G = torch.randn(p.shape, generator=g)
        p.grad = G.reshape(p.shape).to(p.dtype)


def test_mixed_model_follows_backend_torch_across_refreshes_with_rank_changes(monkeypatch):
    """7 steps, refreshes before steps 0, 2, 4, 6. Tolerances are the per-parameter kernels' (test_kernels'
    helpers, derived in tests/test_engine_triton.py's docstring): fp32 elementwise rtol 1e-5 / atol 1e-6 x
    the largest magnitude (same math, another GEMM summation order and one more rounding in the step
    size); 16-bit norm-wise on W_T - W_0 (bf16 12%, fp16 3%) and on the moments (bf16 2%, fp16 0.3%), since
    the reference rounds to the low dtype after every operation and the kernels once per stored value.
    Bases and ranks come from the gradients alone, so they must be EQUAL on both backends."""
    start = {n: p.detach().clone() for n, p in mixed_model().items()}
    runs = {}
    for backend in ("torch", "triton"):
        ps = mixed_model()
        opt = mixed_optimizer(ps, backend)
        ranks = []
        stepped_alone = []  # what took the per-parameter reference instead of the buckets
        original = opt._step_param
        monkeypatch.setattr(opt, "_step_param", lambda group, p, *a: (stepped_alone.append(p), original(group, p, *a)))
        counter = te_launches(monkeypatch) if backend == "triton" else None
        for step in range(7):
            mixed_grads(ps, step)
            opt.step()
            ranks.append((opt.state[ps["conv32"]]["rank"], opt.state[ps["square"]]["rank"],
                          opt.state[ps["tall16"]]["rank"]))
        monkeypatch.undo()
        if counter is not None:  # backend torch steps the rules (fira) per parameter, by design
            assert not stepped_alone  # every parameter in grouped launches, contiguous conv weights included
            assert set(counter.counts) == {MTA, GPA, GBU, GRS}, counter.counts
        runs[backend] = (ps, opt, ranks)
    (ps_ref, ref, ranks_ref), (ps, opt, ranks) = runs["torch"], runs["triton"]
    assert ranks == ranks_ref and len(set(ranks)) > 1, ranks
    assert ps["frozen"].grad is None and not opt.state.get(ps["frozen"]) and torch.equal(ps["frozen"], start["frozen"])
    assert opt.state[ps["square"]]["refreshes"] == 4 and opt.state[ps["sometimes"]]["step"] == 5
    for name, p in ps.items():
        if name == "frozen":
            continue
        p_ref, w0 = ps_ref[name].detach(), start[name]
        assert rel_err(p_ref, w0) > 1e-2, f"{name}: the reference barely moved; vacuous"
        assert_change_matches(p.detach(), p_ref, w0, name)
        s, s_ref = opt.state[p], ref.state[ps_ref[name]]
        assert s.keys() == s_ref.keys() and s["step"] == s_ref["step"], name
        for key in ("proj_left", "proj_right"):
            if key in s:
                assert torch.equal(s[key], s_ref[key]), (name, key)
        for key in ("exp_avg", "exp_avg_sq"):
            assert s[key].dtype == s_ref[key].dtype
            assert_moment_matches(s[key], s_ref[key], f"{name}: {key}", p.dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_warm_first_refresh_is_one_batched_rsvd_call(monkeypatch, backend):
    """projector="warm" starts with rsvd (no previous basis): the first refresh of same-shaped weights is
    one batched call like projector="rsvd"'s, and its bases equal the per-weight (layer-wise) ones bit for
    bit; later refreshes refine the previous basis and call no rsvd."""
    seen = []
    original = engine.rsvd

    def spy(A, k, **kwargs):
        seen.append(tuple(A.shape))
        return original(A, k, **kwargs)

    def build():
        g = torch.Generator().manual_seed(0)
        ws = [nn.Parameter(torch.randn(13, 9, generator=g) * 0.1) for _ in range(4)]
        return ws, GaLoreAdamW([{"params": ws, "rank": 2, "projector": "warm", "update_proj_gap": 2}], lr=1e-2,
                               backend=backend, seed=2)

    def set_grads(ws, step):
        g = torch.Generator().manual_seed(50 + step)
        for w in ws:
            w.grad = torch.randn(w.shape, generator=g)

    ws, opt = build()
    lw, lw_opt = build()
    monkeypatch.setattr(engine, "rsvd", spy)
    monkeypatch.setattr(projection, "rsvd", spy)  # the per-weight path's op
    for step in range(3):  # refreshes before steps 0 (rsvd) and 2 (warm)
        seen.clear()
        set_grads(ws, step)
        opt.step()
        assert seen == ([(4, 13, 9)] if step == 0 else []), (step, seen)
        set_grads(lw, step)
        for w in reversed(lw):
            lw_opt.step_param(w)
    monkeypatch.undo()
    _assert_same_run(nn.ParameterList(ws), opt, nn.ParameterList(lw), lw_opt)


# ---- one group per layer: per-problem hyperparameters share the launches -----------------------------------
def per_layer_groups(depth, backend):
    """Every weight and every bias in a group of its own, each with its own lr, betas, eps, scale and decay."""
    torch.manual_seed(0)
    dims = [13, 29] + [40, 29] * depth + [7]
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
    groups = []
    for i, layer in enumerate(model):
        groups.append({"params": [layer.weight], "rank": 3, "lr": 1e-2 * (1 + i), "betas": (0.9 - 0.02 * i, 0.999),
                       "scale": 0.25 + 0.5 * i, "weight_decay": 0.05 * (i % 2), "update_proj_gap": 2})
        groups.insert(0, {"params": [layer.bias], "lr": 2e-3 * (1 + i), "betas": (0.8, 0.99 - 0.002 * i),
                          "eps": 1e-8 * (i + 1), "weight_decay": 0.1 * (i % 3 == 0)})
    return model, GaLoreAdamW(groups, backend=backend)


def test_groups_per_layer_share_the_launches_and_their_scalar_rows(monkeypatch):
    """Launches do not depend on depth when every parameter has a group (and hyperparameters) of its own;
    each problem reads its own scalar row: the weights follow backend torch (fp32 bounds of test_kernels,
    a wrong row would be an O(1) error: lrs differ by up to 6x between layers)."""
    counts = {}
    for depth in (2, 9):
        model, opt = per_layer_groups(depth, "triton")
        opt._fused_scalars = True
        counter = CountOnly(monkeypatch)
        for seed in range(3):
            grads(model, seed)
            counter.counts.clear()
            opt.step()
        monkeypatch.undo()
        counts[depth] = counter.counts
    assert counts[2] == counts[9] == {ADV: 1, MTA: 1, GPA: 4, GBU: 4}, counts
    runs = []
    for backend in ("torch", "triton"):
        model, opt = per_layer_groups(1, backend)
        start = [p.detach().clone() for p in model.parameters()]
        for seed in range(4):  # refreshes before steps 0 and 2; an lr change at step 3
            if seed == 3:
                for group in opt.param_groups:
                    group["lr"] *= 0.5
            lowrank_grads(model, seed)
            opt.step()
        runs.append(model)
    for (name, a), b, w0 in zip(runs[0].named_parameters(), runs[1].parameters(), start):
        assert rel_err(a.detach(), w0) > 1e-3, name
        assert_change_matches(b.detach(), a.detach(), w0, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", [((512, 512), (1376, 512), (512, 1376), 128),      # LLaMA 60M
                                    ((4096, 4096), (11008, 4096), (4096, 11008), 1024)],  # LLaMA 7B
                         ids=["60M", "7B"])
def test_real_layouts_make_one_bucket_per_dtype_and_orientation(layout, dtype):
    """The tiny shapes above split an orientation by tile config; at real layouts (every extent past the
    capped tile sizes) all of a dtype's left- or right-projected weights share ONE tile config, so one
    bucket per (dtype, orientation): 1 + 1 + 2 x 2 = 6 launches per ordinary step for a one-dtype LLaMA."""
    *shapes, rank = layout
    configs = {}
    for m, n in shapes:
        side = projection.orientation("std", m, n)
        configs.setdefault(side, set()).add(engine._tile_configs(side, m, n, rank, dtype))
    assert {side: len(c) for side, c in configs.items()} == {"left": 1, "right": 1}
