"""Audit of the distributed promises (README "Data-parallel training" and "Sharded training", issues 11/12),
with models, shapes, seeds and misuse of its own. CPU, gloo, 127.0.0.1, single-threaded children.

DDP (one spawn of 3 processes; every scenario on the 3 of them and on a group of 2):
* a conv + BatchNorm + linear model (buffers, a 4-D projected weight, odd shapes, projected and plain
  parameters in the same buckets) under the low-rank hook: replicas bit-identical after 14 steps crossing
  refreshes for rsvd + energy rank, random (APOLLO's Gaussian basis) and dct, with 3 no_sync micro-batches
  and find_unused_parameters;
* the hook against plain DDP: the random and dct bases across refreshes, GaLore's svd between refreshes;
* bytes: the README's min(m, n)/r claim, weight by weight, on steps without a refresh;
* checkpoints: resume from opt.state_dict() equals the uninterrupted run bit for bit (hook registered
  before or after loading);
* misuse: no GaLore optimizer, an optimizer of another model, options that differ between ranks, a
  checkpoint loaded on one rank only: a clear error on every rank, and the group still works afterwards.

FSDP2 (one spawn of 3 processes: uneven and empty shards): another model against one process on the same
global batch; a resume through get/set_optimizer_state_dict (not flattened) and DCP; refused placements
(Shard(1)) and options that differ between ranks fail on every rank before anything changes.

Every spawn has a deadline and every process group a collective timeout, so a hang fails the test.
"""
import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_utils import assert_same, free_port, single_threaded_children
from lowrank_kernels import GaLoreAdamW, LayerwiseUpdates
from lowrank_kernels.distributed import register_lowrank_comm_hook
from lowrank_kernels.distributed.ddp import expected_bytes, lowrank_numel
from lowrank_kernels.projection import matrix_shape

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

SPAWN_DEADLINE = 150  # seconds for a whole spawn; collectives time out after COLLECTIVE_TIMEOUT
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


# ---- spawning with a deadline --------------------------------------------------------------------------
def _worker(rank, world, port, out_dir, fn):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        result = fn(rank, world, out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def spawn(fn, world):
    """[fn(rank, world, scratch dir) for each rank], each in its own process; fails (never hangs) after
    SPAWN_DEADLINE seconds."""
    with single_threaded_children(), tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_worker, args=(world, free_port(), out_dir, fn), nprocs=world, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + SPAWN_DEADLINE
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for p in context.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"distributed workers still running after {SPAWN_DEADLINE} s (a hang)")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# ---- DDP ----------------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """conv 5x3x3x3 (a 5 x 27 matrix), BatchNorm (buffers), fc1 33 x 80, fc2 7 x 33, and ``spare`` (7 x 7),
    with ``unused`` used by rank 0 on odd steps only (locally unused elsewhere: find_unused_parameters)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 5, 3, bias=False)  # a bias before BN gets a zero (pure roundoff) gradient
        self.bn = nn.BatchNorm2d(5)
        self.fc1 = nn.Linear(80, 33)
        self.fc2 = nn.Linear(33, 7)
        self.spare = nn.Linear(7, 7, bias=False)

    def forward(self, x, spare=False):
        h = self.fc2(F.gelu(self.fc1(F.gelu(self.bn(self.conv(x))).flatten(1))))
        return self.spare(h) if spare else h


PROJECTED = ("conv.weight", "fc1.weight", "fc2.weight", "spare.weight")


def ddp_groups(model, **projected):
    named = dict(model.named_parameters())
    keys = dict(rank=3, update_proj_gap=4, scale=0.5)
    keys.update(projected)
    return [{"params": [p for n, p in named.items() if n not in PROJECTED]},
            {"params": [named[n] for n in PROJECTED], **keys}]


def ddp_batch(rank, step, micro):
    g = torch.Generator().manual_seed(7919 * step + 31 * micro + rank)
    return torch.randn(4, 3, 6, 6, generator=g), torch.randn(4, 7, generator=g)


