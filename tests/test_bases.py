"""Regenerated bases: APOLLO's seeded Gaussian ("random") and DCT-II columns ("dct").

The state keeps a seed or r column numbers instead of the matrix; every step rebuilds the matrix.
"""
import math

import pytest
import torch
from torch import nn

from lowrank_kernels import GaLoreAdamW, projection
from lowrank_kernels.memory import state_bytes

from helpers import resume


# ---- random -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("proj_type,keys,shapes", [
    ("std", ["proj_right_seed"], [(13, 3)]),           # 29 x 13: tall, Q is n x r
    ("left", ["proj_left_seed"], [(29, 3)]),
    ("full", ["proj_left_seed", "proj_right_seed"], [(29, 3), (13, 3)]),
])
def test_random_basis_shapes_and_state(proj_type, keys, shapes):
    w = nn.Parameter(torch.zeros(29, 13))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "projector": "random", "proj_type": proj_type}])
    w.grad = torch.randn(29, 13)
    opt.step()
    state = opt.state[w]
    assert all(isinstance(state[k], int) for k in keys)
    assert not any(k in state for k in projection.BASIS_KEYS)  # the matrix is not stored
    P, Q = projection.basis_of(state, w.grad)
    assert [t.shape for t in (P, Q) if t is not None] == [torch.Size(s) for s in shapes]
    if proj_type == "full":
        assert state["proj_right_seed"] == projection.next_seed(state["proj_left_seed"])
    # the state holds the moments and a few numbers: no basis bytes
    assert state_bytes(opt) == sum(state[k].numel() * 4 for k in projection.MOMENT_KEYS)


def test_random_basis_is_determined_by_its_seed():
    like = torch.empty(0)
    a = projection.gaussian_basis(7, 500, 20, "proj_left", like)
    assert torch.equal(a, projection.gaussian_basis(7, 500, 20, "proj_left", like))
    assert not torch.equal(a, projection.gaussian_basis(8, 500, 20, "proj_left", like))
    # N(0, 1/r) entries, as APOLLO: variance 1/20 within sampling error (10^4 samples: ~1.4% std)
    assert abs(a.var().item() * 20 - 1.0) < 0.06 and abs(a.mean().item()) < 0.01
    right = projection.gaussian_basis(7, 500, 20, "proj_right", like)
    assert right.shape == (500, 20)


def test_random_seeds_follow_apollo_torch():
    rp = pytest.importorskip("apollo_torch.random_projector")
    for seed in (0, 1, 12345, projection.refresh_seed(3, 4, 0)):
        assert projection.next_seed(seed) == rp.next_seed(seed)
        drawn = rp.stable_randn((5, 40), seed=seed) / math.sqrt(5)
        assert torch.equal(projection.gaussian_basis(seed, 40, 5, "proj_right", torch.empty(0)), drawn.T)


def test_random_refreshes_advance_the_seed():
    w = nn.Parameter(torch.zeros(29, 13))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "projector": "random", "update_proj_gap": 2}], seed=5)
    seeds = []
    for _ in range(5):
        w.grad = torch.randn(29, 13)
        opt.step()
        seeds.append(opt.state[w]["proj_right_seed"])
    first = projection.refresh_seed(5, 0, 0)
    assert seeds == [first, first, projection.next_seed(first), projection.next_seed(first),
                     projection.next_seed(projection.next_seed(first))]


# ---- dct ----------------------------------------------------------------------------------------------
def test_dct_basis_is_the_orthonormal_dct_ii():
    n = 37
    D = projection.dct_basis(torch.arange(n), n, torch.empty(0, dtype=torch.float64))
    torch.testing.assert_close(D.T @ D, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    j = torch.arange(n, dtype=torch.float64)
    x = torch.cos(math.pi * (2 * j + 1) * 5 / (2 * n))  # DCT-II frequency 5 is one basis vector
    coeff = x @ D
    assert coeff.abs().argmax() == 5 and coeff.abs().topk(2).values[1] < 1e-12
    # a column is the same bits alone as in the whole matrix (what regeneration relies on)
    idx = torch.tensor([30, 0, 7])
    assert torch.equal(projection.dct_basis(idx, n, torch.empty(0)),
                       projection.dct_basis(torch.arange(n), n, torch.empty(0))[:, idx])


@pytest.mark.parametrize("shape,side", [((40, 23), "right"), ((23, 45), "left")])
def test_dct_picks_the_columns_the_gradient_lives_on(shape, side):
    m, n = shape
    dim = n if side == "right" else m
    D = projection.dct_basis(torch.arange(dim), dim, torch.empty(0))
    g = torch.Generator().manual_seed(0)
    chosen = [11, 2, 19, 5]  # in order of decreasing weight
    G = 0.01 * torch.randn(m, n, generator=g)
    for weight, k in zip((8.0, 6.0, 4.0, 3.0), chosen):
        other = torch.randn(m if side == "right" else n, generator=g)
        other = other / other.norm()
        G += weight * (torch.outer(other, D[:, k]) if side == "right" else torch.outer(D[:, k], other))
    w = nn.Parameter(torch.zeros(m, n))
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "projector": "dct"}])
    w.grad = G
    opt.step()
    state = opt.state[w]
    assert state[f"proj_{side}_index"].tolist() == chosen
    assert state[f"proj_{side}_index"].dtype == torch.int64
    P, Q = projection.basis_of(state, G)
    basis = Q if side == "right" else P
    torch.testing.assert_close(basis, D[:, chosen])
    assert not any(k in state for k in projection.BASIS_KEYS)


