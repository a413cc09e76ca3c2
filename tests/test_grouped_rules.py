"""The update rules (fira, frugal, apollo, apollo-mini) in the grouped kernels, against the reference.

Without CUDA these run under TRITON_INTERPRET=1 (conftest.py) on small odd shapes. The oracle is
update_rules.run_step(backend "torch") (the reference math every backend uses per parameter).

Tolerances. fp32: both sides round each operation once in fp32 and differ in summation orders (the GEMMs,
the norms: the kernels sum squares of tiles and then channels, torch.norm in its own order, and the
limiter's ||S|| comes in closed form from those sums, not from S); a relative error of a few 1e-6 on the
change of W, hence rtol 1e-4 on W_T - W_0 norm-wise and 1e-5 elementwise-relative to W's scale. bf16: the
reference rounds to bf16 after every operation (the ratio, S, the limiter, the sum U) and the kernels keep
fp32 until the store, so the change of W agrees to a few bf16 ulps of the update: test_kernels' bf16 bound
(12% norm-wise on W_T - W_0; measured here: up to 9.6%, FRUGAL, whose sign step is a few ulps of W per step).
"""
import pytest
import torch

pytest.importorskip("triton")

from lowrank_kernels import reference  # noqa: E402
from lowrank_kernels.kernels import grouped_project_adam as gpa  # noqa: E402
from test_kernels import orthonormal  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_only_mode_writes_R(side, dtype):
    """adam=False: R = P^T G / G Q rounded to the gradient's dtype, in the N buffer; nothing else read."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(37, 23, 5), (23, 41, 9), (50, 19, 3)]
    problems, expected = [], []
    for m, n, r in shapes:
        G = torch.randn(m, n, generator=gen).to(DEVICE, dtype)
        basis = orthonormal(m if side == "left" else n, r, dtype, gen)
        low = (r, n) if side == "left" else (m, r)
        problems.append(dict(grad=G, basis=basis, N=torch.full(low, float("nan"), dtype=dtype, device=DEVICE)))
        expected.append(reference.project(G, basis, None) if side == "left" else reference.project(G, None, basis))
    table = gpa.build(side, problems, DEVICE, dtype, dtype, dtype, sms=0, adam=False)
    gpa.launch(table, torch.zeros(len(problems), 5, device=DEVICE))
    for p, R in zip(problems, expected):
        # fp32: summation order only; bf16: one rounding of the same fp32 sum, so at most one bf16 ulp
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-2)
        torch.testing.assert_close(p["N"].float(), R.float(), **tol)


# ---- the grouped API (kernels/grouped.py) per rule, against update_rules.run_step(backend "torch") --------
from lowrank_kernels import update_rules  # noqa: E402
from lowrank_kernels.kernels import grouped  # noqa: E402
from test_kernels import LOW_PRECISION_TOL, rel_err  # noqa: E402

RULES = ["fira", "frugal", "apollo", "apollo-mini"]
# (m, n, rank): tall, wide and near-square, no extent a multiple of a block size; ranks 5..9 (apollo-mini: 1)
SHAPES = [(37, 23, 5), (23, 41, 9), (50, 19, 7)]
STEPS = 4
GROWTH = {"grow": 1.6, "shrink": 0.6}  # gradient norm factor per step: the limiter triggers / does not


def group_of(rule, **extra):
    return dict(update=rule, inactive_lr_scale=0.3, scale_front=False, disable_nl=False, state_dtype=None,
                **extra)


def make_bucket(rule, side, dtype, shapes, gen):
    """Problems for the grouped step and their reference twins (independent copies)."""
    probs, twins = [], []
    for m, n, r in shapes:
        r = 1 if rule == "apollo-mini" else r
        low = (r, n) if side == "left" else (m, r)
        W = (torch.randn(m, n, generator=gen) * 0.1).to(DEVICE, dtype)
        basis = orthonormal(m if side == "left" else n, r, dtype, gen)
        M = (torch.randn(low, generator=gen) * 0.1).to(DEVICE, dtype)
        V = (torch.rand(low, generator=gen) * 0.01).to(DEVICE, dtype)
        prob = dict(param=W, grad=torch.randn(m, n, generator=gen).to(DEVICE, dtype), basis=basis, exp_avg=M,
                    exp_avg_sq=V, N=torch.empty(low, dtype=dtype, device=DEVICE),
                    limiter_norm=torch.zeros((), dtype=dtype, device=DEVICE), has_previous=False)
        probs.append(prob)
        twins.append(dict(param=W.clone(), basis=basis.clone(), state=dict(exp_avg=M.clone(), exp_avg_sq=V.clone())))
    return probs, twins


def run_rule(rule, side, dtype, growth, shapes=SHAPES, steps=STEPS, seed=0, group=None):
    """``steps`` grouped steps with new gradients (norm times ``growth`` each step), a changing lr, and a
    basis refresh (new orthonormal bases, same storage) before step 3. Returns probs, twins, start weights."""
    gen = torch.Generator().manual_seed(seed)
    group = group or group_of(rule)
    probs, twins = make_bucket(rule, side, dtype, shapes, gen)
    start = [p["param"].clone() for p in probs]
    limiting = rule == "fira" or (rule.startswith("apollo") and not group["disable_nl"])
    tables = grouped.build_projected_tables([dict(p, beta1=0.9, beta2=0.999, eps=1e-6) for p in probs], side,
                                            rule=rule, scale_front=group["scale_front"],
                                            limit=not group["disable_nl"])
    scalars = torch.zeros(len(probs), 4, device=DEVICE)
    scale, lr, wd = 0.25, 1e-2 if dtype == torch.float32 else 5e-2, 0.1
    for t in range(1, steps + 1):
        if t == 3:  # a refresh: new bases in the same storage, as the engine keeps them
            for p, twin in zip(probs, twins):
                new = orthonormal(*p["basis"].shape, dtype, gen)
                p["basis"].copy_(new)
                twin["basis"].copy_(new)
        grads = [(torch.randn(p["param"].shape, generator=gen) * growth ** t).to(DEVICE, dtype) for p in probs]
        lr_t = lr / t
        size = reference.adam_step_size(lr_t, 0.9, 0.999, t)
        scalars.copy_(torch.tensor([[size, scale, lr_t * wd, lr_t * scale * group["inactive_lr_scale"]]] * len(probs)))
        if limiting:
            tables.set_has_previous([t > 1] * len(probs))
        grouped.grouped_projected_step(tables, scalars, grads=grads)
        for twin, g in zip(twins, grads):
            P, Q = (twin["basis"], None) if side == "left" else (None, twin["basis"])
            update_rules.run_step("torch", group, twin["state"], twin["param"], g, P, Q, beta1=0.9, beta2=0.999,
                                  eps=1e-6, step_size=size, scale=scale, lr=lr_t, weight_decay=wd)
            twin.setdefault("norms", []).append(twin["state"].get("limiter_norm", torch.zeros(())).item())
    return probs, twins, start


def limited_steps(twin) -> int:
    """How many steps the reference's limiter scaled down (its remembered norm then grows by exactly 1.01)."""
    norms = twin["norms"]
    return sum(abs(b / a - 1.01) < 2e-3 for a, b in zip(norms, norms[1:]))


