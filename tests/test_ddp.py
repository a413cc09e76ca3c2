"""GaLoreAdamW under DistributedDataParallel (CPU, gloo, 2 and 3 processes).

* plain DDP: replicas stay bit-identical (weights, moments, bases) across refreshes for every basis source;
* LayerwiseUpdates with model=ddp: bit-identical to the ordinary DDP loop; without it, a clear error;
* register_lowrank_comm_hook: weights equal plain DDP's to 1e-5 relative for every proj_type, replicas
  bit-identical, and the projected parameters' bytes are the analytic low-rank count (min(m, n)/r fewer);
  with no_sync accumulation, unused parameters and mixed dtypes.

Spawning processes costs seconds, so each world size runs every scenario in ONE spawn (`scenarios`), and
the tests below only compare what the ranks returned.
"""
import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_utils import assert_same as assert_equal, run_distributed
from lowrank_kernels import GaLoreAdamW, LayerwiseUpdates
from lowrank_kernels.distributed import register_lowrank_comm_hook
from lowrank_kernels.distributed.ddp import expected_bytes, lowrank_numel

GAP, BATCH = 5, 4  # 20 steps refresh at 0, 5, 10, 15; samples per rank and step
# Conditioning: a refresh's SVD turns roundoff (1e-7: any change in summation order, plain DDP's own
# across world sizes included) into a rotation of the basis of size roundoff / (gap between singular
# values), and GaLore keeps Adam's moments per basis coordinate, so near-equal singular values would
# make ANY two fp32 runs differ by O(1). So each gradient has exactly rank r (r = all samples of a
# step) and samples carry geometric scales (SCALE ** global index), which keeps its r singular
# values well apart; that is GaLore's sensitivity, not the hook's, and the tests keep it out.
SCALE = 0.7
RANK = {2: 8, 3: 12}
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


class Net(nn.Module):
    """Projected weights 64x96 (wide), 40x64 (tall) and 40x40; biases and a norm (plain AdamW).

    With ``unused``, for find_unused_parameters: ``extra`` is used by rank 0 on odd steps only (locally
    unused elsewhere) and a parameter ``unused`` by nobody.
    """

    def __init__(self, dtype2=torch.float32, unused=False):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(96, 64)
        self.norm = nn.LayerNorm(64)
        self.b = nn.Linear(64, 40, bias=False).to(dtype2)
        self.extra = nn.Linear(40, 40, bias=False)
        if unused:
            self.unused = nn.Linear(8, 8)

    def forward(self, x, use_extra=True):
        h = self.b(self.norm(F.gelu(self.a(x))).to(self.b.weight.dtype)).float()
        return self.extra(h) if use_extra else h


def groups(model, world_size, **projected):
    weights = [model.a.weight, model.b.weight, model.extra.weight]
    others = [p for p in model.parameters() if all(p is not w for w in weights)]
    return [{"params": others}, {"params": weights, "rank": RANK[world_size], "update_proj_gap": GAP, **projected}]


def batch(rank, step, micro=0, size=BATCH):
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    scale = SCALE ** torch.arange(rank * BATCH + micro * size, rank * BATCH + (micro + 1) * size)[:, None]
    return torch.randn(size, 96, generator=g) * scale, torch.randn(size, 40, generator=g) * scale * 3


def train(rank, pg, *, steps=20, hook=False, layerwise=False, accum=1, no_sync=True, unused=False,
          view=False, dtype2=torch.float32, clip=None, backend="auto", **projected):
    """Train Net under DDP; returns weights, optimizer state and the hook's byte counts."""
    model = Net(dtype2, unused)
    ddp = DDP(model, process_group=pg, find_unused_parameters=unused, gradient_as_bucket_view=view,
              bucket_cap_mb=0.01)
    opt = GaLoreAdamW(groups(model, pg.size(), **projected), lr=1e-2, weight_decay=0.1, seed=3, backend=backend)
    state = register_lowrank_comm_hook(ddp, opt) if hook else None
    lw = LayerwiseUpdates(opt, accumulation_steps=accum, max_grad_norm=clip, model=ddp) if layerwise else None
    # An independent count of the hook's traffic: every Python-side all-reduce (DDP's built-in one, without
    # a hook, runs in C++ and is not seen).
    calls, all_reduce = [], torch.distributed.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel() * tensor.element_size())
        return all_reduce(tensor, *args, **kwargs)

    torch.distributed.all_reduce = counting
    try:
        _loop(rank, model, ddp, opt, lw, steps, accum, no_sync, unused, clip)
    finally:
        torch.distributed.all_reduce = all_reduce
    comm = getattr(ddp, "_lowrank_comm_state", None)
    return {"weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "state": opt.state_dict()["state"],
            "bytes": state.history if state is not None else None,
            "counted": (comm.bytes_reduced, sum(calls)) if comm is not None else None}