def ddp_train(rank, pg, steps, *, hook=True, accum=1, unused=False, layerwise=False, start=0, model=None, opt=None, ckpt=None, **projected):
    """The ordinary DDP loop (no_sync for all but the last micro-batch); returns weights, buffers, state, bytes."""
    model = model or ConvNet()
    ddp = DDP(model, process_group=pg, find_unused_parameters=True, bucket_cap_mb=0.002)
    opt = opt or GaLoreAdamW(ddp_groups(model, **projected), lr=3e-3, weight_decay=0.05, seed=11)
    if ckpt is not None and ckpt[0] == "before":  # hook registered before the checkpoint is loaded
        state = register_lowrank_comm_hook(ddp, opt)
        opt.load_state_dict(torch.load(ckpt[1], weights_only=False)["opt"])
    else:
        if ckpt is not None:
            opt.load_state_dict(torch.load(ckpt[1], weights_only=False)["opt"])
        state = register_lowrank_comm_hook(ddp, opt) if hook else None
    lw = LayerwiseUpdates(opt, accumulation_steps=accum, model=ddp) if layerwise else None
    for step in range(start, start + steps):
        for micro in range(accum):
            x, y = ddp_batch(rank, step, micro)
            sync = micro == accum - 1
            with (ddp.no_sync() if not sync else _null()):
                loss = F.mse_loss(ddp(x, spare=not unused or (rank == 0 and step % 2 == 1)), y)
                lw.backward(loss) if lw is not None else loss.backward()
        if lw is None:
            opt.step()
            opt.zero_grad()
    return {"weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()},
            "state": opt.state_dict()["state"], "bytes": state.history if state else None,
            "model": model, "opt": opt}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _strip(out):
    return {k: v for k, v in out.items() if k not in ("model", "opt")}


DDP_REPLICA_CASES = {  # hook on, 3 no_sync micro-batches, 14 steps: refreshes at 0, 4, 8, 12
    "rsvd-energy": dict(projector="rsvd", rank_policy="energy", energy_threshold=0.7, min_rank=1,
                        moments_on_refresh="rotate"),
    "random": dict(projector="random"),
    "dct-full": dict(projector="dct", proj_type="full"),
}
# hook against plain DDP. random/dct: the basis does not depend on the gradient's roundoff, so refreshes
# may be crossed; svd: one refresh (step 0, whole gradients on both sides, so the same basis), then 11
# compressed steps, since a later SVD would amplify roundoff by 1/(singular value gap) in ANY two runs.
DDP_EXACT_CASES = {
    "random-reverse": dict(projector="random", proj_type="reverse_std"),
    "dct-std": dict(projector="dct"),
    "svd-std": dict(projector="svd", update_proj_gap=100),
    "svd-full": dict(projector="svd", proj_type="full", update_proj_gap=100),
}


def ddp_misuse(rank, pg, workdir):
    """Each misuse: the error type and message on this rank (None: nothing raised)."""
    out = {}

    def attempt(key, fn):
        try:
            fn()
            out[key] = None
        except Exception as exc:  # noqa: BLE001 (recorded for the tests to judge)
            out[key] = f"{type(exc).__name__}: {exc}"

    model = ConvNet()
    ddp = DDP(model, process_group=pg)
    attempt("no_optimizer", lambda: register_lowrank_comm_hook(ddp, None))
    attempt("torch_adamw", lambda: register_lowrank_comm_hook(ddp, torch.optim.AdamW(model.parameters())))
    attempt("not_ddp", lambda: register_lowrank_comm_hook(model, GaLoreAdamW(ddp_groups(model), lr=1e-3)))
    attempt("other_model", lambda: register_lowrank_comm_hook(ddp, GaLoreAdamW(ddp_groups(ConvNet()), lr=1e-3)))
    # rank 3 on rank 0, rank 2 elsewhere: the hook would all-reduce R of different sizes (gloo aborts)
    model = ConvNet()
    ddp = DDP(model, process_group=pg)
    attempt("rank_differs", lambda: register_lowrank_comm_hook(
        ddp, GaLoreAdamW(ddp_groups(model, rank=3 if rank == 0 else 2), lr=1e-3)))
    # a checkpoint loaded by rank 0 only
    model = ConvNet()
    ddp = DDP(model, process_group=pg)
    opt = GaLoreAdamW(ddp_groups(model), lr=1e-3)
    if rank == 0:
        opt.load_state_dict(torch.load(os.path.join(workdir, f"ckpt{pg.size()}.pt"), weights_only=False)["opt"])
    attempt("partial_checkpoint", lambda: register_lowrank_comm_hook(ddp, opt))
    # a second optimizer for a model that already has one
    model = ConvNet()
    ddp = DDP(model, process_group=pg)
    register_lowrank_comm_hook(ddp, GaLoreAdamW(ddp_groups(model), lr=1e-3))
    attempt("second_optimizer", lambda: register_lowrank_comm_hook(ddp, GaLoreAdamW(ddp_groups(model), lr=1e-3)))
    # the group still works: one all-reduce after all the refusals
    t = torch.ones(1)
    dist.all_reduce(t, group=pg)
    out["alive"] = float(t) == pg.size()
    return out