# fp32: rtol 1e-4 on W_T - W_0 norm-wise (module docstring); bf16: test_kernels' bound for galore (12%)
W_TOL = {torch.float32: 1e-4, torch.bfloat16: LOW_PRECISION_TOL[torch.bfloat16],
         torch.float16: LOW_PRECISION_TOL[torch.float16]}


def check_rule(rule, dtype, probs, twins, start, limited=None):
    for i, (p, twin, w0) in enumerate(zip(probs, twins, start)):
        moved = rel_err(twin["param"], w0)
        assert moved > 1e-3, f"problem {i}: the reference barely moved the weight ({moved:.3g}); vacuous test"
        err = rel_err(p["param"] - w0, twin["param"] - w0)
        assert err <= W_TOL[dtype], f"{rule} problem {i}: W_T - W_0 norm-wise error {err:.3g}"
        if dtype == torch.float32:  # elementwise too: a wrong channel would hide in a norm
            scale = (twin["param"] - w0).abs().max().item()
            torch.testing.assert_close(p["param"], twin["param"], rtol=1e-5, atol=1e-5 * scale)
        for key in ("exp_avg", "exp_avg_sq"):
            e = rel_err(p[key], twin["state"][key])
            assert e <= (1e-5 if dtype == torch.float32 else 2e-2), f"{rule} problem {i}: {key} error {e:.3g}"
        if "limiter_norm" in twin["state"]:
            torch.testing.assert_close(p["limiter_norm"].float(), twin["state"]["limiter_norm"].float(),
                                       rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=0)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_rule_matches_reference_fp32(rule, side):
    """One bucket mixing three shapes, four steps, a refresh before step 3, growing gradients: the limiter
    triggers."""
    probs, twins, start = run_rule(rule, side, torch.float32, GROWTH["grow"])
    check_rule(rule, torch.float32, probs, twins, start)
    if rule != "frugal":
        assert all(limited_steps(t) >= 1 for t in twins), [limited_steps(t) for t in twins]


