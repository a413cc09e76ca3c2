"""DDP with GaLoreAdamW: bytes all-reduced and time per step, plain DDP against the low-rank comm hook.

Measured (CPU, gloo, 2 processes, one thread each): the demo LLaMA (lowrank_kernels/demo/model.py,
dim 128, 4 layers; --quick: 2 layers), GaLore (rank 32, "std") on the attention and MLP linears, trained
on the demo corpus with plain DDP, then from the same weights with
``lowrank_kernels.distributed.register_lowrank_comm_hook``. Bytes per step are the hook's own count
(plain DDP's are its bucket sizes); ms per step is rank 0's median wall time of forward, backward
(which contains the all-reduces), optimizer step and zero_grad, separately for steps with and without a
basis refresh. "max rel diff" is the largest ||W - W_plain|| / ||W_plain|| over the weights, just before
the second refresh and at the end. Before it the hook differs from plain DDP by fp32 roundoff; a refresh
turns roundoff into a rotation of the basis among near-equal singular values, and GaLore keeps Adam's
moments per basis coordinate, so after it runs drift apart. The control row, plain DDP with every
gradient multiplied by 1 + 2^-22 (about one ulp), shows that any roundoff-level change does the same
(tests/test_ddp.py keeps 1e-5 through refreshes on gradients with well-separated singular values).

Computed (shapes on the meta device, ``lowrank_kernels.distributed.ddp.expected_bytes``): bytes per
step for GaLore's LLaMA 60M, 350M and 1B layouts (bench/memory_table.py) at ranks 32..1024, fp32
gradients (bf16 halves every number, not the ratios): plain DDP, the hook between refreshes, and the
hook averaged over a 200-step refresh gap (one full all-reduce per gap). The same function applied to
the measured demo model must give exactly the measured bytes on every step without a refresh; the
script fails otherwise. A plot shows bytes per step against rank.

    python bench/bench_ddp.py                  # results into a scratch directory (printed)
    python bench/bench_ddp.py --out            # into bench/results/
    python bench/bench_ddp.py --quick
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from common import RESULTS_DIR, environment, write_results
from lowrank_kernels import GaLoreAdamW
from lowrank_kernels.demo.data import load_splits, train_batches
from lowrank_kernels.demo.model import GALORE_TARGETS, Llama, ModelConfig
from lowrank_kernels.distributed import register_lowrank_comm_hook
from lowrank_kernels.distributed.ddp import expected_bytes
from lowrank_kernels.hf import galore_param_groups
from memory_table import LLAMA

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from dist_utils import run_distributed  # noqa: E402  (the tests' gloo process-group launcher)

RANKS = (32, 64, 128, 256, 512, 1024)
MODELS = ("60M", "350M", "1B")
GAP_AVERAGED = 200  # galore-torch's default update_proj_gap, for the amortized column
MIB = 2**20


def demo_config(args) -> ModelConfig:
    return ModelConfig(dim=128, n_layers=2 if args.quick else 4, n_heads=4)


def train(rank: int, args, hook: bool, perturb: bool = False) -> dict:
    torch.manual_seed(0)
    model = Llama(demo_config(args))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = GaLoreAdamW(galore_param_groups(model, GALORE_TARGETS, rank=args.rank, update_proj_gap=args.gap),
                      lr=1e-2)
    state = register_lowrank_comm_hook(ddp, opt) if hook else None
    train_data, _ = load_splits()
    times, before_refresh = [], None
    for i, (x, y) in enumerate(train_batches(train_data, args.batch_size, 64, args.steps, seed=rank)):
        start = time.perf_counter()
        F.cross_entropy(ddp(x).flatten(0, 1), y.flatten()).backward()
        if perturb:  # the control: plain DDP with every gradient changed by about one ulp
            for p in model.parameters():
                p.grad.mul_(1 + 2**-22)
        opt.step()
        opt.zero_grad()
        times.append((time.perf_counter() - start) * 1e3)
        if i == args.gap - 1:  # the last step before the second refresh
            before_refresh = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"times": times, "bytes": state.history if hook else None, "before refresh": before_refresh,
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


def max_rel_diff(a: dict, b: dict) -> str:
    if a is None or b is None:
        return ""
    return f"{max(float((a[k] - w).norm() / w.norm()) for k, w in b.items()):.1e}"


def worker(rank: int, world_size: int, args) -> dict:
    return {"plain": train(rank, args, hook=False), "hook": train(rank, args, hook=True),
            "plain, grads x (1 + 2^-22)": train(rank, args, hook=False, perturb=True)}


def measured_rows(args) -> list[dict]:
    out = run_distributed(worker, 2, args)[0]
    model = Llama(demo_config(args))
    expected = expected_bytes(galore_param_groups(model, GALORE_TARGETS, rank=args.rank))
    history = out["hook"]["bytes"]
    refresh = [i % args.gap == 0 for i in range(args.steps)]
    for i, rec in enumerate(history):
        if not refresh[i] and dataclasses.replace(rec, buckets=0) != expected:
            raise SystemExit(f"step {i}: measured {rec} != computed {expected}")
    rows = []
    for method in out:
        times = out[method]["times"][1:]  # the first step includes DDP's bucket rebuild
        steady = [t for t, r in zip(times, refresh[1:]) if not r]
        at_refresh = [t for t, r in zip(times, refresh[1:]) if r]
        hook = method == "hook"
        compared = method != "plain"
        rows.append({
            "model": f"demo dim 128, {demo_config(args).n_layers} layers", "rank": args.rank, "method": method,
            "MiB/step": round((expected.reduced if hook else expected.plain) / MIB, 4),
            "projected MiB/step": round((expected.projected_reduced if hook else expected.projected_plain) / MIB, 4),
            "ms": round(statistics.median(steady), 2),
            "ms at refresh": round(statistics.median(at_refresh), 2) if at_refresh else "",
            "max rel diff to plain, before 2nd refresh":
                max_rel_diff(out[method]["before refresh"], out["plain"]["before refresh"]) if compared else "",
            "max rel diff to plain, end": max_rel_diff(out[method]["weights"], out["plain"]["weights"]) if compared else "",
        })
    return rows


def computed_rows() -> list[dict]:
    rows = []
    for name in MODELS:
        dim, layers, heads, ffn, paper_rank = LLAMA[name]
        with torch.device("meta"):
            model = Llama(ModelConfig(vocab_size=32000, dim=dim, n_layers=layers, n_heads=heads, ffn_dim=ffn))
        for r in RANKS:
            if r >= min(dim, ffn):  # GaLore needs r < min(m, n) for every projected weight
                continue
            b = expected_bytes(galore_param_groups(model, GALORE_TARGETS, rank=r))
            averaged = (b.plain + (GAP_AVERAGED - 1) * b.reduced) / GAP_AVERAGED
            rows.append({
                "model": f"LLaMA {name}", "rank": r, "paper rank": "yes" if r == paper_rank else "",
                "plain MiB/step": round(b.plain / MIB, 1), "hook MiB/step": round(b.reduced / MIB, 1),
                f"hook MiB/step, gap {GAP_AVERAGED}": round(averaged / MIB, 1),
                "projected x fewer": round(b.projected_plain / b.projected_reduced, 2),
                "whole model x fewer": round(b.plain / b.reduced, 2),
            })
    return rows


def plot(rows: list[dict], path: str, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(MODELS):
        mine = [r for r in rows if r["model"] == f"LLaMA {name}"]
        color = f"C{i}"
        ax.plot([r["rank"] for r in mine], [r["hook MiB/step"] for r in mine], "o-", color=color,
                label=f"LLaMA {name}, hook (between refreshes)")
        ax.axhline(mine[0]["plain MiB/step"], color=color, ls="--", lw=1, label=f"LLaMA {name}, plain DDP")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GaLore rank r (attention and MLP linears, proj_type std)")
    ax.set_ylabel("MiB all-reduced per step (fp32 gradients)")
    ax.set_title(f"DDP all-reduce volume: plain vs low-rank hook\n{meta['date']}, computed from shapes", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, 12 steps")
    parser.add_argument("--out", nargs="?", const=RESULTS_DIR, default=None, metavar="DIR",
                        help=f"write results to DIR (default with no DIR: {RESULTS_DIR}); "
                             "without --out, to a scratch directory")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gap", type=int, default=None, help="update_proj_gap (default 10; --quick: 4)")
    args = parser.parse_args()
    args.steps = args.steps or (12 if args.quick else 41)
    args.gap = args.gap or (4 if args.quick else 10)
    out_dir = args.out or tempfile.mkdtemp(prefix="bench_ddp_")
    torch.set_num_threads(1)
    meta = {**environment(), "load average at start": round(os.getloadavg()[0], 1), "processes": 2, "backend": "gloo", "threads per process": 1,
            "steps": args.steps, "update_proj_gap": args.gap, "batch per rank": f"{args.batch_size} x 64 tokens",
            "quick": args.quick}
    suffix = "_quick" if args.quick else ""
    write_results("ddp_measured" + suffix, measured_rows(args), meta,
                  ["model", "rank", "method", "MiB/step", "projected MiB/step", "ms", "ms at refresh",
                   "max rel diff to plain, before 2nd refresh", "max rel diff to plain, end"], out_dir=out_dir)
    rows = computed_rows()
    columns = list(rows[0])
    md, _ = write_results("ddp_bytes" + suffix, rows, {"date": meta["date"], "device": "computed",
                                                         "dtype": "float32 gradients",
                                                         "targets": "attention and MLP linears (GALORE_TARGETS)"},
                          columns, out_dir=out_dir)
    plot(rows, md[:-3] + ".png", meta)


if __name__ == "__main__":
    main()
