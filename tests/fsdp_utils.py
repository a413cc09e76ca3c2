"""Shared pieces of the FSDP2 tests: a small LLaMA, its param groups, data, and the training loops.

The model has weights of every orientation and an uneven split over 3 ranks (20, 34 and 37 rows), and a
2-row weight (``head2``) that leaves a rank with an empty shard at world size 3.
"""
from __future__ import annotations

import hashlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_kernels import GaLoreAdamW, LayerwiseUpdates
from lowrank_kernels.demo.model import Llama, ModelConfig

CFG = dict(vocab_size=37, dim=20, n_layers=2, n_heads=2, ffn_dim=34)
BATCH, SEQ, STEPS, GAP = 6, 8, 12, 4  # refreshes at steps 0, 4, 8 (the lazy policy may stretch that)

# name: strategy keys of the projected groups; every orientation, both rank policies, every moments rule
CONFIGS = {
    "std-energy-keep": dict(proj_type="std", rank_policy="energy", energy_threshold=0.5),
    "reverse-energy-rotate": dict(proj_type="reverse_std", rank_policy="energy", energy_threshold=0.5,
                                  moments_on_refresh="rotate"),
    "full-fixed-zero": dict(proj_type="full", moments_on_refresh="zero"),
    "warm-lazy": dict(projector="warm", refresh_policy="lazy", similarity_threshold=0.0, patience=1),
}


class TinyLlama(Llama):
    """The demo LLaMA plus a 2-row head; ``forward`` returns the loss (FSDP2 hooks wrap ``forward``)."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        super().__init__(ModelConfig(**CFG))
        self.head2 = nn.Linear(CFG["dim"], 2, bias=False)
        nn.init.normal_(self.head2.weight, std=0.2)

    def forward(self, tokens, targets):
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        logits = self.lm_head(h)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + self.head2(h).square().mean()


def groups(model: nn.Module, strategy: dict) -> list[dict]:
    keys = dict(update_proj_gap=GAP, scale=0.5, projector="rsvd")
    keys.update(strategy)
    named = list(model.named_parameters())
    projected = [p for n, p in named if ".attn." in n or ".mlp." in n]
    return [{"params": [p for n, p in named if ".attn." not in n and ".mlp." not in n and "head2" not in n]},
            {"params": projected, "rank": 6, **keys},
            {"params": [model.head2.weight], "rank": 1, **keys}]


def optimizer(model: nn.Module, strategy: dict, backend: str = "torch") -> GaLoreAdamW:
    # eps=1e-3: Adam's N = M / (sqrt(V) + eps) amplifies roundoff where |R| is near eps. With eps=1e-6 two
    # one-process runs that differ only in how the batch is split drift 2e-3 apart in 12 steps (the
    # "full" orientation, measured); with lr=3e-3, eps=1e-3 they agree to 1.3e-6 in every config, a margin
    # of 8x under the 1e-5 that the FSDP runs must meet.
    return GaLoreAdamW(groups(model, strategy), lr=3e-3, eps=1e-3, weight_decay=0.01, backend=backend, seed=3)


def data(steps: int = STEPS):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, CFG["vocab_size"], (steps, BATCH, SEQ + 1), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def train(model, opt, batches, layerwise: bool = False) -> list[float]:
    """The ordinary loop (or LayerwiseUpdates); returns each step's loss (this process's batch)."""
    losses = []
    lw = LayerwiseUpdates(opt) if layerwise else None
    for x, y in batches:
        loss = model(x, y)
        if lw is not None:
            lw.backward(loss)
        else:
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(float(loss.detach()))
    if lw is not None:
        lw.remove()
    return losses


def reference_runs(workdir: str) -> None:
    """One-process runs of every config on the global batch, saved for the distributed workers."""
    out = {}
    for name, strategy in CONFIGS.items():
        model = TinyLlama()
        opt = optimizer(model, strategy)
        losses = train(model, opt, data())
        bases = {n: dict(opt.state[p]) for n, p in model.named_parameters() if "proj_left" in opt.state[p]
                 or "proj_right" in opt.state[p]}
        out[name] = {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                     "bases": {n: {k: v for k, v in s.items() if k in ("proj_left", "proj_right", "rank")}
                               for n, s in bases.items()}}
    torch.save(out, os.path.join(workdir, "reference.pt"))


def init_process(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


# ---- the distributed worker: every case of one world size in one spawn ---------------------------------
def shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_batches(rank: int, world: int, steps=range(STEPS)):
    b = BATCH // world
    batches = data()
    return [(batches[i][0][rank * b:(rank + 1) * b], batches[i][1][rank * b:(rank + 1) * b]) for i in steps]


def rel_errors(model, params: dict) -> dict:
    return {n: float((p.detach().full_tensor() - params[n]).norm() / params[n].norm())
            for n, p in model.named_parameters()}


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().numpy().tobytes()).hexdigest()  # (hash() is salted per process)


def replicated_identical(opt) -> bool:
    """Are all replicated state tensors (bases Q, left/full moments) bitwise equal on every rank?"""
    from torch.distributed.tensor import Replicate
    digests = [digest(v.to_local()) for s in opt.state.values() for v in s.values()
               if hasattr(v, "placements") and v.placements == (Replicate(),)]
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, digests)
    return len(digests) > 0 and all(d == everyone[0] for d in everyone)


def fsdp_run(mesh, strategy: dict, steps=range(STEPS), layerwise=False, model=None, opt=None, backend="torch"):
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = model or shard(TinyLlama(), mesh)
    opt = opt or optimizer(model, strategy, backend)
    losses = train(model, opt, local_batches(rank, world, steps), layerwise)
    mean = torch.tensor(losses)
    torch.distributed.all_reduce(mean)
    return model, opt, (mean / world).tolist()


def sharded_rsvd_case(mesh) -> dict:
    """The sharded range finder against the one-process rsvd, on tall, wide and 2-row matrices."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from lowrank_kernels import rsvd
    from lowrank_kernels.distributed.fsdp import ShardedRows, _rsvd_single
    out = {}
    for m, n, k in ((41, 23, 5), (23, 41, 5), (2, 30, 1)):
        g = torch.Generator().manual_seed(m * n)
        A = torch.randn(m, n, generator=g) * torch.logspace(0, -2, n)  # decaying column scales
        local = distribute_tensor(A, mesh, [Shard(0)]).to_local()
        U, S, V = _rsvd_single(ShardedRows(local, m, mesh), k, 10, 2, seed=11)
        U1, S1, V1 = rsvd(A, k, seed=11)
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, (digest(torch.cat([U.flatten(), S, V.flatten()])),
                                                       local.shape[0]))
        out[(m, n)] = {"err": max(float((x - y).abs().max() / y.abs().max()) for x, y in ((U, U1), (S, S1), (V, V1))),
                       "identical": all(e[0] == everyone[0][0] for e in everyone),
                       "rows": [e[1] for e in everyone]}
    return out


