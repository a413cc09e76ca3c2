"""The grouped int8-moment kernel (kernels/grouped_int8_adam.py) against quant.float_moments + the reference.

Exactness, not tolerances, for the state: the kernel's fp32 moments are torch's bit for bit
(_device.adam_moments uses torch's fmas), and its requantisation is quant.quantize's rule with correctly
rounded reciprocal and division, so at EVERY step the stored codes and absmax must EQUAL those of the
reference run (dequantise, reference.adam_normalize in fp32, quant.quantize). Chained: each step starts
from the codes the previous one stored, so one wrong code would also show in every later step.

N: bit-exact against N = M / (sqrt(V) + eps) with a correctly rounded sqrt. torch's fp32 CPU sqrt is not
correctly rounded (measured: ~20% of entries one ulp off, see test_torch_cpu_sqrt_is_not_exact), so against
reference.adam_normalize N may differ exactly where torch's sqrt does: by at most 2 ulps in fp32 (a 1-ulp
sqrt, then the division's rounding; measured 2), at most one ulp of a 16-bit N.

W (unprojected mode): test_kernels' tolerances (fp32 elementwise; 16-bit norm-wise on W_T - W_0): the
reference rounds W after the update and again after the decay (and rounds alpha= to 16 bits on CPU);
the kernel rounds once.

Runs under TRITON_INTERPRET=1 on CPU (conftest.py); sizes multiple of nothing: < 256, exactly one block,
several blocks with a short last one, several problems of different sizes in one launch.
"""
import pytest
import torch

pytest.importorskip("triton")

from lowrank_kernels import quant, reference  # noqa: E402
from lowrank_kernels.kernels import grouped_int8_adam as gia  # noqa: E402
from test_kernels import assert_change_matches  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HYPER = [(0.9, 0.999, 1e-8), (0.8, 0.99, 1e-6), (0.95, 0.98, 1e-8), (0.9, 0.999, 1e-6)]
# numel 300 (2 blocks, short last), 259 (1 + 3), 200 (< 256), 256 (one block), 1105 (5 blocks: 2 programs)
SHAPES = [(3, 100), (7, 37), (200,), (16, 16), (5, 221)]


def exact_n(m, v, eps, dtype):
    """N = M / (sqrt(V) + eps) in fp32 with a correctly rounded sqrt (fp64's, rounded once: exact for
    sqrt, since 53 >= 2 * 24 + 2), rounded to ``dtype``."""
    return (m / (v.double().sqrt().float() + eps)).to(dtype)


def within_ulps(x, ref, ulps):
    mag = ref.abs()
    ulp = (torch.nextafter(mag, torch.tensor(float("inf"), dtype=mag.dtype, device=mag.device)) - mag).float()
    return ((x.float() - ref.float()).abs() <= ulps * ulp).all()


def check_n(N, n_ref, m, v, eps, label):
    """N exactly the correctly rounded formula's; it differs from torch's only where torch's sqrt does."""
    exact = exact_n(m, v, eps, N.dtype)
    if N.is_cuda:
        # compiled, _device.adam_moments uses triton's fast sqrt and division (div.full.f32, <= 2 ulps):
        # a few fp32 ulps, at most one of a 16-bit N. CUDA torch's sqrt and division are IEEE.
        assert within_ulps(N, exact, 4 if N.dtype == torch.float32 else 1), f"{label}: N off M / (sqrt(V) + eps)"
        return
    assert torch.equal(N, exact), f"{label}: N differs from M / (sqrt(V) + eps) at {(N != exact).sum()} entries"
    sqrt_off = v.sqrt() != v.double().sqrt().float()
    differ = N != n_ref
    assert not (differ & ~sqrt_off).any(), f"{label}: N differs from the reference beyond torch's sqrt"
    # torch's sqrt is off by <= 1 ulp (2^-23 relative), and the division rounds once more: <= 2 fp32 ulps;
    # rounded to a 16-bit dtype that is at most one of its ulps.
    ulps = 2 if N.dtype == torch.float32 else 1
    assert within_ulps(N, n_ref, ulps), f"{label}: N over {ulps} ulps off the reference"


def make_state(shape, gen, scale=1.0):
    """Quantised moments of a random fp32 Adam state (zeros at ``scale=0``)."""
    m = torch.randn(shape, generator=gen) * 0.1 * scale
    v = torch.rand(shape, generator=gen) * 0.01 * scale
    state = {}
    for key, x in (("exp_avg", m), ("exp_avg_sq", v)):
        state[key], state[f"{key}_absmax"] = quant.quantize(x, quant.SIGNED[key])
    return {k: t.to(DEVICE) for k, t in state.items()}