@pytest.mark.parametrize("rule", ["fira", "apollo"])
def test_limiter_not_triggered(rule):
    """Shrinking gradients: steps where the limiter (with a previous norm) leaves the update alone."""
    probs, twins, start = run_rule(rule, "right", torch.float32, GROWTH["shrink"])
    check_rule(rule, torch.float32, probs, twins, start)
    assert any(limited_steps(t) == 0 for t in twins), [limited_steps(t) for t in twins]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_rule_matches_reference_bf16(rule, side):
    probs, twins, start = run_rule(rule, side, torch.bfloat16, GROWTH["grow"])
    check_rule(rule, torch.bfloat16, probs, twins, start)


@pytest.mark.parametrize("rule", RULES)
def test_rule_matches_reference_fp16(rule):
    """fp16 weights, gradients and moments (test_kernels' fp16 bound on W_T - W_0), both orientations."""
    for side in ("left", "right"):
        probs, twins, start = run_rule(rule, side, torch.float16, GROWTH["grow"])
        check_rule(rule, torch.float16, probs, twins, start)


@pytest.mark.parametrize("side", ["left", "right"])
def test_rank_axis_spanning_tiles(side):
    """Rank 70 > the fp32 tile edge (64): the norms' partials come from two rank tiles per channel."""
    for rule in ("fira", "apollo"):
        probs, twins, start = run_rule(rule, side, torch.float32, GROWTH["grow"], shapes=[(75, 90, 70), (37, 23, 5)],
                                       steps=2)
        check_rule(rule, torch.float32, probs, twins, start)


@pytest.mark.parametrize("options", [dict(scale_front=True), dict(disable_nl=True)])
@pytest.mark.parametrize("rule", ["apollo", "apollo-mini"])
def test_apollo_options(rule, options):
    """apollo-torch's scale_front (sqrt(scale) before the limiter) and disable_nl (no limiter, no state)."""
    group = {**group_of(rule), **options}
    probs, twins, start = run_rule(rule, "left", torch.float32, GROWTH["grow"], group=group, steps=3)
    check_rule(rule, torch.float32, probs, twins, start)
    assert ("limiter_norm" in twins[0]["state"]) == (not group["disable_nl"])


def test_frugal_sign_step():
    """FRUGAL's signSGD part alone (zero Adam step size, no decay): W moves by exactly residual_lr * sign(G - P R),
    every element by +-residual_lr where the residual is nonzero."""
    gen = torch.Generator().manual_seed(1)
    probs, _ = make_bucket("frugal", "left", torch.float32, [(37, 23, 5)], gen)
    p = probs[0]
    w0 = p["param"].clone()
    tables = grouped.build_projected_tables([dict(p, beta1=0.9, beta2=0.999, eps=1e-6)], "left", rule="frugal")
    grouped.grouped_projected_step(tables, torch.tensor([[0.0, 0.25, 0.0, 0.01]], device=DEVICE))
    residual = p["grad"] - p["basis"] @ (p["basis"].T @ p["grad"])
    assert (residual.abs() > 1e-5).all()
    torch.testing.assert_close(p["param"], w0 - 0.01 * torch.sign(residual), rtol=0, atol=1e-7)