def collective_case(mesh) -> tuple:
    """Collectives of 5 steps of a fixed-rank run (refreshes at steps 0 and 4).

    Steps 0-3 step parameter by parameter, each under its own CollectiveLog: rows (step, name, m, n,
    side, rank, calls). Step 4 is one opt.step() under torch's CommDebugMode and a CollectiveLog: (the
    log's totals, its number of collectives, CommDebugMode's).
    """
    from torch.distributed.tensor.debug import CommDebugMode

    from lowrank_kernels.distributed.fsdp import CollectiveLog
    from lowrank_kernels.projection import matrix_shape, orientation
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = shard(TinyLlama(), mesh)
    opt = optimizer(model, {})
    names = {p: n for n, p in model.named_parameters()}
    rows = []
    for step, (x, y) in enumerate(local_batches(rank, world, range(5))):
        model(x, y).backward()
        if step == 4:
            with CommDebugMode() as comm, CollectiveLog() as log:
                opt.step()
            whole = (log.totals(), len(log.calls), comm.get_total_counts())
            break
        for group in opt.param_groups:
            for p in group["params"]:
                with CollectiveLog() as log:
                    opt.step_param(p)
                m, n = matrix_shape(p.shape)
                side = orientation(group["proj_type"], m, n) if "rank" in group else None
                rows.append((step, names[p], m, n, side, group.get("rank"), log.calls))
        opt.zero_grad()
    return rows, whole


