"""Run a function in a CPU gloo process group of a few local processes (the distributed tests' helper).

    from dist_utils import run_distributed
    outputs = run_distributed(fn, world_size=2, *args)   # [fn(rank, world_size, *args) for each rank]

``fn`` must be importable by name (defined at module level), since the workers are spawned processes.
Each worker runs with one intra-op thread in EVERY thread (see ``SINGLE_THREADED``), joins the group through
``tcp://127.0.0.1:<free port>``, and hands its return value back through ``torch.save`` in a temporary
directory; an exception in any worker fails the call with that worker's traceback.
"""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


# Replicas must compute bit for bit alike, and MKL's GEMM rounds differently with 1 and 2 threads for some
# shapes: on the 2-core test machine P^T G of a 64x96 gradient with r = 5, 6, 7, 9, 10 or 11 columns does
# (r = 8 and 12, test_ddp's fixed ranks, does not; the energy rank policy picks the others, and only its
# scenarios were ever seen to differ). torch.set_num_threads(1) in the worker sets MKL's count for the
# calling thread only (mkl_set_num_threads_local): any other thread (gloo's workers, which run
# communication-hook callbacks) starts with MKL's and OpenMP's default, the core count. The environment
# fixes one thread for every thread of the process, with no dynamic adjustment (libgomp's follows the
# load average); the workers are spawned, so they read it before MKL and OpenMP start.
SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE"}


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


@contextlib.contextmanager
def single_threaded_children():
    """SINGLE_THREADED in the environment that processes spawned inside the block inherit (this process's
    own thread pools are already started, so it is unaffected); restored afterwards."""
    saved = {key: os.environ.get(key) for key in SINGLE_THREADED}
    os.environ.update(SINGLE_THREADED)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_distributed(fn, world_size: int, *args) -> list:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each rank in its own process."""
    with single_threaded_children(), tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def assert_same(a, b, what: str) -> None:
    """Bitwise equality of what ranks return: nested dicts and lists of tensors and plain values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            assert_same(a[key], b[key], f"{what}/{key}")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), what
    elif isinstance(a, list) and a and not isinstance(a[0], (int, float)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
    else:
        assert a == b, what