# ---- through the optimizer: GaLoreAdamW(backend="triton") against backend="torch" ----------------------------
from torch import nn  # noqa: E402

import test_engine as te  # noqa: E402
from test_grouped_kernels import LaunchCounter, ordinary_launches  # noqa: E402

from lowrank_kernels import GaLoreAdamW  # noqa: E402
from lowrank_kernels.demo.model import GALORE_TARGETS, Llama, ModelConfig  # noqa: E402
from lowrank_kernels.hf import galore_param_groups  # noqa: E402
from lowrank_kernels.kernels import grouped_backproject_update as gbu  # noqa: E402
from lowrank_kernels.kernels import grouped_rule_scales as grs  # noqa: E402

RULE_KERNELS = {gpa._grouped_project_adam_kernel.fn.__name__, grs._grouped_rule_scales_kernel.fn.__name__,
                gbu._grouped_backproject_update_kernel.fn.__name__}
E2E_STEPS, E2E_GAP = 5, 3  # refreshes before steps 0 and 3


def model_params(seed=0):
    g = torch.Generator().manual_seed(seed)

    def P(*shape):
        return nn.Parameter(torch.randn(*shape, generator=g) * 0.1)

    return dict(fira_wide=P(23, 41), fira_tall=P(37, 23), frugal=P(29, 19), frugal_full=P(19, 26),
                apollo=P(21, 33), mini=P(31, 17), galore=P(26, 35), bias=P(13))


def model_groups(ps):
    common = dict(update_proj_gap=E2E_GAP, scale=0.5)
    return [
        {"params": [ps["fira_wide"], ps["fira_tall"]], "rank": 6, "update": "fira", "moments_on_refresh": "rotate",
         **common},
        {"params": [ps["frugal"]], "rank": 8, "update": "frugal", "inactive_lr_scale": 0.5, "rank_policy": "energy",
         "energy_threshold": 0.6, "projector": "warm", **common},
        {"params": [ps["frugal_full"]], "rank": 4, "update": "frugal", "proj_type": "full", **common},  # reference
        {"params": [ps["apollo"]], "rank": 7, "update": "apollo", "projector": "rsvd", **common},
        {"params": [ps["mini"]], "rank": 1, "update": "apollo-mini", "scale_front": True, **common},
        {"params": [ps["galore"]], "rank": 5, **common},
        {"params": [ps["bias"]]},
    ]


def make_opt(backend, seed=0):
    ps = model_params(seed)
    return ps, GaLoreAdamW(model_groups(ps), lr=1e-2, weight_decay=0.05, seed=3, backend=backend)


def grads_at(ps, step):
    """Gradients drawn independently of the weights (both runs refresh to the same bases), growing by 1.3
    per step so the limiters trigger."""
    g = torch.Generator().manual_seed(1000 + step)
    return {k: torch.randn(p.shape, generator=g) * 1.3 ** step for k, p in ps.items()}


def run_opt(ps, opt, steps=E2E_STEPS, start=0):
    for step in range(start, steps):
        if step == 2:
            for group in opt.param_groups:
                group["lr"] /= 2  # a schedule: frugal's residual_lr comes from the device table
        te.set_grads(ps, grads_at(ps, step))
        opt.step()


