"""Update rules (group key ``update``) against their reference packages, and their validation.

Fira against ``fira`` 1.0.2's FiraAdamW, APOLLO / APOLLO-Mini against ``apollo-torch`` 1.0.3's APOLLOAdamW
(proj "svd", and proj "random" from the same seeds), FRUGAL against a direct transcription of FRUGAL's
code (the authors' ``proj_optimizer_templates.py`` / ``adamw.py``; it is not on PyPI). Each runs 12 steps
with refreshes every 5 steps on ToyNet's tall (48x16), square (48x48) and wide (12x48) weights, with the
same hyperparameters, and must agree to 1e-5 relative in fp32.
"""

import pytest
import torch
from torch import nn

from lowrank_kernels import GaLoreAdamW, projection

from helpers import ToyNet, batches, galore_groups, train

STEPS, GAP = 12, 5  # refreshes at steps 0, 5 and 10


def _ours(lr=1e-2, **group):
    model = ToyNet()
    return model, GaLoreAdamW(galore_groups(model, update_proj_gap=GAP, **group), lr=lr, weight_decay=0.01)


def _weights_only(model, backend, **group):
    """An optimizer of the 2-D weights only: the rest stays fixed, so backends see identical gradients."""
    weights = [p for p in model.parameters() if p.dim() == 2]
    return GaLoreAdamW([{"params": weights, "rank": 4, "update_proj_gap": 2, **group}], lr=1e-2, backend=backend)