def ddp_worker(rank, world, workdir):
    pairs = dist.new_group([0, 1])  # every rank takes part in creating it
    out = {}
    for size, pg in ((3, dist.group.WORLD), (2, pairs)):
        if rank >= size:
            continue
        res = {}
        for name, cfg in DDP_REPLICA_CASES.items():
            res[f"replica-{name}"] = _strip(ddp_train(rank, pg, 14, accum=3, unused=True, **cfg))
        # layer-wise steps from the hook, with the Gaussian basis's Gram solve: the ordinary loop bit for bit
        res["layerwise-random"] = _strip(ddp_train(rank, pg, 14, accum=3, unused=True, layerwise=True,
                                                   **DDP_REPLICA_CASES["random"]))
        for name, cfg in DDP_EXACT_CASES.items():
            for hook in (False, True):
                res[f"{'hook' if hook else 'plain'}-{name}"] = _strip(ddp_train(rank, pg, 12, hook=hook, **cfg))
        # checkpoints: 5 steps, save (rank 0), resume in a fresh model and optimizer, 5 more steps
        for name, cfg in (("rsvd-energy", DDP_REPLICA_CASES["rsvd-energy"]), ("random", DDP_REPLICA_CASES["random"])):
            whole = ddp_train(rank, pg, 10, **cfg)
            first = ddp_train(rank, pg, 5, **cfg)
            path = os.path.join(workdir, f"ckpt{size}.pt")
            if rank == 0:
                torch.save({"model": first["model"].state_dict(), "opt": first["opt"].state_dict()}, path)
            dist.barrier(group=pg)
            resumed = {}
            for order in ("before", "after"):
                model = ConvNet(seed=1)
                model.load_state_dict(torch.load(path)["model"])
                opt = GaLoreAdamW(ddp_groups(model, **cfg), lr=3e-3, weight_decay=0.05, seed=11)
                resumed[order] = _strip(ddp_train(rank, pg, 5, start=5, model=model, opt=opt, ckpt=(order, path)))
            res[f"ckpt-{name}"] = {"whole": _strip(whole), **resumed}
        res["misuse"] = ddp_misuse(rank, pg, workdir)
        out[size] = res
    return out


@pytest.fixture(scope="module")
def ddp_results():
    return spawn(ddp_worker, 3)


@pytest.fixture(params=[2, 3], ids=lambda w: f"world{w}")
def ddp_ranks(ddp_results, request):
    return [out[request.param] for out in ddp_results[:request.param]]


def rel_err(a, b):
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


