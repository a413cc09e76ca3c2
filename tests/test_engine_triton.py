"""The whole-model step with backend="triton": the grouped kernels (kernels/grouped.py) inside the engine.

Under TRITON_INTERPRET=1 on CPU (conftest.py), small odd shapes:

* against backend="torch" on one model mixing shapes, every orientation, a channels_last conv weight,
  ranks that change at refreshes (rank_policy="energy"), fp32 / fp16 / bf16 weights and moments,
  parameters without gradients, an lr and a betas change, across three refreshes;
* one launch per grouped kernel and bucket: a 2-layer and a 6-layer LLaMA launch the same kernels;
* bit-identical: layer-wise steps (step_param, LayerwiseUpdates) and whole-model steps; a resumed run;
* no host synchronisation in an ordinary step; tables cached, gradients re-pointed and not kept alive;
  the per-parameter fallback (full projections, layouts the multi-tensor kernel cannot walk) and its
  refusal under CUDA graph capture.

Tolerances (the per-parameter kernels' ones, tests/test_kernels.py, whose docstring derives them): fp32
elementwise rtol 1e-5, atol 1e-6 x the tensor's largest magnitude: both sides round every operation once
in fp32 and differ in the GEMMs' summation order and in alpha = fp32(step_size) * fp32(scale) (one
rounding more than torch's U = scale N, then W - step_size U); 16-bit norm-wise on W_T - W_0 (bf16 12%,
fp16 3%) and on the moments (bf16 2%, fp16 0.3%; fp32 moments of a 16-bit weight: the 16-bit eps, as an R
entry may round to a neighbour), because the reference rounds to the low dtype after every operation.
Measured here (7 steps): fp32 at most 5% of its bound; W_T - W_0 bf16 8.6%, fp16 1.4%; moments bf16 0.8%,
fp16 0.09%, fp32 moments of 16-bit weights 1e-7.
Bases are computed from the gradients alone (drawn independently of the weights), so both runs refresh
to the same bases and ranks and the comparison measures the kernels only. A wrong table entry (pointer,
stride, scalar row, problem index) is an O(1) error.
"""
import gc
import weakref

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import test_engine as te  # noqa: E402
from test_grouped_kernels import GROUPED_KERNELS, LaunchCounter, ordinary_launches  # noqa: E402
from test_kernels import assert_change_matches, assert_moment_matches, rel_err  # noqa: E402

from lowrank_kernels import GaLoreAdamW, cuda_graphs, engine  # noqa: E402
from lowrank_kernels.demo.model import GALORE_TARGETS, Llama, ModelConfig  # noqa: E402
from lowrank_kernels.hf import galore_param_groups  # noqa: E402
from lowrank_kernels.kernels import _tables, adamw, backproject_update, project_adam  # noqa: E402

STEPS, GAP = te.STEPS, te.GAP  # 7 steps, refreshes before steps 1, 4 and 7
PER_PARAMETER = {k.fn.__name__ for k in (project_adam._project_adam_kernel,
                                         backproject_update._backproject_update_kernel, adamw._adamw_kernel)}


def mixed_params(seed=0):
    """test_engine's mixed model plus fp16 weights, bf16 moments and a transposed unprojected weight."""
    ps = te.mixed_params(seed)
    g = torch.Generator().manual_seed(seed + 100)

    def P(*shape, dtype):
        return nn.Parameter((torch.randn(*shape, generator=g) * 0.1).to(dtype))

    ps.update(h16=P(22, 13, dtype=torch.float16), h16left=P(11, 27, dtype=torch.float16),
              b16=P(19, 23, dtype=torch.bfloat16), hbias=P(17, dtype=torch.float16),
              tw=nn.Parameter(P(7, 13, dtype=torch.float32).data.T))  # dense, not contiguous
    return ps