def test_optimizer_triton_matches_torch(monkeypatch):
    start = {n: p.detach().clone() for n, p in model_params().items()}
    ps_ref, ref = make_opt("torch")
    run_opt(ps_ref, ref)
    ps, opt = make_opt("triton")
    stepped = []
    original = opt._step_param
    monkeypatch.setattr(opt, "_step_param", lambda group, p, *a: (stepped.append(p), original(group, p, *a)))
    counter = LaunchCounter(monkeypatch)
    run_opt(ps, opt)
    monkeypatch.undo()
    assert RULE_KERNELS <= set(counter.counts)
    # only the full projection (no grouped kernel for it) took the per-parameter reference
    assert {id(p) for p in stepped} == {id(ps["frugal_full"])}
    for name, p in ps.items():
        p_ref, w0 = ps_ref[name], start[name]
        change = (p_ref.detach() - w0).abs().max().item()
        assert rel_err(p_ref.detach(), w0) > 1e-2, f"{name}: the reference barely moved; vacuous"
        # fp32: the module docstring's bound (elementwise, relative to the change's scale)
        torch.testing.assert_close(p.detach(), p_ref.detach(), rtol=1e-5, atol=1e-5 * change,
                                   msg=lambda m: f"{name}: {m}")
        s, s_ref = opt.state[p], ref.state[p_ref]
        assert s.keys() == s_ref.keys() and s["step"] == s_ref["step"], name
        for key in ("exp_avg", "exp_avg_sq", "limiter_norm"):
            if key in s:
                torch.testing.assert_close(s[key], s_ref[key], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name} {key}: {m}")
    limited = [name for name in ("fira_wide", "fira_tall", "apollo", "mini") if "limiter_norm" in opt.state[ps[name]]]
    assert len(limited) == 4
    assert opt.state[ps["frugal"]]["rank"] < 8  # the energy policy chose a rank (tables rebuilt)


def test_resume_with_rules_is_bit_exact():
    stop = E2E_GAP + 1  # after a refresh, with limiter norms in the checkpoint
    ps_a, full = make_opt("triton")
    run_opt(ps_a, full)
    ps_b, first = make_opt("triton")
    run_opt(ps_b, first, steps=stop)
    checkpoint = te._roundtrip({"params": {k: v.detach() for k, v in ps_b.items()}, "optim": first.state_dict()})
    ps_c, resumed = make_opt("triton")
    with torch.no_grad():
        for name, p in ps_c.items():
            p.copy_(checkpoint["params"][name])
    resumed.load_state_dict(checkpoint["optim"])
    run_opt(ps_c, resumed, start=stop)
    te.assert_states_equal(full, ps_a, resumed, ps_c)


def llama(layers, rule):
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=40, dim=32, n_layers=layers, n_heads=2, ffn_dim=48))
    groups = galore_param_groups(model, GALORE_TARGETS, rank=4, update_proj_gap=100)
    for group in groups:
        if "rank" in group:
            group["update"] = rule
    opt = GaLoreAdamW(groups, lr=1e-2, weight_decay=0.1, backend="triton")
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()  # the refresh step
    opt.step()  # the limiter flags flip (a table rewrite, no rebuild); the next step is ordinary
    return model, opt


def test_launches_per_ordinary_step_do_not_depend_on_depth(monkeypatch):
    counts = ordinary_launches(monkeypatch, lambda layers: llama(layers, "fira"), (1, 2))
    assert counts[1] == counts[2], counts
    # one launch of each of the three kernels per projected bucket (orientation x tile config), a handful
    launches = {counts[1][k] for k in RULE_KERNELS}
    assert len(launches) == 1 and launches.pop() <= 4, counts[1]


def test_layerwise_step_param_is_bit_identical_with_rules():
    """step_param one parameter at a time (backward order) equals the whole-model step, rules included."""
    ps_a, whole = make_opt("triton")
    ps_b, single = make_opt("triton")
    for step in range(E2E_GAP + 1):  # refreshes before steps 0 and E2E_GAP
        grads = grads_at(ps_a, step)
        te.set_grads(ps_a, grads)
        whole.step()
        te.set_grads(ps_b, grads)
        for p in reversed(list(ps_b.values())):
            single.step_param(p)
            p.grad = None
    te.assert_states_equal(whole, ps_a, single, ps_b)