def test_dct_energy_rank_counts_the_kept_energy():
    m, n = 30, 20
    D = projection.dct_basis(torch.arange(n), n, torch.empty(0))
    G = torch.outer(torch.ones(m) / m**0.5, 5.0 * D[:, 3]) + torch.outer(torch.ones(m) / m**0.5, 0.1 * D[:, 8])
    w = nn.Parameter(torch.zeros(m, n))
    opt = GaLoreAdamW([{"params": [w], "rank": 6, "projector": "dct", "rank_policy": "energy",
                        "energy_threshold": 0.05}])
    w.grad = G
    opt.step()
    assert opt.state[w]["rank"] == 1 and opt.state[w]["proj_right_index"].tolist() == [3]


def _mlp(**projected):
    """A seeded 13 -> 29 -> 7 MLP and GaLoreAdamW: its two weights in a group with ``projected``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 29), nn.Tanh(), nn.Linear(29, 7))
    weights = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    return model, GaLoreAdamW([{"params": others}, {"params": weights, **projected}], lr=1e-2)


# ---- checkpoints --------------------------------------------------------------------------------------
@pytest.mark.parametrize("projector", ["random", "dct"])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_regenerated_bases_resume_bit_exactly(projector, proj_type):
    def make():
        return _mlp(rank=3, update_proj_gap=3, projector=projector, proj_type=proj_type)

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 13, generator=g), torch.randn(8, 7, generator=g)) for _ in range(8)]

    def run(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    full, opt = make()
    run(full, opt, data)
    first, opt1 = make()
    run(first, opt1, data[:4])  # the checkpoint sits between refreshes (steps 3 and 6)
    resumed, opt2 = resume(make, first, opt1)
    run(resumed, opt2, data[4:])
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# ---- the whole-model step's basis cache ---------------------------------------------------------------
@pytest.mark.parametrize("projector", ["random", "dct"])
@pytest.mark.parametrize("proj_type", ["std", "left", "full"])
def test_engine_equals_the_per_parameter_path(projector, proj_type):
    """The engine keeps the matrices of seeded / DCT bases between refreshes (StepEngine.basis); the per-
    parameter path rebuilds them every step from the state. Same bits, across refreshes and a rank change."""
    def run(per_parameter: bool):
        model, opt = _mlp(rank=4, update_proj_gap=2, projector=projector, proj_type=proj_type)
        opt._per_parameter_step = per_parameter
        g = torch.Generator().manual_seed(1)
        for step in range(7):
            if step == 4:  # a structural edit: the rank changes at the next refresh
                opt.param_groups[1]["rank"] = 3
            x, y = torch.randn(8, 13, generator=g), torch.randn(8, 7, generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return model

    for a, b in zip(run(False).parameters(), run(True).parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("projector", ["random", "dct"])
def test_engine_basis_cache_follows_the_state(projector):
    """Rebuilt after a refresh into the same storage (a captured CUDA graph stays valid), never stale: the
    cached matrix always equals the one the state regenerates."""
    w = nn.Parameter(torch.randn(11, 30))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "projector": projector, "update_proj_gap": 2}])
    engine = opt._engine()
    pointers = set()
    for step in range(5):
        w.grad = torch.randn(11, 30) * (step + 1)
        opt.step()
        _, _, bases = engine._bases[w]
        P = bases["proj_left"]
        pointers.add(P.data_ptr())
        assert torch.equal(P, projection.basis_of(opt.state[w], w.grad)[0])
    assert len(pointers) == 1
    # load_state_dict replaces the state: the cache must not serve the old basis
    other = nn.Parameter(torch.randn(11, 30))
    donor = GaLoreAdamW([{"params": [other], "rank": 3, "projector": projector, "update_proj_gap": 2}], seed=9)
    other.grad = torch.randn(11, 30)
    donor.step()
    opt.load_state_dict(donor.state_dict())
    w.grad = torch.randn(11, 30)
    before = projection.basis_of(opt.state[w], w.grad)[0].clone()
    opt.step()
    assert torch.equal(engine._bases[w][2]["proj_left"], before)