def assert_state_equal(prob, twin, label):
    for k in gia.STATE_KEYS:
        assert torch.equal(prob[k], twin[k]), \
            f"{label}: {k} differs at {(prob[k] != twin[k]).sum().item()} of {prob[k].numel()} entries"


def gradient(shape, dtype, gen, step):
    """Magnitudes varying by 10^4 over the steps (absmax moves), with an exact-zero first block in the first
    steps of a zero state (an all-zero block: absmax 0)."""
    r = torch.randn(shape, generator=gen) * 10.0 ** (-3 + 4 * torch.rand((), generator=gen).item())
    if step <= 3:
        r.view(-1)[:256] = 0.0
    return r.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype, steps, shapes", [
    (torch.float32, 50, SHAPES),
    (torch.bfloat16, 50, SHAPES[1:3]),
    (torch.float16, 50, [SHAPES[0], SHAPES[3]]),
])
def test_projected_chain_equals_reference(dtype, steps, shapes):
    gen = torch.Generator().manual_seed(0)
    probs, twins = [], []
    for i, shape in enumerate(shapes):
        state = make_state(shape, gen, scale=0.0 if i == 0 else 1.0)  # problem 0 starts from zeros
        b1, b2, eps = HYPER[i % len(HYPER)]
        probs.append(dict(R=torch.empty(shape, dtype=dtype, device=DEVICE),
                          N=torch.empty(shape, dtype=dtype, device=DEVICE), beta1=b1, beta2=b2, eps=eps,
                          **{k: t.clone() for k, t in state.items()}))
        twins.append(state)
    tables = gia.build_int8_tables(probs, "projected")
    for t in range(1, steps + 1):
        for p in probs:  # R is a buffer the tables own: written in place, as the projection kernel does
            p["R"].copy_(gradient(p["R"].shape, dtype, gen, t))
        gia.int8_adam_step(tables)
        for i, (p, twin) in enumerate(zip(probs, twins)):
            label = f"{dtype} step {t} problem {i} {tuple(p['R'].shape)}"
            with quant.float_moments(twin) as (m, v):
                n_ref = reference.adam_normalize(p["R"], m, v, p["beta1"], p["beta2"], p["eps"])
                check_n(p["N"], n_ref, m, v, p["eps"], label)
            assert_state_equal(p, twin, label)
    assert tables.matches(probs)
    # the chain went through every regime: an all-zero block early, large and small absmax later
    assert twins[0]["exp_avg_absmax"][-1] > 0


def _squares_on(bounds):
    """For each unsigned midpoint b, an fp32 r with fl(r * r) == b where one exists (about half do)."""
    rs, hits = [], []
    for j, b in enumerate(bounds.tolist()):
        r = torch.tensor(b).sqrt()
        for cand in (r, torch.nextafter(r, torch.tensor(0.0)), torch.nextafter(r, torch.tensor(2.0))):
            if (cand * cand).item() == b:
                rs.append(cand.item())
                hits.append(j)
                break
    return rs, hits


def test_values_on_midpoints_take_the_lower_code():
    """beta1 = beta2 = 0 make M = R and V = fl(R * R) exactly, so moments can be put ON the midpoints."""
    ubounds = quant._on(False, torch.device("cpu"))[1]
    sbounds = quant._on(True, torch.device("cpu"))[1]
    ur, uhits = _squares_on(ubounds)
    assert len(uhits) > 60
    a = 0.7  # a block whose absmax is not a power of two, short: x / a is exactly the midpoint
    short = [b * a for b in sbounds[::3].tolist()]
    short = [x for x in torch.tensor(short).tolist() if torch.tensor(x) / torch.tensor(a) in sbounds]
    blocks = [[1.0] + sbounds.tolist(),                       # M on every signed midpoint, absmax 1
              [1.0] + ur + [0.0] * (255 - len(ur)),          # V on the reachable unsigned midpoints
              [a] + short]                                    # short last block
    R = torch.tensor(sum(blocks, []), dtype=torch.float32)
    state = make_state(R.shape, torch.Generator().manual_seed(1))
    prob = dict(R=R.to(DEVICE), N=torch.empty_like(R, device=DEVICE), beta1=0.0, beta2=0.0, eps=1e-8,
                **{k: t.clone() for k, t in state.items()})
    gia.int8_adam_step(gia.build_int8_tables([prob], "projected"))
    m, v = R, R * R
    codes_m, absmax_m = quant.quantize(m, True)
    codes_v, absmax_v = quant.quantize(v, False)
    assert torch.equal(prob["exp_avg"].cpu(), codes_m) and torch.equal(prob["exp_avg_absmax"].cpu(), absmax_m)
    assert torch.equal(prob["exp_avg_sq"].cpu(), codes_v) and torch.equal(prob["exp_avg_sq_absmax"].cpu(), absmax_v)
    # a value on midpoint j (between codes j and j + 1) takes code j
    assert torch.equal(codes_m[1:256].long(), torch.arange(255))
    assert torch.equal(codes_v[257 + torch.arange(len(ur))].long(), torch.tensor(uhits))
    assert len(short) > 20 and absmax_m[2] == a
    short_codes = codes_m[513:].long()
    assert torch.equal(sbounds[short_codes], torch.tensor(short) / torch.tensor(a))


