"""The strategy axes beyond galore-torch: energy rank, moments at a switch, lazy and converged refresh,
warm-started bases; each against its rule, across rank changes and checkpoints."""
import io

import pytest
import torch
from torch import nn

from lowrank_kernels import GaLoreAdamW
from lowrank_kernels import projection
from lowrank_kernels.reference import project

from test_rsvd import decaying, residual_ratio


def spectrum_matrix(m, n, values, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(values), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(values), generator=g, dtype=torch.float64)).Q
    return ((U * torch.tensor(values, dtype=torch.float64)) @ V.T).float()


def _opt(weight, **group):
    return GaLoreAdamW([{"params": [weight], **group}], lr=1e-2, weight_decay=0.01)


# ---- rank policy --------------------------------------------------------------------------------------
@pytest.mark.parametrize("projector", ["svd", "rsvd"])
def test_energy_rank_is_smallest_rank_within_threshold(projector):
    values = [10.0, 6.0, 3.0, 1.0, 0.5, 0.2, 0.1]
    G = spectrum_matrix(40, 30, values)
    total = sum(v * v for v in values)
    for xi in (0.05, 0.2, 0.5):
        expected = next(r for r in range(1, 8) if sum(v * v for v in values[r:]) <= xi * xi * total)
        w = nn.Parameter(torch.zeros(40, 30))
        opt = _opt(w, rank=8, rank_policy="energy", energy_threshold=xi, projector=projector)
        w.grad = G.clone()
        opt.step()
        state = opt.state[w]
        assert state["rank"] == expected, xi
        assert state["proj_right"].shape == (30, expected) and state["exp_avg"].shape == (40, expected)


def test_energy_rank_is_clamped():
    G = spectrum_matrix(40, 30, [10.0, 0.01, 0.01])
    w = nn.Parameter(torch.zeros(40, 30))
    opt = _opt(w, rank=8, rank_policy="energy", min_rank=3, max_rank=6)
    w.grad = G
    opt.step()
    assert opt.state[w]["rank"] == 3
    G = decaying(40, 30, decay=0.99)
    w2 = nn.Parameter(torch.zeros(40, 30))
    opt2 = _opt(w2, rank=8, rank_policy="energy", energy_threshold=0.01, max_rank=6)
    w2.grad = G
    opt2.step()
    assert opt2.state[w2]["rank"] == 6


def test_energy_rank_bounds_checked_at_construction():
    with pytest.raises(ValueError, match="rank=30"):
        _opt(nn.Parameter(torch.zeros(40, 30)), rank=8, rank_policy="energy", max_rank=30)
    with pytest.raises(ValueError, match="Invalid max_rank"):
        _opt(nn.Parameter(torch.zeros(40, 30)), rank=8, rank_policy="energy", min_rank=5, max_rank=4)
    with pytest.raises(ValueError, match="Invalid energy_threshold"):
        _opt(nn.Parameter(torch.zeros(40, 30)), rank=8, rank_policy="energy", energy_threshold=1.5)


# ---- moments at a switch ------------------------------------------------------------------------------
def _two_refreshes(moments, G1, G2, proj_type="left", **group):
    w = nn.Parameter(torch.zeros(G1.shape))
    opt = _opt(w, rank=3, update_proj_gap=1, moments_on_refresh=moments, proj_type=proj_type, **group)
    w.grad = G1.clone()
    opt.step()
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[w].items()}
    w.grad = G2.clone()
    opt.step()
    return before, opt.state[w]


@pytest.mark.parametrize("proj_type", ["left", "right", "full"])
def test_zero_moments_restart_with_bias_correction(proj_type):
    G1, G2 = decaying(20, 16, seed=1), decaying(20, 16, seed=2)
    _, after = _two_refreshes("zero", G1, G2, proj_type)
    R = project(G2, *projection.basis_of(after))
    torch.testing.assert_close(after["exp_avg"], 0.1 * R)
    torch.testing.assert_close(after["exp_avg_sq"], 0.001 * R * R)
    assert after["moment_start"] == 1 and after["step"] == 2