def make(backend="triton", seed=0, device_scalars=None):
    ps = mixed_params(seed)
    groups = te.mixed_groups(ps) + [
        {"params": [ps["h16"], ps["h16left"]], "rank": 4},
        {"params": [ps["b16"]], "rank": 5, "proj_type": "reverse_std"},  # bf16 moments
        {"params": [ps["hbias"], ps["tw"]]},
    ]
    for group in groups:
        if "rank" in group:
            group.update(update_proj_gap=GAP, scale=0.5)
    opt = GaLoreAdamW(groups, lr=1e-2, weight_decay=0.05, seed=7, backend=backend)
    opt._device_scalars = device_scalars
    return ps, opt


def run(ps, opt, steps=STEPS, start=0, schedule=True, ranks=None):
    for step in range(start, steps):
        if schedule and step == 4:  # an lr schedule and a betas change mid-run (tables: in place)
            for group in opt.param_groups:
                group["lr"] /= 2
            opt.param_groups[3]["betas"] = (0.85, 0.995)
        te.set_grads(ps, te.gradients(ps, step))
        opt.step()
        if ranks is not None:
            ranks.add(opt.state[ps["energy"]]["rank"])


def test_triton_whole_model_step_matches_torch(monkeypatch):
    start = {n: p.detach().clone() for n, p in mixed_params().items()}
    ps_ref, ref = make("torch")
    run(ps_ref, ref)
    ps, opt = make("triton")
    counter, ranks = LaunchCounter(monkeypatch), set()
    run(ps, opt, ranks=ranks)
    monkeypatch.undo()
    # the grouped kernels ran, and the per-parameter ones for full, conv (a copy) and tw (transposed)
    assert GROUPED_KERNELS <= set(counter.counts) and PER_PARAMETER <= set(counter.counts)
    assert len(ranks) > 1, f"the energy policy never changed a rank ({ranks}): the test would prove less"
    assert opt.state[ps["right"]]["step"] < STEPS  # a step without a gradient
    for name, p in ps.items():
        p_ref, w0 = ps_ref[name], start[name]
        assert rel_err(p_ref.detach(), w0) > 1e-2, f"{name}: the reference barely moved; vacuous"
        assert_change_matches(p.detach(), p_ref.detach(), w0, name)
        s, s_ref = opt.state[p], ref.state[p_ref]
        assert s.keys() == s_ref.keys() and s["step"] == s_ref["step"], name
        for key in ("proj_left", "proj_right", "rank", "refreshes"):
            if key in s:
                assert torch.equal(s[key], s_ref[key]) if torch.is_tensor(s[key]) else s[key] == s_ref[key]
        for key in ("exp_avg", "exp_avg_sq"):
            assert s[key].dtype == s_ref[key].dtype
            assert_moment_matches(s[key], s_ref[key], f"{name}: {key}", p.dtype)


def test_engine_table_is_the_kernels_scalars_layout():
    assert len(engine.SCALAR_COLUMNS) == _tables.SCALAR_COLUMNS
    assert engine.SCALAR_COLUMNS == ("step_size", "scale", "lr_weight_decay", "residual_lr")


# ---- launches ---------------------------------------------------------------------------------------------
def llama(layers, dtype=torch.float32):
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=40, dim=32, n_layers=layers, n_heads=2, ffn_dim=48)).to(dtype)
    opt = GaLoreAdamW(galore_param_groups(model, GALORE_TARGETS, rank=4, update_proj_gap=100), lr=1e-2,
                      weight_decay=0.1, backend="triton")
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    opt.step()  # the refresh step; the next one is ordinary
    return model, opt


def test_launches_per_ordinary_step_do_not_depend_on_depth(monkeypatch):
    """One dtype, every parameter: the grouped kernels per bucket plus, as on CUDA (forced here), the one
    launch of the device step scalars: 8 launches at any depth (issue 10's target: about 12 at most)."""
    def build(layers):
        model, opt = llama(layers)
        opt._fused_scalars = True
        return model, opt

    counts = ordinary_launches(monkeypatch, build, (2, 6))
    assert counts[2] == counts[6], counts
    assert set(counts[2]) == GROUPED_KERNELS | {"_advance_step_scalars_kernel"}, counts[2]
    assert sum(counts[2].values()) <= 12, counts[2]