def test_all_zero_block_stores_zero_absmax():
    prob = dict(R=torch.zeros(300, device=DEVICE), N=torch.full((300,), 7.0, device=DEVICE),
                **quant.zeros((300,), DEVICE))
    gia.int8_adam_step(gia.build_int8_tables([prob], "projected"), beta1=0.9, beta2=0.999, eps=1e-8)
    ref = quant.zeros((300,), "cpu")
    assert all(torch.equal(prob[k].cpu(), ref[k]) for k in gia.STATE_KEYS)
    assert (prob["exp_avg_absmax"] == 0).all() and (prob["N"] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unprojected_step_equals_reference(dtype):
    """The whole AdamW step on int8 moments against reference.galore_step(P = Q = None) in float_moments,
    with fresh gradient tensors every step (grads=) and per-problem hyperparameters and decays."""
    gen = torch.Generator().manual_seed(2)
    shapes, decays = [(37, 11), (300,), (16, 16)], [0.1, 0.0, 0.05]
    probs, twins = [], []
    for i, shape in enumerate(shapes):
        W = (torch.randn(shape, generator=gen) * 0.02).to(DEVICE, dtype)
        b1, b2, eps = HYPER[i]
        state = make_state(shape, gen, scale=0.0 if i == 0 else 1.0)
        probs.append(dict(param=W, grad=torch.zeros_like(W), beta1=b1, beta2=b2, eps=eps,
                          **{k: t.clone() for k, t in state.items()}))
        twins.append(dict(state, param=W.clone()))
    start = [p["param"].clone() for p in probs]
    tables = gia.build_int8_tables(probs, "unprojected")
    scalars = torch.zeros(len(shapes), 4, device=DEVICE)
    lr = 1e-2 if dtype == torch.float32 else 1e-1  # 16-bit: a step spans W's ulps
    for t in range(1, 7):
        grads = [gradient(s, dtype, gen, t) for s in shapes]
        step_sizes = [reference.adam_step_size(lr, p["beta1"], p["beta2"], t) for p in probs]
        scalars.copy_(torch.tensor([[s, 1.0, lr * wd, 0.0] for s, wd in zip(step_sizes, decays)]))
        gia.int8_adam_step(tables, scalars, grads=grads)
        for i, (p, twin, g) in enumerate(zip(probs, twins, grads)):
            with quant.float_moments(twin) as (m, v):
                reference.galore_step(twin["param"], g, None, None, m, v, beta1=p["beta1"], beta2=p["beta2"],
                                      eps=p["eps"], step_size=step_sizes[i], scale=1.0, lr=lr,
                                      weight_decay=decays[i])
            assert_state_equal(p, twin, f"{dtype} step {t} problem {i}")
    for i, (p, twin) in enumerate(zip(probs, twins)):
        assert_change_matches(p["param"], twin["param"], start[i], f"{dtype} problem {i} W")
    assert not tables.update_grads(grads)  # same tensors: no rewrite


def test_blocks_per_program_does_not_change_results():
    gen = torch.Generator().manual_seed(3)
    R = torch.randn(5, 221, generator=gen).to(DEVICE)
    state = make_state(R.shape, gen)
    out = []
    for blocks in (1, 2, 8):
        prob = dict(R=R, N=torch.empty_like(R), **{k: t.clone() for k, t in state.items()})
        gia.int8_adam_step(gia.build_int8_tables([prob], "projected", blocks_per_program=blocks),
                           beta1=0.9, beta2=0.999, eps=1e-8)
        out.append(prob)
    assert all(torch.equal(o[k], out[0][k]) for o in out[1:] for k in gia.STATE_KEYS + ("N",))


def test_torch_cpu_sqrt_is_within_one_ulp():
    """check_n's bound on N against the reference (2 fp32 ulps) assumes torch's fp32 CPU sqrt is off the
    correctly rounded one by at most 1 ulp (this build's is off at some entries; an exact one also passes)."""
    v = torch.rand(4096, generator=torch.Generator().manual_seed(4))  # CPU: the interpreter's reference
    assert within_ulps(v.sqrt(), v.double().sqrt().float(), 1)


def test_tables_and_errors():
    gen = torch.Generator().manual_seed(5)
    good = dict(R=torch.randn(3, 100, generator=gen).to(DEVICE), N=torch.empty(3, 100, device=DEVICE),
                **make_state((3, 100), gen))
    tables = gia.build_int8_tables([good], "projected")
    assert tables.matches([good])
    assert not tables.matches([dict(good, exp_avg=good["exp_avg"].clone())])  # a reallocated state
    before = {k: t.clone() for k, t in good.items()}
    bad = [
        (ValueError, "mode", [good], "both"),
        (TypeError, "uint8", [dict(good, exp_avg=good["exp_avg"].float())], "projected"),
        (ValueError, "absmax", [dict(good, exp_avg_absmax=good["exp_avg_absmax"][:1])], "projected"),
        (ValueError, "contiguous", [dict(good, R=torch.randn(100, 3, device=DEVICE).T)], "projected"),
        (TypeError, "differs from R", [dict(good, N=good["N"].half())], "projected"),
        (ValueError, "lacks", [dict(good, R=None)], "projected"),
    ]
    for exc, match, problems, mode in bad:
        with pytest.raises(exc, match=match):
            gia.build_int8_tables(problems, mode)
    with pytest.raises(ValueError, match="no scalars"):
        gia.int8_adam_step(tables, torch.zeros(1, 3, device=DEVICE), beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(ValueError, match="pass them to the step"):
        gia.int8_adam_step(tables)
    assert all(torch.equal(good[k], before[k]) for k in gia.STATE_KEYS)  # nothing ran
    with pytest.raises(ValueError, match="power of two"):
        gia.build_int8_tables([good], "projected", blocks_per_program=3)
    gia.int8_adam_step(gia.build_int8_tables([], "projected"), beta1=0.9, beta2=0.999, eps=1e-8)  # no-op


# ---- int8 moments in the whole-model step (GaLoreAdamW backend="triton": engine -> grouped.py) ------------
def _int8_model(backend, layers=1, **options):
    """Odd sizes: 300 x 5 moments span 6 blocks, 29 x 5 one short block."""
    from helpers import linear_stack
    return linear_stack(backend, layers, hidden=300, seed=3, plain=dict(state_dtype="int8"),
                        projected=dict(rank=5, update_proj_gap=3, state_dtype="int8", **options))


def _train(model, opt, steps, seed=1):
    from helpers import train_stack
    train_stack(model, opt, steps, seed)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_engine_int8_runs_the_grouped_kernels_and_follows_the_reference(monkeypatch, proj_type):
    """backend="triton" steps int8 groups with three launches per projected bucket (projection only, int8
    moments, back-projection) and one per unprojected one, whatever the depth; its weights follow the
    reference's (backend="torch") across a refresh. fp32: the kernels' GEMMs sum in another order, so R, and
    now and then a code at a midpoint, differ by an ulp: 1e-5 relative on the weights after 5 steps."""
    from test_grouped_kernels import LaunchCounter
    ref, ref_opt = _int8_model("torch", proj_type=proj_type)
    _train(ref, ref_opt, 5)
    ker, ker_opt = _int8_model("triton", proj_type=proj_type)
    _train(ker, ker_opt, 5)
    for (name, a), b in zip(ref.named_parameters(), ker.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
        assert ker_opt.state[b]["exp_avg"].dtype == torch.uint8
    counts = {}
    for layers in (1, 2):
        model, opt = _int8_model("triton", layers=layers, proj_type=proj_type)
        _train(model, opt, 1)  # the refresh step
        counter = LaunchCounter(monkeypatch)
        _train(model, opt, 1, seed=2)
        monkeypatch.undo()
        counts[layers] = counter.counts
    assert counts[1] == counts[2], counts
    assert counts[1][gia._grouped_int8_adam_kernel.fn.__name__] >= 2  # projected bucket(s) + the biases
    assert set(counts[1]) == {gia._grouped_int8_adam_kernel.fn.__name__,
                              "_grouped_project_adam_kernel", "_grouped_backproject_update_kernel"}, counts[1]
