"""GaLoreAdamW on an FSDP2 (fully_shard) LLaMA: each rank steps its own rows, bases come from shards.

    torchrun --nproc_per_node 2 examples/train_fsdp.py                 # CPU (gloo) or one GPU per rank (nccl)
    torchrun --nproc_per_node 2 examples/train_fsdp.py --steps 50 --layerwise --checkpoint ckpt

The demo's small LLaMA (lowrank_kernels.demo) on its shipped corpus: every transformer block and the
root are ``fully_shard``-ed, the attention and MLP weights are projected with the randomized SVD
(``projector="rsvd"``; the exact SVD would need the whole gradient on every rank and is refused), the
rest is plain AdamW on the shards. Each rank reads its own part of the global batch. ``--layerwise``
steps every parameter inside backward (FSDP2 runs the hooks after its reduce-scatter). ``--checkpoint
DIR`` saves model and optimizer with torch.distributed.checkpoint at the end, or resumes from DIR if it
holds a checkpoint (on any world size).
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lowrank_kernels import GaLoreAdamW, LayerwiseUpdates
from lowrank_kernels.demo.data import load_splits, train_batches
from lowrank_kernels.demo.model import GALORE_TARGETS, Llama, ModelConfig
from lowrank_kernels.hf import galore_param_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global batch (split over ranks)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--gap", type=int, default=10, help="update_proj_gap")
    parser.add_argument("--layerwise", action="store_true")
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the world size {world}")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(0)  # the same initial weights on every rank, before sharding
    model = Llama(ModelConfig(dim=128, n_layers=4, n_heads=4)).to(device)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    groups = galore_param_groups(model, GALORE_TARGETS, rank=args.rank, update_proj_gap=args.gap, scale=0.25,
                                 projector="rsvd")
    opt = GaLoreAdamW(groups, lr=3e-3, weight_decay=0.0, backend="auto")

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    resume = args.checkpoint and os.path.exists(os.path.join(args.checkpoint, ".metadata"))
    if resume:
        model_sd, optim_sd = get_state_dict(model, opt, options=options)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=args.checkpoint)
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
        if rank == 0:
            print(f"resumed from {args.checkpoint}")

    train, _ = load_splits()
    local = args.batch // world
    layerwise = LayerwiseUpdates(opt) if args.layerwise else None
    for step, (x, y) in enumerate(train_batches(train, args.batch, args.seq, args.steps, seed=1)):
        x, y = x[rank * local:(rank + 1) * local].to(device), y[rank * local:(rank + 1) * local].to(device)
        loss = model.loss(x, y)  # calls model(x): FSDP2's hooks gather each block's weights around it
        if layerwise is not None:
            layerwise.backward(loss)
        else:
            loss.backward()
            opt.step()
            opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {float(mean) / world:.4f}", flush=True)

    if args.checkpoint and not resume:
        model_sd, optim_sd = get_state_dict(model, opt, options=options)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=args.checkpoint)
        if rank == 0:
            print(f"saved {args.checkpoint}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