@pytest.mark.parametrize("case", list(DDP_REPLICA_CASES))
def test_ddp_hook_replicas_bit_identical_across_refreshes(ddp_ranks, case):
    """14 steps (refreshes at 0, 4, 8, 12), 3 no_sync micro-batches, BatchNorm buffers, unused parameters."""
    name = f"replica-{case}"
    for r, out in enumerate(ddp_ranks[1:], 1):
        # (not the BatchNorm buffers: DDP broadcasts rank 0's before each forward, then every rank
        # updates its own copy from its own batch, so they differ after the last forward by design)
        for what in ("weights", "state"):
            assert_same(out[name][what], ddp_ranks[0][name][what], f"{name} rank {r} {what}")
    state = ddp_ranks[0][name]["state"]
    # conv, fc1, fc2 stepped 14 times (refreshes at 0, 4, 8, 12); spare 7 times (odd steps: 2 refreshes)
    assert sorted(s["refreshes"] for s in state.values() if "refreshes" in s) == [2, 4, 4, 4]
    history = ddp_ranks[0][name]["bytes"]
    assert len(history) == 14  # one record per syncing backward, none for the no_sync micro-batches
    assert all(rec.compressed >= 3 for i, rec in enumerate(history) if i % 4)  # (`spare` is refreshed on its own count)
    if case == "rsvd-energy":  # the energy rule did pick a rank below the maximum somewhere
        assert any(s["rank"] < 3 for s in state.values() if "rank" in s)
    # `spare` got gradients from rank 0 only, on odd steps: it moved, identically everywhere
    assert not torch.equal(ddp_ranks[0][name]["weights"]["spare.weight"], ConvNet().spare.weight.detach())


@pytest.mark.parametrize("case", list(DDP_EXACT_CASES))
def test_ddp_hook_equals_plain_ddp(ddp_ranks, case):
    hooked, plain = (ddp_ranks[0][f"{kind}-{case}"]["weights"] for kind in ("hook", "plain"))
    for out in ddp_ranks[1:]:
        assert_same(out[f"hook-{case}"]["weights"], hooked, f"hook-{case} replicas")
    # fp32: only the order of the sums changes (and P^T P = I, or the Gram solve for "random", rounds);
    # 12 Adam steps keep that near 1e-7, well under the promised 1e-5.
    assert rel_err(hooked, plain) < 1e-5
    history = ddp_ranks[0][f"hook-{case}"]["bytes"]
    assert sum(rec.compressed > 0 for rec in history) >= 9  # it did compress (all but the refresh steps)


def test_ddp_hook_bytes_are_min_mn_over_r_fewer(ddp_ranks):
    """README: min(m, n)/r times fewer bytes for the projected weights on steps without a refresh."""
    model = ConvNet()
    for case, proj in (("hook-dct-std", "std"), ("hook-random-reverse", "reverse_std"), ("hook-svd-full", "full")):
        shapes = {n: matrix_shape(p.shape) for n, p in model.named_parameters() if n in PROJECTED}
        full = sum(m * n for m, n in shapes.values()) * 4
        low = sum(lowrank_numel((m, n), 3, proj) for m, n in shapes.values()) * 4
        if proj == "std":  # r x max(m, n) per weight: exactly min(m, n)/r fewer, weight by weight
            assert low == sum(3 * max(m, n) for m, n in shapes.values()) * 4
        elif proj == "reverse_std":  # r x min(m, n): max(m, n)/r fewer
            assert low == sum(3 * min(m, n) for m, n in shapes.values()) * 4
        else:  # r x r
            assert low == 4 * 9 * 4
        expected = expected_bytes(ddp_groups(model, proj_type=proj))
        gap = 100 if "svd" in case else 4
        for step, rec in enumerate(ddp_ranks[0][case]["bytes"]):
            assert rec.projected_plain == full
            if step % gap == 0:
                assert rec.compressed == 0 and rec.reduced == rec.plain
            else:
                assert rec.compressed == 4 and rec.projected_reduced == low, (case, step)
                assert (rec.reduced, rec.plain) == (expected.reduced, expected.plain)


@pytest.mark.parametrize("case", ["rsvd-energy", "random"])
def test_ddp_checkpoint_resume_is_exact(ddp_ranks, case):
    for out in ddp_ranks:
        res = out[f"ckpt-{case}"]
        for order in ("before", "after"):
            assert_same(res[order]["weights"], res["whole"]["weights"], f"{case} hook {order} load: weights")
            assert_same(res[order]["state"], res["whole"]["state"], f"{case} hook {order} load: state")
            assert [r.compressed for r in res[order]["bytes"]] == [r.compressed for r in res["whole"]["bytes"][5:]]


