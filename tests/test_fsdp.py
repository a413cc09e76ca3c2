"""GaLoreAdamW on FSDP2 (fully_shard, CPU, gloo): sharded steps and refreshes equal one-process training.

FSDP2 runs on CPU with gloo in torch 2.13 (a "cpu" device mesh), so these tests use real fully_shard
models, not hand-distributed DTensors. Each world size is one spawn running every case
(tests/fsdp_utils.py::worker); the workers record measurements and the tests below judge them.
World size 3 splits the 20/34/37-row weights unevenly and leaves one rank an empty shard of the 2-row
``head2``; it also resumes from the checkpoint the 2-rank run saved (DCP resharding).
"""
import os

import pytest
import torch
import torch.distributed as dist

import fsdp_utils
from dist_utils import free_port, single_threaded_children
from lowrank_kernels.distributed.fsdp import collective_volume

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

# fp32 runs of 12 steps spanning 3 refreshes; one-process runs that differ only in batch splitting agree
# to 1.3e-6 (fsdp_utils.optimizer), so 1e-5 leaves room for FSDP's reduction order and no more.
TOL = 1e-5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fsdp"))
    torch.set_num_threads(1)
    fsdp_utils.reference_runs(path)
    return path


def spawn(world: int, workdir: str) -> dict:
    with single_threaded_children():  # one MKL/OpenMP thread in every thread of the workers (dist_utils)
        torch.multiprocessing.spawn(fsdp_utils.worker, args=(world, workdir, free_port()), nprocs=world)
    return torch.load(os.path.join(workdir, f"results_world{world}.pt"))


@pytest.fixture(scope="module")
def world2(workdir):
    return spawn(2, workdir)


@pytest.fixture(scope="module")
def world3(workdir, world2):  # after world2: it loads the checkpoint that run saved
    return spawn(3, workdir)


@pytest.fixture(params=[2, 3])
def results(request):
    return request.getfixturevalue(f"world{request.param}")


def test_sharded_rsvd_reproduces_one_process_rsvd(results):
    """Same test matrix and QR sequence: same vectors and signs up to roundoff; identical on every rank."""
    for (m, n), r in results["rsvd"].items():
        assert r["err"] < 1e-5, (m, n, r)
        assert r["identical"], f"ranks disagree on the basis of a {m}x{n} matrix"
        assert sum(r["rows"]) == m
    if len(results["rsvd"][(2, 30)]["rows"]) == 3:  # the 2-row matrix leaves one of 3 ranks no rows
        assert results["rsvd"][(2, 30)]["rows"] == [1, 1, 0]


@pytest.mark.parametrize("config", list(fsdp_utils.CONFIGS))
def test_training_equals_one_process(results, config):
    run = results["runs"][config]
    worst = max(run["errors"].items(), key=lambda kv: kv[1])
    assert worst[1] < TOL, f"{config}: {worst}"
    assert max(run["loss_errors"]) < TOL
    for name, (ours, theirs) in run["ranks"].items():
        assert ours == theirs, f"{config}: {name} chose rank {ours}, one process {theirs}"
    assert run["replicated_identical"], "replicated state differs between ranks"


def test_energy_policy_changed_ranks(world2):
    """The energy runs above would not test rank changes if every weight kept its maximum rank."""
    ranks = [ours for ours, _ in world2["runs"]["std-energy-keep"]["ranks"].values()]
    assert min(ranks) < 6, ranks


def test_layerwise_updates_under_fsdp2(results):
    """FSDP2 runs the post-accumulate-grad hooks itself, after its reduce-scatter: same result as step()."""
    lw = results["layerwise"]
    assert max(lw["errors"].values()) < TOL
    assert lw["bitwise_equal_to_step"]


def test_dcp_resume_is_exact_on_the_same_world_size(world2):
    assert world2["resume_bitwise"]


def test_dcp_resume_on_another_world_size(world3):
    """Saved on 2 ranks at step 6, loaded on 3 (DCP re-chunks the Shard(0) state): same trajectory."""
    errors = world3["resharded_errors"]
    assert max(errors.values()) < TOL, max(errors.items(), key=lambda kv: kv[1])


def test_no_collective_moves_a_full_matrix(world3):
    """Per parameter, the collectives are exactly the sketch-sized ones collective_volume predicts."""
    rows, (totals, count, torch_count) = world3["collectives"]
    world = 3
    expected_total: dict = {}
    for step, name, m, n, side, rank, calls in rows:
        if side is None:
            assert calls == [], f"unprojected {name} communicated: {calls}"
            continue
        volume = collective_volume(m, n, {"rank": rank}, world, first=True)
        want = dict(volume["step"])
        if step == 0:
            for op, k in volume["refresh"].items():
                want[op] = want.get(op, 0) + k
        got: dict = {}
        for op, k, _ in calls:
            got[op] = got.get(op, 0) + k
        assert got == want, (step, name, side, got, want)
        biggest = max((k for _, k, _ in calls), default=0)
        if min(rank + 10, m, n) < min(m, n):  # the sketch is thinner than the matrix
            assert biggest < m * n, (name, biggest)
        else:  # head2 (2 x 20): rank 1 + oversample 10 columns cover both rows, the sketch is all of G
            assert biggest <= m * n
        if step == 0:
            later = collective_volume(m, n, {"rank": rank}, world)
            for op, k in {**later["step"]}.items():
                expected_total[op] = expected_total.get(op, 0) + k
            for op, k in later["refresh"].items():
                expected_total[op] = expected_total.get(op, 0) + k
    assert totals == expected_total
    assert count == torch_count > 0, "torch's CommDebugMode counts another number of collectives"


def test_refusals_and_nonfinite_gradient(world2):
    out = world2["refusals"]
    assert out["svd"].startswith("ValueError") and "projector='rsvd'" in out["svd"]
    assert out["converged"].startswith("NotImplementedError")
    assert out["nan"].startswith("RuntimeError") and "non-finite" in out["nan"]
    for key in ("svd", "converged", "nan"):
        assert out[key + "_untouched"], f"{key}: something changed before the error"


def test_fused_kernels_on_local_shards(world2):
    """backend='triton' (the interpreter here) steps each rank's rows with the fused kernels."""
    out = world2["kernels"]
    if out is None:
        pytest.skip("CUDA machine: backend='triton' needs CUDA tensors there; the gpu test covers it")
    assert out["kernel_calls"] > 0
    # fp32 kernels against the reference over 3 steps: both accumulate in fp32, in other orders
    assert max(out["errors"].values()) < 1e-5, out["errors"]


@pytest.mark.gpu
def test_fused_kernels_on_local_shards_cuda(tmp_path):
    """backend='auto' picks the Triton kernels for CUDA shards (one rank, nccl): same result as 'torch'."""
    pytest.importorskip("triton")
    torch.multiprocessing.spawn(fsdp_utils.cuda_worker, args=(str(tmp_path), free_port()), nprocs=1)
    out = torch.load(os.path.join(tmp_path, "cuda.pt"))
    assert out["kernel_calls"] > 0
    assert max(out["errors"].values()) < 1e-4, out["errors"]  # fp32 kernels vs reference, 6 steps