# ---- bit-identical: layer-wise, resume --------------------------------------------------------------------
def test_layerwise_step_param_is_bit_identical_to_the_whole_model_step():
    ps_a, whole = make()
    ps_b, single = make()
    ranks = set()
    for step in range(GAP + 1):  # refreshes before steps 0 and GAP
        grads = te.gradients(ps_a, step)
        te.set_grads(ps_a, grads)
        whole.step()
        te.set_grads(ps_b, grads)
        for p in reversed(list(ps_b.values())):  # backward order, one parameter at a time
            if p.grad is not None:
                single.step_param(p)
                p.grad = None  # as LayerwiseUpdates does: the tables must not need it later
        ranks.add(whole.state[ps_a["energy"]]["rank"])
    assert len(ranks) > 1
    te.assert_states_equal(whole, ps_a, single, ps_b)


def test_layerwise_updates_are_bit_identical_with_triton(monkeypatch):
    import test_layerwise as tl

    data = tl.micro_batches(tl.ACCUM * 3)  # 3 optimizer steps: refreshes before steps 0 and 2
    ref_model, ref_opt, ref_sched = tl.make()
    ref_opt.backend = "triton"
    tl.ordinary(ref_model, ref_opt, ref_sched, data)
    model, opt, sched = tl.make()
    opt.backend = "triton"
    counter = LaunchCounter(monkeypatch)
    with tl.LayerwiseUpdates(opt, accumulation_steps=tl.ACCUM) as lw:
        for x, y in data:
            if lw.backward(model.loss(x, y) / tl.ACCUM):
                sched.step()
    monkeypatch.undo()
    assert set(counter.counts) == GROUPED_KERNELS
    tl.assert_same(ref_model, ref_opt, model, opt)


def test_resume_is_bit_exact_with_triton():
    stop, steps = GAP, GAP + 2  # resumed at a refresh (a rank change), then ordinary steps
    ps_a, full = make()
    run(ps_a, full, steps=steps)
    ps_b, first = make()
    run(ps_b, first, steps=stop)
    checkpoint = te._roundtrip({"params": {k: v.detach() for k, v in ps_b.items()}, "optim": first.state_dict()})
    ps_c, resumed = make()
    with torch.no_grad():
        for name, p in ps_c.items():
            p.copy_(checkpoint["params"][name])
    resumed.load_state_dict(checkpoint["optim"])
    run(ps_c, resumed, steps=steps, start=stop)
    te.assert_states_equal(full, ps_a, resumed, ps_c)


# ---- no host synchronisation, tables --------------------------------------------------------------------
def test_ordinary_triton_step_never_synchronises():
    ps, opt = make()
    te.set_grads(ps, te.gradients(ps, 1))
    opt.step()
    for step in range(2, GAP + 1):
        te.set_grads(ps, te.gradients(ps, step))  # new gradient tensors: the tables are re-pointed
        assert not opt.refresh_due()
        with te.Recorder() as ordinary:
            opt.step()
        assert not ordinary.syncs, f"host synchronisation in an ordinary step: {ordinary.syncs}"


def test_tables_cached_and_gradients_not_kept_alive():
    ps, opt = make()
    grads = {n: torch.randn(ps[n].shape).to(ps[n].dtype) if g is None else g for n, g in te.gradients(ps, 1).items()}
    te.set_grads(ps, grads)
    opt.step()
    eng = opt._engine()
    builds = eng.table_builds
    for _ in range(2):  # ordinary steps, fresh gradient tensors each time (zero_grad(set_to_none=True))
        te.set_grads(ps, grads)
        refs = [weakref.ref(p.grad) for p in ps.values()]
        opt.step()
        assert eng.table_builds == builds
        for p in ps.values():
            p.grad = None
        gc.collect()
        assert all(r() is None for r in refs), "a gradient outlived the step: the tables hold it"