@pytest.mark.parametrize("proj_type", ["left", "right", "full"])
def test_rotate_moments_follow_the_basis_change(proj_type):
    G1, G2 = decaying(20, 16, seed=1), decaying(20, 16, seed=2)
    before, after = _two_refreshes("rotate", G1, G2, proj_type)
    m, v = before["exp_avg"], before["exp_avg_sq"]
    if "proj_left" in after:
        T = after["proj_left"].T @ before["proj_left"]
        m, v = T @ m, T.square() @ v
    if "proj_right" in after:
        T = after["proj_right"].T @ before["proj_right"]
        m, v = m @ T.T, v @ T.square().T
    R = project(G2, *projection.basis_of(after))
    torch.testing.assert_close(after["exp_avg"], 0.9 * m + 0.1 * R)
    torch.testing.assert_close(after["exp_avg_sq"], 0.999 * v + 0.001 * R * R)
    assert (after["exp_avg_sq"] >= 0).all()


def test_rotate_in_the_same_subspace_is_keep():
    """When the new basis equals the old one, rotating changes nothing."""
    G = decaying(20, 16, seed=3)
    kept, k_after = _two_refreshes("keep", G, G)
    rotated, r_after = _two_refreshes("rotate", G, G)
    torch.testing.assert_close(r_after["exp_avg"], k_after["exp_avg"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r_after["exp_avg_sq"], k_after["exp_avg_sq"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("moments", ["keep", "zero", "rotate"])
@pytest.mark.parametrize("proj_type", ["left", "right", "full"])
def test_moment_rules_handle_rank_changes(moments, proj_type):
    G1 = spectrum_matrix(20, 16, [5.0, 4.0, 3.0, 2.0, 1.0])        # energy rank 5 at xi=0.05
    G2 = spectrum_matrix(20, 16, [5.0, 0.01], seed=4)               # energy rank 1
    before, after = _two_refreshes(moments, G1, G2, proj_type, rank_policy="energy", energy_threshold=0.05,
                                   max_rank=6)
    assert before["rank"] == 5 and after["rank"] == 1
    shape = projection.lowrank_shape(projection.orientation(proj_type, 20, 16), 20, 16, 1)
    assert after["exp_avg"].shape == after["exp_avg_sq"].shape == shape
    if moments == "keep":  # the leading coordinate's moments carried on
        lead = before["exp_avg"][:1, :] if proj_type == "left" else before["exp_avg"][:, :1]
        if proj_type == "full":
            lead = before["exp_avg"][:1, :1]
        R = project(G2, *projection.basis_of(after))
        torch.testing.assert_close(after["exp_avg"], 0.9 * lead + 0.1 * R)


# ---- refresh policies ---------------------------------------------------------------------------------
def _run(weight, opt, grads):
    for G in grads:
        weight.grad = G.clone()
        opt.step()


def test_lazy_refresh_stretches_the_gap_while_bases_agree():
    G = decaying(24, 18, seed=5)
    w = nn.Parameter(torch.zeros(24, 18))
    opt = _opt(w, rank=4, update_proj_gap=2, refresh_policy="lazy", patience=2, gap_growth=2)
    _run(w, opt, [G] * 15)
    state = opt.state[w]
    # refreshes at 0, 2, 4 (second similar refresh: gap 2 -> 4), 8, 12 (gap 4 -> 8)
    assert state["refreshes"] == 5 and state["gap"] == 8 and state["last_refresh"] == 12


def test_lazy_refresh_keeps_the_gap_when_bases_change():
    w = nn.Parameter(torch.zeros(24, 18))
    opt = _opt(w, rank=4, update_proj_gap=2, refresh_policy="lazy", similarity_threshold=0.99)
    _run(w, opt, [decaying(24, 18, seed=s) for s in range(9)])
    assert opt.state[w]["refreshes"] == 5 and opt.state[w]["gap"] == 2


def test_converged_refresh_on_a_steady_projected_gradient():
    G = decaying(24, 18, seed=6)
    w = nn.Parameter(torch.zeros(24, 18))
    opt = _opt(w, rank=4, update_proj_gap=100, refresh_policy="converged", convergence_tol=0.01)
    _run(w, opt, [G] * 7)
    # step 0 refreshes; steps 1 records ||R||; step 2 sees no change and refreshes; and so on
    assert opt.state[w]["refreshes"] == 4


def test_converged_refresh_waits_while_the_gradient_moves_but_respects_the_gap():
    w = nn.Parameter(torch.zeros(24, 18))
    opt = _opt(w, rank=4, update_proj_gap=4, refresh_policy="converged", convergence_tol=1e-6)
    grads = [decaying(24, 18, seed=s) * (1.0 + s) for s in range(9)]
    _run(w, opt, grads)
    assert opt.state[w]["refreshes"] == 3 and opt.state[w]["last_refresh"] == 8


# ---- warm-started basis --------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_warm_start_is_accurate_on_a_drifting_gradient(side):
    base = decaying(120, 90, decay=0.8, seed=7)
    drifted = base + 0.05 * decaying(120, 90, decay=0.8, seed=8)
    k = 10
    U, S, V = projection._svd_source(base, k, 0, side, {})
    previous = {"proj_left": U} if side == "left" else {"proj_right": V}
    U2, S2, V2 = projection._warm_source(drifted, k, 1, side, previous)
    ratio = residual_ratio(drifted, U2, k) if side == "left" else residual_ratio(drifted.T, V2, k)
    assert ratio <= 1.05
    torch.testing.assert_close(S2, torch.linalg.svdvals(drifted)[:k], rtol=1e-3, atol=1e-5)


# ---- every option together: training runs, checkpoints resume exactly ---------------------------------
OPTIONS = [
    dict(projector="warm", rank_policy="energy", energy_threshold=0.3, moments_on_refresh="rotate"),
    dict(projector="rsvd", rank_policy="energy", energy_threshold=0.5, moments_on_refresh="zero",
         refresh_policy="lazy", similarity_threshold=0.1, patience=1),
    dict(projector="svd", moments_on_refresh="rotate", refresh_policy="converged", convergence_tol=0.2),
]


def _model_and_opt(options, proj_type, backend="torch", device="cpu"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 6)).to(device)
    weights = [p for p in model.parameters() if p.dim() == 2]
    biases = [p for p in model.parameters() if p.dim() == 1]
    opt = GaLoreAdamW([{"params": biases},
                       {"params": weights, "rank": 5, "update_proj_gap": 3, "proj_type": proj_type, **options}],
                      lr=1e-2, weight_decay=0.01, seed=3, backend=backend)
    return model, opt


def _train(model, opt, data):
    """Train; return the per-step tuple of the projected weights' current ranks."""
    ranks = []
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ranks.append(tuple(opt.state[p]["rank"] for p in model.parameters() if p.dim() == 2))
    return ranks


@pytest.mark.parametrize("options", OPTIONS, ids=["warm-energy-rotate", "rsvd-energy-zero-lazy", "svd-rotate-converged"])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_options_train_and_resume_exactly(options, proj_type):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 12, generator=g), torch.randn(16, 6, generator=g)) for _ in range(12)]
    model, opt = _model_and_opt(options, proj_type)
    ranks = _train(model, opt, data)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if options.get("rank_policy") == "energy":  # the resume below must cross rank changes
        assert len(set(ranks[5:])) > 1

    first, opt1 = _model_and_opt(options, proj_type)
    _train(first, opt1, data[:5])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    resumed, opt2 = _model_and_opt(options, proj_type)
    resumed.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["optim"])
    _train(resumed, opt2, data[5:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options", OPTIONS, ids=["warm-energy-rotate", "rsvd-energy-zero-lazy", "svd-rotate-converged"])
def test_fused_path_runs_every_option(options):
    """The Triton step under every strategy, ranks changing at refreshes, against the reference step.

    Both optimizers see the same gradients (the reference model's), so their bases and ranks are
    decided from identical inputs; the step math then differs only in fp32 summation order.
    """
    pytest.importorskip("triton", reason="triton not installed")
    # CPU tensors run Triton only under the interpreter, which conftest sets only without a GPU: on a
    # GPU machine both optimizers run there (same device, so the same rsvd sketches and bases).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref, ref_opt = _model_and_opt(options, "std", device=device)
    fused, fused_opt = _model_and_opt(options, "std", backend="triton", device=device)
    g = torch.Generator().manual_seed(2)
    ranks = []
    for _ in range(10):
        x, y = torch.randn(16, 12, generator=g).to(device), torch.randn(16, 6, generator=g).to(device)
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        for a, b in zip(ref.parameters(), fused.parameters()):
            b.grad = a.grad.clone()
            b.data.copy_(a.data)  # same weights each step: isolates one step's math from drift
        ref_opt.step()
        fused_opt.step()
        for a, b in zip(ref.parameters(), fused.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        ranks.append(tuple(fused_opt.state[p]["rank"] for p in fused.parameters() if p.dim() == 2))
    if options.get("rank_policy") == "energy":
        assert len(set(ranks)) > 1