def test_ddp_misuse_fails_clearly_on_every_rank(ddp_ranks):
    for out in ddp_ranks:
        m = out["misuse"]
        assert m["no_optimizer"].startswith("TypeError") and "GaLoreAdamW" in m["no_optimizer"]
        assert m["torch_adamw"].startswith("TypeError") and "GaLoreAdamW" in m["torch_adamw"]
        assert m["not_ddp"].startswith("TypeError") and "DistributedDataParallel" in m["not_ddp"]
        assert m["other_model"].startswith("ValueError") and "none of" in m["other_model"]
        for key in ("rank_differs", "partial_checkpoint"):
            assert m[key] is not None and m[key].startswith("ValueError") and "differs between the ranks" in m[key]
        assert m["second_optimizer"].startswith("ValueError") and "another optimizer" in m["second_optimizer"]
        assert m["alive"]


# ---- FSDP2 --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """fc1 29 x 13 (right projection under "std": row-local), fc2 17 x 29 (left: all-reduced r x n), head
    2 x 17 (left; rows 1, 1, 0 over 3 ranks: an empty shard), a LayerNorm and biases (plain AdamW)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(13, 29)
        self.norm = nn.LayerNorm(29)
        self.fc2 = nn.Linear(29, 17)
        self.head = nn.Linear(17, 2, bias=False)

    def forward(self, x, y):
        return F.mse_loss(self.head(F.silu(self.fc2(self.norm(F.silu(self.fc1(x)))))), y)


FSDP_STEPS, FSDP_BATCH = 10, 6  # global batch 6: 2 samples per rank on 3 ranks
FSDP_CASES = {  # refreshes at steps 0, 3, 6, 9
    "rsvd-energy": dict(projector="rsvd", rank_policy="energy", energy_threshold=0.8, min_rank=1),
    "warm-reverse-rotate": dict(projector="warm", proj_type="reverse_std", moments_on_refresh="rotate"),
}


def fsdp_opt(model, rank=3, **strategy):
    named = dict(model.named_parameters())
    weights = ("fc1.weight", "fc2.weight", "head.weight")
    keys = {"update_proj_gap": 3, "scale": 0.5, "projector": "rsvd", **strategy}
    return GaLoreAdamW([{"params": [p for n, p in named.items() if n not in weights]},
                        {"params": [named[n] for n in weights[:2]], "rank": rank, **keys},
                        {"params": [named["head.weight"]], "rank": 1, **keys}],  # min(m, n) = 2
                       lr=3e-3, eps=1e-4, weight_decay=0.02, seed=5)


def fsdp_data(step):
    g = torch.Generator().manual_seed(4242 + step)
    x = torch.randn(FSDP_BATCH, 13, generator=g)
    return x, torch.tanh(x[:, :2] * 2) + 0.1 * torch.randn(FSDP_BATCH, 2, generator=g)


def fsdp_shard(model, mesh, **kw):
    from torch.distributed.fsdp import fully_shard
    for module in (model.fc1, model.fc2):
        fully_shard(module, mesh=mesh, **kw)
    return fully_shard(model, mesh=mesh, **kw)


def fsdp_loop(model, opt, steps, rank=None, world=None):
    for step in steps:
        x, y = fsdp_data(step)
        if rank is not None:  # this rank's part of the global batch
            b = FSDP_BATCH // world
            x, y = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
        model(x, y).backward()
        opt.step()
        opt.zero_grad()


def fsdp_state_dict(model, opt, path, save):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    if save:
        dcp.save(sd, checkpoint_id=path)
    else:
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])


def fsdp_refusal(rank, mesh, make):
    """(error text or None, nothing changed?) for one step of a misconfigured sharded model."""
    model, opt = make()
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    x, y = fsdp_data(0)
    model(x[rank * 2:rank * 2 + 2], y[rank * 2:rank * 2 + 2]).backward()
    try:
        opt.step()
        error = None
    except Exception as exc:  # noqa: BLE001 (recorded for the tests to judge)
        error = f"{type(exc).__name__}: {exc}"
    untouched = not opt.state and all(torch.equal(before[n], p.to_local()) for n, p in model.named_parameters())
    return error, untouched


