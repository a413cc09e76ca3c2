"""Run a function in a CPU gloo process group of a few local processes (the distributed tests' helper).

    from dist_utils import run_distributed
    outputs = run_distributed(fn, world_size=2, *args)   # [fn(rank, world_size, *args) for each rank]

``fn`` must be importable by name (defined at module level), since the workers are spawned processes.
Each worker runs with one intra-op thread (the test machines have 2 cores), joins the group through
``tcp://127.0.0.1:<free port>``, and hands its return value back through ``torch.save`` in a temporary
directory; an exception in any worker fails the call with that worker's traceback.
"""
from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_distributed(fn, world_size: int, *args) -> list:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each rank in its own process."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
