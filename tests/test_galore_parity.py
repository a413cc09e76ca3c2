"""Acceptance: GaLoreAdamW matches galore-torch (PyPI) on a real model, for every proj_type."""
import warnings

import pytest
import torch

from lowrank_kernels import GaLoreAdamW

from helpers import ToyNet, batches, galore_groups, train

galore_torch = pytest.importorskip("galore_torch", reason="galore-torch (with transformers, bitsandbytes) not installed")

PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]


def _run(opt_cls, proj_type, dtype=torch.float32, steps=20, **kw):
    model = ToyNet(dtype=dtype)
    groups = galore_groups(model, rank=6, update_proj_gap=5, scale=0.25, proj_type=proj_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # galore-torch's HF deprecation warning
        opt = opt_cls(groups, lr=3e-3, weight_decay=0.05, **kw)
    losses = train(model, opt, batches(steps, dtype=dtype))
    return model, opt, losses


@pytest.mark.peers
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_weights_match_galore_torch_fp32(proj_type):
    ours, _, our_losses = _run(GaLoreAdamW, proj_type)
    theirs, _, their_losses = _run(galore_torch.GaLoreAdamW, proj_type)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # The run must actually train, or matching would prove little.
    assert our_losses[-1] < our_losses[0]
    assert our_losses == pytest.approx(their_losses, rel=1e-5)


@pytest.mark.peers
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_moments_and_basis_match_galore_torch(proj_type):
    ours, opt, _ = _run(GaLoreAdamW, proj_type, steps=7)
    theirs, ref, _ = _run(galore_torch.GaLoreAdamW, proj_type, steps=7)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        sa, sb = opt.state[a], ref.state[b]
        assert sa["step"] == sb["step"] == 7
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-5, atol=1e-10)
        if "projector" in sb:
            ortho = sb["projector"].ortho_matrix
            if isinstance(ortho, list):
                left, right = ortho
            elif "proj_left" in sa:
                left, right = ortho, None
            else:
                left, right = None, ortho
            if left is not None:
                torch.testing.assert_close(sa["proj_left"], left)
            if right is not None:  # galore-torch keeps Q^T
                torch.testing.assert_close(sa["proj_right"], right.T)


@pytest.mark.peers
def test_bf16_tracks_galore_torch():
    """bf16 weights, gradients, moments and basis, as in galore-torch's pre-training scripts.

    Same ops in the same dtype; BLAS kernels may still round differently, so a bf16-sized tolerance
    (a few ulps of 2^-8 over 20 steps) is used on the weights.
    """
    ours, _, _ = _run(GaLoreAdamW, "std", dtype=torch.bfloat16)
    theirs, _, _ = _run(galore_torch.GaLoreAdamW, "std", dtype=torch.bfloat16)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