def fsdp_worker(rank, world, workdir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    mesh = init_device_mesh("cpu", (world,))
    out = {"runs": {}}
    for name, strategy in FSDP_CASES.items():
        ref = MLP()  # one process, the global batch (every rank computes it: it is small)
        ref_opt = fsdp_opt(ref, **strategy)
        fsdp_loop(ref, ref_opt, range(FSDP_STEPS))
        model = fsdp_shard(MLP(), mesh)
        opt = fsdp_opt(model, **strategy)
        fsdp_loop(model, opt, range(FSDP_STEPS), rank, world)
        full = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
        ref_params = dict(ref.named_parameters())
        out["runs"][name] = {
            "errors": {n: float((full[n] - ref_params[n].detach()).norm() / ref_params[n].detach().norm())
                       for n in full},
            "ranks": [opt.state[p].get("rank") for p in model.parameters()],
            "ref_ranks": [ref_opt.state[p].get("rank") for p in ref.parameters()],
            "digest": {n: v.tolist() for n, v in full.items()},
        }
        if name == "rsvd-energy":  # resume: 4 steps, save (DCP, not flattened), fresh model, 6 more steps
            whole = full
            model = fsdp_shard(MLP(), mesh)
            opt = fsdp_opt(model, **strategy)
            fsdp_loop(model, opt, range(4), rank, world)
            path = os.path.join(workdir, "fsdp_ckpt")
            fsdp_state_dict(model, opt, path, save=True)
            model = fsdp_shard(MLP(seed=1), mesh)
            opt = fsdp_opt(model, **strategy)
            fsdp_state_dict(model, opt, path, save=False)
            fsdp_loop(model, opt, range(4, FSDP_STEPS), rank, world)
            out["resume_equal"] = all(torch.equal(p.detach().full_tensor(), whole[n])
                                      for n, p in model.named_parameters())
    # refusals, each on every rank before anything changes
    def shard1():  # fc2 (17 x 27) sharded by columns (FSDP2 needs them to split evenly: 27 = 3 x 9)
        model = MLP()
        model.fc1, model.norm = nn.Linear(13, 27), nn.LayerNorm(27)
        model.fc2 = nn.Linear(27, 17)
        from torch.distributed.fsdp import fully_shard
        fully_shard(model.fc2, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
        fully_shard(model, mesh=mesh)
        return model, fsdp_opt(model)

    out["shard1"] = fsdp_refusal(rank, mesh, shard1)
    out["rank_differs"] = fsdp_refusal(rank, mesh, lambda: (lambda m: (m, fsdp_opt(m, rank=3 if rank else 2)))(
        fsdp_shard(MLP(), mesh)))
    t = torch.ones(1)
    dist.all_reduce(t)
    out["alive"] = float(t) == world
    return out


@pytest.fixture(scope="module")
def fsdp_ranks():
    return spawn(fsdp_worker, 3)


@pytest.mark.parametrize("case", list(FSDP_CASES))
def test_fsdp_equals_one_process(fsdp_ranks, case):
    """10 steps crossing 4 refreshes on 3 uneven shards (one empty) equal one process to the promised 1e-5."""
    for out in fsdp_ranks:
        run = out["runs"][case]
        worst = max(run["errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, (case, worst)
        assert run["ranks"] == run["ref_ranks"]
        assert run["digest"] == fsdp_ranks[0]["runs"][case]["digest"]  # every rank sees the same model
    if case == "rsvd-energy":
        assert any(r is not None and r < 3 for r in fsdp_ranks[0]["runs"][case]["ranks"])


def test_fsdp_resume_through_get_set_optimizer_state_dict(fsdp_ranks):
    assert all(out["resume_equal"] for out in fsdp_ranks)


def test_fsdp_refusals_on_every_rank(fsdp_ranks):
    for out in fsdp_ranks:
        error, untouched = out["shard1"]
        assert error is not None and error.startswith("NotImplementedError") and "Shard(0)" in error
        assert untouched
        error, untouched = out["rank_differs"]
        assert error is not None and "differ" in error, error
        assert untouched
        assert out["alive"]


def test_ddp_layerwise_with_hook_equals_ordinary_loop(ddp_ranks):
    """LayerwiseUpdates(model=ddp) + the hook + projector "random", 3 no_sync micro-batches, unused params."""
    for out in ddp_ranks:
        assert_same(out["layerwise-random"]["weights"], out["replica-random"]["weights"], "weights")
        assert_same(out["layerwise-random"]["state"], out["replica-random"]["state"], "state")