def _assert_same_weights(a_model, b_model):
    for (name, a), b in zip(a_model.named_parameters(), b_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


# ---- Fira ---------------------------------------------------------------------------------------------
@pytest.mark.peers
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_fira_matches_the_fira_package(proj_type):
    fira = pytest.importorskip("fira")
    data = batches(STEPS)
    ours, opt = _ours(rank=4, scale=0.25, proj_type=proj_type, update="fira")
    our_losses = train(ours, opt, data)
    theirs = ToyNet()
    ref = fira.FiraAdamW(galore_groups(theirs, rank=4, update_proj_gap=GAP, alpha=0.25, proj_type=proj_type),
                         lr=1e-2, weight_decay=0.01, no_deprecation_warning=True)
    train(theirs, ref, data)
    _assert_same_weights(ours, theirs)
    assert our_losses[-1] < our_losses[0]
    for p, q in zip(ours.parameters(), theirs.parameters()):
        if p.dim() == 2:  # the limiter's memory is Fira's scaling_grad norm
            torch.testing.assert_close(opt.state[p]["limiter_norm"], ref.state[q]["scaling_grad"], rtol=1e-5, atol=0)


# ---- APOLLO -------------------------------------------------------------------------------------------
APOLLO_CASES = [  # (update, scale_type, rank, scale, lr, apollo-torch constructor flags)
    ("apollo", "channel", 4, 2.0, 1e-2, {}),
    ("apollo", "channel", 4, 0.5, 1e-2, {"scale_front": True}),
    ("apollo", "channel", 3, 1.0, 1e-2, {"disable_nl": True}),
    ("apollo-mini", "tensor", 1, 128.0, 1e-3, {}),      # APOLLO-Mini's own setting: rank 1, scale 128
    ("apollo-mini", "tensor", 1, 128.0, 1e-3, {"scale_front": True}),
]


def _apollo_pair(update, scale_type, rank, scale, lr, flags, proj):
    apollo_torch = pytest.importorskip("apollo_torch")
    data = batches(STEPS)
    ours, opt = _ours(rank=rank, scale=scale, proj_type="std", update=update, projector=proj, lr=lr, **flags)
    theirs = ToyNet()
    ref = apollo_torch.APOLLOAdamW(
        galore_groups(theirs, rank=rank, update_proj_gap=GAP, scale=scale, proj_type="std", proj=proj,
                      scale_type=scale_type), lr=lr, weight_decay=0.01, **flags)
    if proj == "random":
        # apollo-torch seeds parameter i (1-based) with i; ours seeds from the optimizer seed and the
        # position. Give apollo-torch our first seeds: from there both chains advance by its next_seed.
        for position, q in enumerate(q for group in ref.param_groups for q in group["params"]):
            ref.state[q]["seed"] = projection.refresh_seed(0, position, 0)
    our_losses = train(ours, opt, data)
    train(theirs, ref, data)
    return ours, theirs, our_losses


@pytest.mark.peers
@pytest.mark.parametrize("case", APOLLO_CASES, ids=lambda c: f"{c[0]}-r{c[2]}-{'-'.join(c[5]) or 'default'}")
def test_apollo_matches_apollo_torch_svd(case):
    ours, theirs, losses = _apollo_pair(*case, proj="svd")
    _assert_same_weights(ours, theirs)
    assert losses[-1] < losses[0]


@pytest.mark.peers
@pytest.mark.parametrize("case", [APOLLO_CASES[0], APOLLO_CASES[3]], ids=["apollo", "apollo-mini"])
def test_apollo_matches_apollo_torch_random_projection(case):
    """projector="random" draws APOLLO's projection bit for bit (same generator, seed chain and scaling),
    so the whole run matches too: apollo-torch keeps the matrix, we regenerate it from the seed."""
    ours, theirs, _ = _apollo_pair(*case, proj="random")
    _assert_same_weights(ours, theirs)


# ---- FRUGAL -------------------------------------------------------------------------------------------
def _frugal_transcription(W, grads, rank, side, gap, lr, scale, inactive_lr_scale, betas=(0.9, 0.999)):
    """FRUGAL's GaloreOptimizer + AdamW (proj_type 'svd', reset_statistics=True, 'sign_sgd'), line by line.

    eps = 0 and weight_decay = 0: FRUGAL's AdamW adds eps to sqrt(v)/sqrt(bc2) and decays before the
    update, ours (galore-torch's) adds eps to sqrt(v) and decays after; with both zero the rules coincide.
    """
    W = W.clone()
    b1, b2 = betas
    for t, g in enumerate(grads):
        if t % gap == 0:  # _update_states: new SVD basis, moments and step reset
            U, S, Vh = torch.linalg.svd(g, full_matrices=False)
            basis = {"left": U[:, :rank], "right": Vh[:rank, :], "full": (U[:, :rank], Vh[:rank, :])}[side]
            step, m, v = 0, None, None
        down = {"left": lambda x: basis.t() @ x, "right": lambda x: x @ basis.t(),
                "full": lambda x: basis[0].t() @ x @ basis[1].t()}[side]
        up = {"left": lambda x: basis @ x, "right": lambda x: x @ basis,
              "full": lambda x: basis[0] @ x @ basis[1]}[side]
        grad_down = down(g)
        if m is None:
            m, v = torch.zeros_like(grad_down), torch.zeros_like(grad_down)
        step += 1
        active_lr = lr * scale
        m.mul_(b1).add_(grad_down, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad_down, grad_down, value=1 - b2)
        denom = v.sqrt() / (1 - b2**step) ** 0.5
        update = up(m / denom * (-active_lr / (1 - b1**step)))
        inactive_grad = g - up(grad_down)
        update.add_(-lr * scale * inactive_lr_scale * inactive_grad.sign())
        W.add_(update)
    return W


@pytest.mark.parametrize("shape,proj_type", [((37, 13), "std"), ((13, 37), "std"), ((21, 21), "std"),
                                             ((19, 23), "full")])
def test_frugal_matches_frugal_code(shape, proj_type):
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) for _ in range(STEPS)]
    w = nn.Parameter(W0.clone())
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": GAP, "scale": 0.5, "proj_type": proj_type,
                        "update": "frugal", "inactive_lr_scale": 0.3, "moments_on_refresh": "zero"}],
                      lr=1e-2, eps=0.0)
    for G in grads:
        w.grad = G.clone()
        opt.step()
    side = projection.orientation(proj_type, *shape)
    expected = _frugal_transcription(W0, grads, 4, side, GAP, 1e-2, 0.5, 0.3)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)
    # The residual's signSGD moved the weight: without it the result differs by far more than the tolerance.
    no_residual = _frugal_transcription(W0, grads, 4, side, GAP, 1e-2, 0.5, 0.0)
    assert (no_residual - expected).abs().max() > 1e-3