def test_grouped_step_refuses_capture_when_a_parameter_needs_the_per_parameter_kernels(monkeypatch):
    ps, opt = make()
    te.set_grads(ps, te.gradients(ps, 1))
    opt.step()
    before = {n: p.detach().clone() for n, p in ps.items()}
    steps = {n: opt.state[p].get("step") for n, p in ps.items()}
    monkeypatch.setattr(cuda_graphs, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="per-parameter kernels"):
        opt.step()
    assert all(torch.equal(ps[n], before[n]) and opt.state[ps[n]].get("step") == steps[n] for n in ps)


def test_triton_rejects_float64_before_anything_changes():
    w = nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    b = nn.Parameter(torch.randn(5))
    opt = GaLoreAdamW([{"params": [b]}, {"params": [w], "rank": 2}], backend="triton")
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    before = b.detach().clone()
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        opt.step()
    assert torch.equal(b, before) and not any(opt.state.values())


# ---- device step scalars in one launch (kernels/step_scalars.py) -------------------------------------------
def test_fused_step_scalars_equal_the_torch_ops():
    """The one-launch advance against the torch-op one (engine._DeviceScalars.advance): the same counts, and
    step sizes equal in fp32 except where exp(t log b) and pow(b, t) (both float64) round across an fp32
    boundary: at most one fp32 ulp, and rarely (counted)."""
    from lowrank_kernels.engine import _DeviceScalars
    from lowrank_kernels.kernels.step_scalars import advance_step_scalars

    gen = torch.Generator().manual_seed(0)
    n = 300  # more than one block
    hyper = torch.stack([torch.rand(n, generator=gen, dtype=torch.float64) * 1e-2,     # lr
                         torch.rand(n, generator=gen, dtype=torch.float64) * 0.99,      # beta1 (0 included below)
                         0.9 + torch.rand(n, generator=gen, dtype=torch.float64) * 0.0999,
                         (torch.rand(n, generator=gen) < 0.8).double(),                # bias correction on/off
                         torch.ones(n, dtype=torch.float64)], dim=1)
    hyper[0, 1] = 0.0
    starts = torch.randint(0, 100_000, (n,), generator=gen).double()
    starts[:10] = torch.arange(10)
    a, b = _DeviceScalars(torch.device("cpu"), n), _DeviceScalars(torch.device("cpu"), n)
    for entry in (a, b):
        entry.steps.copy_(starts)
        entry.hyper.copy_(hyper)
        entry.host_steps = starts.tolist()
    for _ in range(3):
        a.advance(fused=False)
        advance_step_scalars(b.steps, b.hyper, b.table)
        assert torch.equal(a.steps, b.steps)
        torch.testing.assert_close(b.table[:, 0], a.table[:, 0], rtol=1.2e-7, atol=0)
        assert (b.table[:, 0] != a.table[:, 0]).sum() <= n // 20
    with pytest.raises(ValueError, match="float64"):
        advance_step_scalars(a.steps.float(), a.hyper, a.table)


def test_engine_with_fused_step_scalars_follows_the_torch_op_scalars(monkeypatch):
    """The whole-model step with the one-launch advance (forced on CPU; on CUDA it is the default for
    triton buckets) against the torch-op advance: one launch of it per step, and the same weights up to an
    fp32 ulp of a step size now and then (rtol 1e-6 after the mixed model's steps, lr and betas changed)."""
    runs = []
    for fused in (False, True):
        ps, opt = make("triton")
        opt._fused_scalars = fused
        counter = LaunchCounter(monkeypatch)
        run(ps, opt)
        monkeypatch.undo()
        runs.append((ps, counter.counts.get("_advance_step_scalars_kernel", 0)))
    (ref, none), (ps, launches) = runs
    assert none == 0 and launches == STEPS
    for name, p in ps.items():
        torch.testing.assert_close(p, ref[name], rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")
