"""Data-parallel GaLore with torchrun: DDP plus the communication hook that all-reduces projected gradients.

    torchrun --nproc_per_node 2 examples/train_ddp.py                 # CPU: gloo; GPUs: nccl, one per process
    torchrun --nproc_per_node 2 examples/train_ddp.py --layerwise     # steps inside backward, per DDP bucket
    torchrun --nproc_per_node 2 examples/train_ddp.py --no-hook       # plain DDP, to compare bytes

A tiny LLaMA (lowrank_kernels/demo/model.py) on the demo corpus; each rank reads its own batches. Every
``--log-every`` steps rank 0 prints the loss averaged over ranks and the bytes the last step
all-reduced; at the end every rank checks that all replicas hold bit-identical weights.
"""
import argparse
import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from lowrank_kernels import GaLoreAdamW, LayerwiseUpdates
from lowrank_kernels.demo.data import load_splits, train_batches
from lowrank_kernels.demo.model import GALORE_TARGETS, Llama, ModelConfig
from lowrank_kernels.distributed import register_lowrank_comm_hook
from lowrank_kernels.hf import galore_param_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch and rank")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--update-proj-gap", type=int, default=10)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--layerwise", action="store_true", help="LayerwiseUpdates(model=ddp)")
    parser.add_argument("--no-hook", action="store_true", help="plain DDP all-reduce")
    parser.add_argument("--log-every", type=int, default=5)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway
    model = Llama(ModelConfig(dim=128, n_layers=2, n_heads=4)).to(device)
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    groups = galore_param_groups(model, GALORE_TARGETS, rank=args.rank, update_proj_gap=args.update_proj_gap,
                                 projector="rsvd")
    optimizer = GaLoreAdamW(groups, lr=1e-2, weight_decay=0.0, backend="auto")
    hook = None if args.no_hook else register_lowrank_comm_hook(ddp, optimizer)
    # Layer-wise: per-parameter clipping only (no moment has all gradients); otherwise global clipping,
    # which with the hook clips by the norm of the projected gradients (p.grad = P R̄, ||P R̄|| = ||R̄||).
    layerwise = (LayerwiseUpdates(optimizer, args.accum, max_grad_norm=args.max_grad_norm, model=ddp)
                 if args.layerwise else None)

    train_data, _ = load_splits()
    batches = train_batches(train_data, args.batch_size, 64, args.steps * args.accum, seed=1000 + rank)
    for step in range(args.steps):
        total = torch.zeros((), device=device)
        for micro in range(args.accum):
            x, y = (t.to(device) for t in next(batches))
            last = micro == args.accum - 1
            # Only the last micro-batch all-reduces: no_sync() must cover forward and backward.
            with contextlib.nullcontext() if last else ddp.no_sync():
                loss = F.cross_entropy(ddp(x).flatten(0, 1), y.flatten()) / args.accum
                if layerwise is not None:
                    layerwise.backward(loss)
                else:
                    loss.backward()
            total += loss.detach()
        if layerwise is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        dist.all_reduce(total)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            sent = f", all-reduced {hook.history[-1].reduced / 2**20:.2f} MiB " \
                   f"(plain DDP: {hook.history[-1].plain / 2**20:.2f})" if hook is not None else ""
            print(f"step {step:4d}  loss {total.item() / world:.4f}{sent}", flush=True)

    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # small model: gather it all
    gathered = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(gathered, weights)
    identical = all(torch.equal(g, gathered[0]) for g in gathered)
    if rank == 0:
        if hook is not None:
            print(f"all-reduced {hook.bytes_reduced / 2**20:.1f} MiB in all, plain DDP would have "
                  f"{hook.bytes_plain / 2**20:.1f} MiB ({hook.bytes_plain / hook.bytes_reduced:.2f}x)")
        print(f"replicas bit-identical: {identical}")
    dist.destroy_process_group()
    if not identical:
        raise SystemExit("replicas diverged")


if __name__ == "__main__":
    main()
