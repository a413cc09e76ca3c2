"""Bytes the optimizer communicates under FSDP2: our sharded step and refresh vs the DTensor default.

For the projected weights (attention and MLP linears) of GaLore's LLaMA 350M, 1B and 7B at world sizes
2 to 64, computed from the shapes with lowrank_kernels.distributed.fsdp.collective_volume, which a
measured run checks (below): every collective of real fully_shard runs on gloo, recorded by
CollectiveLog, equals the formula element for element.

* ours: a step all-reduces r x n fp32 per left-projected weight (right-projected: nothing); a refresh
  (rsvd, oversample 10, 2 power iterations, w = r + 10 columns) all-gathers (q+1) m x w sketches and
  all-reduces (q+1) n x w ones, plus the old left basis (m x r).
* DTensor default: ``torch.linalg.svd`` of the sharded fp32 gradient all-gathers the whole m x n matrix
  on every rank, then every rank computes the same SVD. Its step moves what ours does (P^T G of a
  row-sharded G is a partial sum either way), so only the refresh differs.

Wire bytes per rank assume ring algorithms: an all-reduce of B bytes sends 2 (W-1)/W B per rank, an
all-gather producing B bytes (W-1)/W B. For scale, FSDP2's own traffic for the same weights each step
(all-gather forward and backward, reduce-scatter of the gradient; fp32) is 3 (W-1)/W of their bytes.

    python bench/bench_fsdp.py            # table + plot -> bench/results/fsdp_comm_<date>.*
    python bench/bench_fsdp.py --quick    # skips the measured check
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from common import RESULTS_DIR, environment, write_results  # noqa: E402

from lowrank_kernels.distributed.fsdp import CollectiveLog, collective_volume  # noqa: E402

# name: (hidden size, layers, intermediate size, GaLore rank), as bench/memory_table.py
LLAMA = {"350M": (1024, 24, 2736, 256), "1B": (2048, 24, 5461, 512), "7B": (4096, 32, 11008, 1024)}
WORLDS = (2, 4, 8, 16, 32, 64)
GAP = 200  # update_proj_gap: refreshes per step, for the amortised column
FP32 = 4


def projected_shapes(hidden: int, layers: int, ffn: int) -> list[tuple[int, int]]:
    """(m, n) of every projected weight: q, k, v, o (d x d), gate and up (f x d), down (d x f)."""
    return [(hidden, hidden)] * 4 * layers + [(ffn, hidden)] * 2 * layers + [(hidden, ffn)] * layers


def wire(elements: dict, world: int) -> float:
    """Bytes one rank sends for these collective payloads (fp32), ring algorithms."""
    share = (world - 1) / world
    return FP32 * share * (2 * elements.get("all_reduce", 0) + elements.get("all_gather", 0))


def model_bytes(shapes, group: dict, world: int) -> dict:
    ours_step = ours_refresh = default_refresh = fsdp_own = 0.0
    for m, n in shapes:
        volume = collective_volume(m, n, group, world)
        ours_step += wire(volume["step"], world)
        ours_refresh += wire(volume["refresh"], world)
        default_refresh += wire({"all_gather": -(-m // world) * world * n}, world)
        fsdp_own += 3 * FP32 * (world - 1) / world * m * n
    return {"step": ours_step, "ours_refresh": ours_refresh, "default_refresh": default_refresh,
            "fsdp_own": fsdp_own}


def table() -> list[dict]:
    rows = []
    mib = 2.0**20
    for name, (hidden, layers, ffn, paper_rank) in LLAMA.items():
        shapes = projected_shapes(hidden, layers, ffn)
        for rank, projector in ((paper_rank, "rsvd"), (paper_rank, "warm"), (128, "rsvd")):
            for world in WORLDS:
                b = model_bytes(shapes, {"rank": rank, "projector": projector}, world)
                rows.append({
                    "model": name, "rank": rank, "projector": projector, "world": world,
                    "step MiB (both)": round(b["step"] / mib, 2),
                    "refresh MiB ours": round(b["ours_refresh"] / mib, 1),
                    "refresh MiB DTensor": round(b["default_refresh"] / mib, 1),
                    "refresh ours/DTensor": round(b["ours_refresh"] / b["default_refresh"], 3),
                    f"per step, T={GAP}: ours/DTensor": round((b["step"] + b["ours_refresh"] / GAP)
                                                              / (b["step"] + b["default_refresh"] / GAP), 3),
                    "FSDP2 own MiB/step": round(b["fsdp_own"] / mib, 1),
                })
    return rows


# ---- the measured check: real fully_shard runs on gloo ---------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(rank: int, world: int, port: int, out_path: str) -> None:
    """5 steps (refreshes at 0, 2, 4) of a small LLaMA per projector: measured vs predicted elements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lowrank_kernels import GaLoreAdamW
    from lowrank_kernels.demo.model import Llama, ModelConfig
    from lowrank_kernels.hf import galore_param_groups
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", (world,))
        result = []
        for projector in ("rsvd", "warm"):
            torch.manual_seed(0)
            model = Llama(ModelConfig(vocab_size=64, dim=48, n_layers=2, n_heads=4, ffn_dim=130))
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            group = {"rank": 8, "projector": projector}
            opt = GaLoreAdamW(galore_param_groups(model, r".*\.(attn|mlp)\..*", update_proj_gap=2, **group),
                              lr=1e-3)
            projected = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
            tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(rank))
            for step in range(5):
                model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
                with CollectiveLog() as default:  # what DTensor's SVD of each sharded fp32 gradient sends
                    for p in projected:
                        torch.linalg.svd(p.grad.float(), full_matrices=False)
                with CollectiveLog() as ours:
                    opt.step()
                opt.zero_grad()
                predicted, predicted_default = {}, {"all_gather": 0}
                for p in projected:
                    m, n = p.shape
                    volume = collective_volume(m, n, group, world, first=step == 0)
                    for part in [volume["step"]] + ([volume["refresh"]] if step % 2 == 0 else []):
                        for op, k in part.items():
                            predicted[op] = predicted.get(op, 0) + k
                    predicted_default["all_gather"] += -(-m // world) * world * n
                result.append({"projector": projector, "step": step, "measured ours": ours.totals(),
                               "predicted ours": predicted, "measured DTensor svd": default.totals(),
                               "predicted DTensor svd": predicted_default,
                               "largest collective ours": max((k for _, k, _ in ours.calls), default=0),
                               "smallest projected m*n": min(p.shape[0] * p.shape[1] for p in projected)})
        if rank == 0:
            with open(out_path, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
    finally:
        torch.distributed.destroy_process_group()


def measured_check() -> list[dict]:
    rows = []
    for world in (2, 3):
        path = os.path.join(RESULTS_DIR, f".fsdp_measured_{world}.json")
        torch.multiprocessing.spawn(_measure, args=(world, _free_port(), path), nprocs=world)
        with open(path, encoding="utf-8") as f:
            for r in json.load(f):
                r["world"] = world
                r["ours matches"] = r["measured ours"] == r["predicted ours"]
                r["DTensor matches"] = r["measured DTensor svd"] == r["predicted DTensor svd"]
                rows.append(r)
        os.remove(path)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(LLAMA), figsize=(5.5 * len(LLAMA), 4.2))
    for ax, name in zip(axes, LLAMA):
        mine = [r for r in rows if r["model"] == name]
        for i, (rank, projector) in enumerate(dict.fromkeys((r["rank"], r["projector"]) for r in mine)):
            sel = [r for r in mine if (r["rank"], r["projector"]) == (rank, projector)]
            worlds = [r["world"] for r in sel]
            ax.plot(worlds, [r["refresh MiB ours"] for r in sel], "o-", color=f"C{i}",
                    label=f"refresh, ours ({projector}, r={rank})")
            if i == 0:
                ax.plot(worlds, [r["refresh MiB DTensor"] for r in sel], "s--", color="C3",
                        label="refresh, DTensor svd (all-gather G)")
                ax.plot(worlds, [r["FSDP2 own MiB/step"] for r in sel], ":", color="gray",
                        label="FSDP2's own traffic per step")
            if projector == "rsvd":
                ax.plot(worlds, [r["step MiB (both)"] for r in sel], "^-.", color=f"C{i}", alpha=0.6,
                        label=f"ordinary step, both (r={rank})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"LLaMA {name}: optimizer MiB sent per rank (fp32)")
        ax.set_xlabel("world size (FSDP2 ranks)")
        ax.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the measured check (spawns gloo ranks)")
    args = parser.parse_args()
    rows = table()
    meta = {**environment(), "device": "computed from shapes", "oversample": 10, "niter": 2,
            "proj_type": "std", "dtype": "fp32 gradients and partial sums", "update_proj_gap": GAP}
    if not args.quick:
        checks = measured_check()
        meta["measured check (gloo; LLaMA dim 48, ffn 130, rank 8; rsvd and warm; worlds 2 and 3; 5 steps)"] = (
            "all steps match" if all(c["ours matches"] and c["DTensor matches"] for c in checks) else "MISMATCH")
        meta["measured steps"] = json.dumps(checks)
    columns = list(rows[0])
    md, _ = write_results("fsdp_comm", rows, meta, columns)
    plot(rows, md[:-3] + ".png")
    print(f"wrote {md[:-3]}.png")


if __name__ == "__main__":
    main()