def refusal_case(mesh) -> dict:
    """Unsupported options raise clear errors on every rank, and a non-finite gradient on one rank stops
    every rank before anything changes."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out = {}
    for key, strategy in (("svd", {"projector": "svd"}), ("converged", {"refresh_policy": "converged"}),
                          ("nan", {})):
        model = shard(TinyLlama(), mesh)
        opt = optimizer(model, strategy)
        before = {n: p.to_local().clone() for n, p in model.named_parameters()}
        x, y = local_batches(rank, world, [0])[0]
        model(x, y).backward()
        if key == "nan" and rank == world - 1:
            model.layers[0].mlp.up_proj.weight.grad.to_local()[0, 0] = float("nan")
        try:
            opt.step()
            out[key] = None
        except Exception as exc:  # noqa: BLE001 (recorded for the test to judge)
            out[key] = f"{type(exc).__name__}: {exc}"
        out[key + "_untouched"] = (not opt.state and all(torch.equal(before[n], p.to_local())
                                                           for n, p in model.named_parameters()))
    return out


def dcp_save_load(model, opt, path: str, save: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    options = StateDictOptions(flatten_optimizer_state_dict=True)  # torchtitan's setting
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    if save:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        return
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)


def state_equal(opt_a, opt_b) -> bool:
    params = zip(*((p for g in o.param_groups for p in g["params"]) for o in (opt_a, opt_b)))
    for sa, sb in ((opt_a.state[a], opt_b.state[b]) for a, b in params):
        if sa.keys() != sb.keys():
            return False
        for key, a in sa.items():
            b = sb[key]
            if not (torch.equal(a.to_local(), b.to_local()) if torch.is_tensor(a) else a == b):
                return False
    return len(opt_a.state) > 0


def worker(rank: int, world: int, workdir: str, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    init_process(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        ref = torch.load(os.path.join(workdir, "reference.pt"))
        out = {"rsvd": sharded_rsvd_case(mesh), "runs": {}}
        for name, strategy in CONFIGS.items():
            model, opt, losses = fsdp_run(mesh, strategy)
            out["runs"][name] = {
                "errors": rel_errors(model, ref[name]["params"]),
                "loss_errors": [abs(a - b) / b for a, b in zip(losses, ref[name]["losses"])],
                "ranks": {n: (opt.state[p]["rank"], ref[name]["bases"][n]["rank"])
                          for n, p in model.named_parameters() if n in ref[name]["bases"]},
                "replicated_identical": replicated_identical(opt),
            }
            if name == "std-energy-keep":
                whole = (model, opt)
        strategy = CONFIGS["std-energy-keep"]
        model, opt, _ = fsdp_run(mesh, strategy, layerwise=True)
        out["layerwise"] = {"errors": rel_errors(model, ref["std-energy-keep"]["params"]),
                            "bitwise_equal_to_step": all(torch.equal(a.to_local(), b.to_local()) for a, b in
                                                         zip(model.parameters(), whole[0].parameters()))
                            and state_equal(opt, whole[1])}
        ckpt = os.path.join(workdir, "ckpt_world2_step6")
        if world == 2:  # save at step 6; resume in a fresh model and optimizer; must equal the whole run
            model, opt, _ = fsdp_run(mesh, strategy, steps=range(6))
            dcp_save_load(model, opt, ckpt, save=True)
            model, opt = shard(TinyLlama(seed=1), mesh), None
            opt = optimizer(model, strategy)
            dcp_save_load(model, opt, ckpt, save=False)
            fsdp_run(mesh, strategy, steps=range(6, STEPS), model=model, opt=opt)
            out["resume_bitwise"] = (all(torch.equal(a.to_local(), b.to_local()) for a, b in
                                         zip(model.parameters(), whole[0].parameters()))
                                     and state_equal(opt, whole[1]))
            out["refusals"] = refusal_case(mesh)
            # backend="triton" takes CPU tensors only under the interpreter (set by conftest without CUDA)
            out["kernels"] = kernels_case(mesh) if os.environ.get("TRITON_INTERPRET") == "1" else None
        else:  # the 2-rank checkpoint, resharded onto this world size by DCP
            model = shard(TinyLlama(seed=1), mesh)
            opt = optimizer(model, strategy)
            dcp_save_load(model, opt, ckpt, save=False)
            fsdp_run(mesh, strategy, steps=range(6, STEPS), model=model, opt=opt)
            out["resharded_errors"] = rel_errors(model, ref["std-energy-keep"]["params"])
            out["collectives"] = collective_case(mesh)
        if rank == 0:
            torch.save(out, os.path.join(workdir, f"results_world{world}.pt"))
    finally:
        torch.distributed.destroy_process_group()


class KernelCalls:
    """Counts calls of the fused kernels' entry points (the optimizer looks them up at every step)."""

    def __enter__(self):
        import lowrank_kernels.kernels as kernels
        import lowrank_kernels.kernels.backproject_update as bu
        self.count, self._saved = 0, [(kernels, "galore_step"), (bu, "backproject_update")]
        self._saved = [(module, name, getattr(module, name)) for module, name in self._saved]
        for module, name, fn in self._saved:
            setattr(module, name, self._counting(fn))
        return self

    def _counting(self, fn):
        def wrapped(*args, **kwargs):
            self.count += 1
            return fn(*args, **kwargs)
        return wrapped

    def __exit__(self, *exc):
        for module, name, fn in self._saved:
            setattr(module, name, fn)


def kernels_case(mesh, device="cpu", backend="triton", steps=range(3)) -> dict:
    """The fused kernels on local shards (backend "triton" under the interpreter on CPU, "auto" on CUDA)
    against the reference backend, on the same shards: 3 steps, a refresh and two ordinary steps."""
    params = {}
    with KernelCalls() as calls:
        for which in ("torch", backend):
            model = shard(TinyLlama().to(device), mesh)
            opt = optimizer(model, CONFIGS["std-energy-keep"], which)
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            train(model, opt, [(x.to(device), y.to(device)) for x, y in local_batches(rank, world, steps)])
            params[which] = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    errors = {n: float((params[backend][n] - p).norm() / p.norm()) for n, p in params["torch"].items()}
    return {"kernel_calls": calls.count, "errors": errors}


def cuda_worker(rank: int, workdir: str, port: int) -> None:
    """One CUDA rank (nccl): backend="auto" on shards runs the Triton kernels and matches backend="torch"."""
    from torch.distributed.device_mesh import init_device_mesh
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        out = kernels_case(init_device_mesh("cuda", (1,)), "cuda", "auto", range(6))
        torch.save(out, os.path.join(workdir, "cuda.pt"))
    finally:
        torch.distributed.destroy_process_group()