def _loop(rank, model, ddp, opt, lw, steps, accum, no_sync, unused, clip):
    for step in range(steps):
        for micro in range(accum):
            x, y = batch(rank, step, micro, BATCH // accum)
            last = micro == accum - 1
            with ddp.no_sync() if no_sync and not last else contextlib.nullcontext():
                # unused: rank 0 uses `extra` on odd steps, nobody else ever does; `unused` is never used
                loss = F.mse_loss(ddp(x, use_extra=not unused or (rank == 0 and step % 2 == 1)), y) / accum
                if lw is not None:
                    assert lw.backward(loss) == last
                else:
                    loss.backward()
        if lw is None:
            if clip is not None:  # what LayerwiseUpdates' per-parameter clipping means
                for p in model.parameters():
                    if p.grad is not None:
                        torch.nn.utils.clip_grad_norm_([p], clip)
            opt.step()
            opt.zero_grad()


def refusals(rank, pg):
    """LayerwiseUpdates misused under DDP: each case raises (returns the messages)."""
    x, y = batch(rank, 0)
    errors = []
    model = Net()
    ddp = DDP(model, process_group=pg, bucket_cap_mb=0.01)
    opt = GaLoreAdamW(groups(model, pg.size()), lr=1e-2)
    try:  # world > 1 and no model=
        LayerwiseUpdates(opt)
    except ValueError as e:
        errors.append(str(e))
    lw = LayerwiseUpdates(opt, model=model)  # the inner module: "gradients already reduced", which is false
    try:
        lw.backward(F.mse_loss(ddp(x), y))
    except RuntimeError as e:
        errors.append(str(e))
    model = Net()
    ddp = DDP(model, process_group=pg, bucket_cap_mb=0.01)
    opt = GaLoreAdamW(groups(model, pg.size()), lr=1e-2)
    lw = LayerwiseUpdates(opt, model=ddp)
    before = [p.detach().clone() for p in model.parameters()]
    try:  # the stepping micro-batch under no_sync: nothing was averaged
        with ddp.no_sync():
            lw.backward(F.mse_loss(ddp(x), y))
    except RuntimeError as e:
        errors.append(str(e))
    errors.append(all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
    return errors


SCENARIOS = {
    # plain DDP, every basis source and the energy rank: replicas bit-identical
    **{f"plain-{name}": dict(steps=12, **cfg) for name, cfg in {
        "svd": {}, "rsvd": {"projector": "rsvd"}, "warm": {"projector": "warm"},
        "energy": {"projector": "rsvd", "rank_policy": "energy", "energy_threshold": 0.6, "min_rank": 2},
    }.items()},
    # LayerwiseUpdates under DDP against the ordinary DDP loop (with accumulation, clipping, bucket views)
    "ordinary-accum": dict(steps=8, accum=2, clip=0.05, projector="rsvd"),
    "layerwise-accum": dict(steps=8, accum=2, clip=0.05, projector="rsvd", layerwise=True),
    "ordinary-view-unused": dict(steps=8, view=True, unused=True),
    "layerwise-view-unused": dict(steps=8, view=True, unused=True, layerwise=True),
    "ordinary-hook": dict(steps=8, hook=True),
    "layerwise-hook": dict(steps=8, hook=True, layerwise=True),
    # the whole-model grouped kernels (backend "triton"; the interpreter on CPU) under DDP
    "triton-plain": dict(steps=8, backend="triton"),
    "triton-hook": dict(steps=8, hook=True, backend="triton"),
    "triton-layerwise-hook": dict(steps=8, hook=True, layerwise=True, backend="triton"),
    # the hook against plain DDP, every proj_type
    **{f"{kind}-{proj}": dict(hook=kind == "hook", proj_type=proj) for proj in PROJ_TYPES
       for kind in ("plain", "hook")},
    # strategies: rank changes at refreshes, lazy refreshes, and a policy that needs the whole gradient
    **{f"{kind}-{name}": dict(hook=kind == "hook", **cfg) for name, cfg in {
        "energy-lazy": {"projector": "warm", "rank_policy": "energy", "energy_threshold": 0.6, "min_rank": 2,
                        "refresh_policy": "lazy", "moments_on_refresh": "rotate"},
        "converged": {"refresh_policy": "converged"},
    }.items() for kind in ("plain", "hook")},
    # gradient accumulation under no_sync, and without it; unused parameters; a bf16 weight
    **{f"{kind}-{name}": dict(steps=10, hook=kind == "hook", **cfg) for name, cfg in {
        "nosync-unused": {"accum": 2, "unused": True},
        "sync-accum": {"accum": 2, "no_sync": False},
        "bf16": {"dtype2": torch.bfloat16},
    }.items() for kind in ("plain", "hook")},
}


def scenarios(rank, world_size):
    """Every scenario on 3 processes, then again on a group of 2 of them: one spawn for both sizes."""
    pairs = torch.distributed.new_group([0, 1])  # every rank must take part in creating it
    out = {}
    for size, pg in ((3, torch.distributed.group.WORLD), (2, pairs)):
        if rank < size:  # rank 2 is no member of `pairs` (and gets no group object for it)
            out[size] = {name: train(rank, pg, **cfg) for name, cfg in SCENARIOS.items()}
            out[size]["refusals"] = refusals(rank, pg)
            out[size]["world_size"] = size
    torch.distributed.barrier()
    return out


@pytest.fixture(scope="module")
def spawned():
    return run_distributed(scenarios, 3)


@pytest.fixture(params=[2, 3], ids=lambda w: f"world{w}")
def ranks(spawned, request):
    """What each rank of a world of the given size returned."""
    return [out[request.param] for out in spawned[:request.param]]


def assert_replicas_identical(ranks, name):
    for r, out in enumerate(ranks[1:], 1):
        assert_equal(out[name]["weights"], ranks[0][name]["weights"], f"{name} rank {r} weights")
        assert_equal(out[name]["state"], ranks[0][name]["state"], f"{name} rank {r} optimizer state")


def max_rel_err(a, b):
    return max(float((a[k].float() - b[k].float()).norm() / b[k].float().norm()) for k in b)


@pytest.mark.parametrize("source", ["svd", "rsvd", "warm", "energy"])
def test_plain_ddp_replicas_bit_identical(ranks, source):
    name = f"plain-{source}"
    assert_replicas_identical(ranks, name)
    state = ranks[0][name]["state"]
    assert all(s["refreshes"] == 3 for s in state.values() if "refreshes" in s)  # steps 0, 5, 10
    if source == "energy":  # the energy rule did choose ranks below the maximum somewhere
        assert any(s["rank"] < RANK[ranks[0]["world_size"]] for s in state.values() if "rank" in s)


@pytest.mark.parametrize("case", ["accum", "view-unused", "hook"])
def test_layerwise_under_ddp_bit_identical_to_ordinary_loop(ranks, case):
    assert_replicas_identical(ranks, f"layerwise-{case}")
    for out in ranks:
        assert_equal(out[f"layerwise-{case}"]["weights"], out[f"ordinary-{case}"]["weights"], "weights")
        assert_equal(out[f"layerwise-{case}"]["state"], out[f"ordinary-{case}"]["state"], "state")


def test_layerwise_misuse_under_ddp_raises(ranks):
    for out in ranks:
        construct, late, no_sync, untouched = out["refusals"]
        assert "needs model=" in construct
        assert "DistributedDataParallel" in late
        assert "no_sync" in no_sync and untouched


@pytest.mark.parametrize("name", [*PROJ_TYPES, "energy-lazy", "converged", "nosync-unused", "sync-accum"])
def test_hook_matches_plain_ddp(ranks, name):
    assert_replicas_identical(ranks, f"hook-{name}")
    plain, hooked = ranks[0][f"plain-{name}"]["weights"], ranks[0][f"hook-{name}"]["weights"]
    # fp32: the hook changes only the order of sums (all-reduce of P^T G_i instead of G_i) and adds
    # P^T P = I up to roundoff; 20 steps of Adam amplify ~1e-7 to well under 1e-5.
    assert max_rel_err(hooked, plain) < 1e-5


def test_grouped_triton_step_under_ddp(ranks):
    """backend="triton" (grouped kernels) under DDP: replicas bit-identical with and without the hook; the
    hook equals plain DDP as on backend "torch"; layer-wise steps per DDP bucket equal the whole-model
    step bit for bit; and the kernels follow backend "torch" on the same run."""
    for name in ("triton-plain", "triton-hook", "triton-layerwise-hook"):
        assert_replicas_identical(ranks, name)
    run = {name: ranks[0][name]["weights"] for name in ("triton-plain", "triton-hook", "triton-layerwise-hook",
                                                        "ordinary-hook")}
    assert_equal(run["triton-layerwise-hook"], run["triton-hook"], "layer-wise vs whole-model (triton)")
    # fp32, 8 steps with one refresh after the first: only summation order differs (the hook's projected
    # all-reduce; the kernels' tile sums against torch's matmuls), ~1e-7 amplified by Adam, as above.
    assert max_rel_err(run["triton-hook"], run["triton-plain"]) < 1e-5
    assert max_rel_err(run["triton-hook"], run["ordinary-hook"]) < 1e-5
    assert not torch.equal(run["triton-hook"]["a.weight"], Net().a.weight)  # it did train


def test_hook_bytes_are_the_low_rank_counts(ranks):
    """Measured bytes per step equal the analytic low-rank count on steps without a refresh."""
    shapes = [(64, 96), (40, 64), (40, 40)]  # a.weight, b.weight, extra.weight
    world = ranks[0]["world_size"]
    r = RANK[world]
    for proj in PROJ_TYPES:
        history = ranks[0][f"hook-{proj}"]["bytes"]
        assert len(history) == 20
        full = sum(m * n for m, n in shapes) * 4
        low = sum(lowrank_numel((m, n), r, proj) for m, n in shapes) * 4
        expected = expected_bytes(groups(Net(), world, proj_type=proj))
        for step, rec in enumerate(history):
            # several DDP buckets once DDP has rebuilt them after the first backward
            assert rec.projected_plain == full and (rec.buckets > 1 or step == 0)
            if step % GAP == 0:  # refresh: every projected weight goes whole
                assert rec.compressed == 0 and rec.projected_reduced == full
                assert rec.reduced == rec.plain == expected.plain
            else:
                assert rec.compressed == 3 and rec.projected_reduced == low
                assert dataclasses.replace(rec, buckets=0) == expected
                # the acceptance bound: at least (min(m, n)/r)/1.2 times fewer bytes, weight by weight
                bound = sum(m * n / (min(m, n) / r / 1.2) for m, n in shapes) * 4
                assert rec.projected_reduced <= bound
                assert rec.reduced < rec.plain


def test_hook_accounting_matches_the_all_reduce_calls(ranks):
    checked = 0
    for out in ranks:
        for name in SCENARIOS:
            if out[name]["counted"] is not None:
                own, seen = out[name]["counted"]
                assert own == seen > 0, name
                checked += 1
    assert checked == len(ranks) * sum(bool(cfg.get("hook") or cfg.get("layerwise")) for cfg in SCENARIOS.values())


def test_hook_falls_back_where_the_whole_gradient_is_needed(ranks):
    assert all(rec.compressed == 0 for rec in ranks[0]["hook-converged"]["bytes"])
    energy = ranks[0]["hook-energy-lazy"]["bytes"]
    assert energy[0].compressed == 0 and any(rec.compressed for rec in energy)


def test_hook_with_no_sync_and_unused_parameters(ranks):
    for name in ("plain-nosync-unused", "hook-nosync-unused"):
        for out in ranks:
            w = out[name]["weights"]
            assert torch.equal(w["unused.weight"], Net(unused=True).unused.weight.detach())  # never stepped
            assert not torch.equal(w["extra.weight"], Net().extra.weight.detach())  # rank 0's grads arrived
    history = ranks[0]["hook-nosync-unused"]["bytes"]
    assert len(history) == 10  # one record per syncing backward: no_sync micro-batches reduce nothing
    assert any(rec.compressed for rec in history)


def test_hook_with_a_bf16_weight(ranks):
    assert_replicas_identical(ranks, "hook-bf16")
    plain, hooked = ranks[0]["plain-bf16"]["weights"], ranks[0]["hook-bf16"]["weights"]
    # bf16 (8 bits of mantissa): the reconstruction P R̄ and its re-projection round at 2^-8 relative
    assert max_rel_err(hooked, plain) < 2e-2
    assert hooked["b.weight"].dtype == torch.bfloat16
    assert any(rec.compressed for rec in ranks[0]["hook-bf16"]["bytes"])


def test_which_parameters_are_compressed():
    """The per-parameter decision (single process): a basis, no refresh due, GaLore's own update."""
    from lowrank_kernels.distributed.ddp import _basis_for

    def decisions(**projected):
        model = Net()
        opt = GaLoreAdamW(groups(model, 2, update_proj_gap=2, **projected), lr=1e-2)
        out = []
        for step in range(3):
            F.mse_loss(model(batch(0, step)[0]), batch(0, step)[1]).backward()
            out.append([_basis_for(opt, p, p.grad) is not None for p in (model.a.weight, model.a.bias)])
            opt.step()
            opt.zero_grad()
        return out

    # step 0: no state yet; step 1: compressed; step 2: refresh due (gap 2). Biases: never.
    assert decisions() == [[False, False], [True, False], [False, False]]
    assert decisions(refresh_policy="converged") == [[False, False]] * 3  # reads all of G every step
    assert decisions(update="fira") == [[False, False]] * 3  # a residual rule needs all of G