# ---- validation ---------------------------------------------------------------------------------------
def _build(**group):
    w = nn.Parameter(torch.zeros(20, 12))
    return GaLoreAdamW([{"params": [w], "rank": 3, **group}])


@pytest.mark.parametrize("group,match", [
    (dict(update="lion"), "Invalid update"),
    (dict(update="fira", proj_type="full"), "update='fira' is defined for proj_type"),
    (dict(update="apollo", proj_type="reverse_std"), "update='apollo' is defined for proj_type"),
    (dict(update="apollo-mini", proj_type="left"), "update='apollo-mini' is defined for proj_type"),
    (dict(update="frugal", inactive_lr_scale=-1.0), "Invalid inactive_lr_scale"),
    (dict(update="apollo", scale_front=1), "Invalid scale_front"),
    (dict(update="apollo-mini", disable_nl="no"), "Invalid disable_nl"),
    (dict(projector="random", rank_policy="energy"), "projector='random' has none"),
    (dict(projector="fourier"), "Invalid projector"),
])
def test_invalid_rule_options_raise_at_construction(group, match):
    with pytest.raises(ValueError, match=match):
        _build(**group)


def test_update_needs_a_projected_group():
    with pytest.raises(ValueError, match="needs a projected group"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(3))], "update": "fira"}])


def test_rule_defaults_and_edits_checked_at_step():
    opt = _build(update="frugal")
    assert opt.param_groups[0]["inactive_lr_scale"] == 1.0 and opt.param_groups[0]["update"] == "frugal"
    assert _build(update="apollo").param_groups[0]["scale_front"] is False
    assert _build().param_groups[0]["update"] == "galore"
    w = opt.param_groups[0]["params"][0]
    w.grad = torch.randn(20, 12)
    opt.param_groups[0]["proj_type"] = "full"  # allowed for frugal
    opt.step()
    opt.param_groups[0]["update"] = "apollo"
    before = w.detach().clone()
    with pytest.raises(ValueError, match="update='apollo' is defined for proj_type"):
        opt.step()
    assert torch.equal(w, before)


# ---- backends -----------------------------------------------------------------------------------------
def test_fused_supported():
    base = {"rank": 4, "projector": "svd", "update": "galore", "state_dtype": None}
    assert projection.fused_supported(base)
    # random and dct states hold a seed or column numbers; the engine materialises their bases
    assert projection.fused_supported({**base, "projector": "dct"})
    assert projection.fused_supported({**base, "projector": "random"})
    assert projection.fused_supported({"state_dtype": "float32"})  # plain AdamW group
    for change in ({"update": "fira"}, {"update": "apollo-mini"}, {"state_dtype": "int8"}):
        assert not projection.fused_supported({**base, **change})
    assert not projection.fused_supported({"state_dtype": "int8"})


@pytest.mark.parametrize("group", [dict(update="frugal", proj_type="full"), dict(update="fira", projector="random"),
                                   dict(state_dtype="int8", update="apollo")], ids=["frugal-full", "fira-random",
                                                                                   "apollo-int8"])
def test_unsupported_groups_run_the_reference_on_the_triton_backend(group):
    """backend="triton" (CPU, interpreter) on a group without kernels runs the reference: bit-identical."""
    pytest.importorskip("triton", reason="triton not installed")
    runs = []
    for backend in ("torch", "triton"):
        model = ToyNet()
        train(model, _weights_only(model, backend, **group), batches(3))
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("projector", ["random", "dct"])
def test_fused_kernels_take_regenerated_bases(projector):
    """GaLore's rule with seeded / DCT bases on the Triton kernels: the basis is rebuilt and handed over."""
    pytest.importorskip("triton", reason="triton not installed")
    runs = []
    for backend in ("torch", "triton"):
        model = ToyNet()
        train(model, _weights_only(model, backend, projector=projector), batches(3))
        runs.append(model)
    # fp32 summation order differs between the kernels and torch's GEMMs
    _assert_same_weights(*runs)
