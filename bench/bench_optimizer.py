"""Whole-optimizer step times: GaLoreAdamW (exact and randomized SVD) against galore-torch and AdamW.

Two kinds of step are timed on one full-rank m x n weight with a fixed gradient:

* refresh step: the basis is recomputed from the gradient (update_proj_gap=1), then the ordinary step;
* ordinary step: project, low-rank Adam, back-project and update (the basis is computed in warm-up).

AdamW (torch.optim, default foreach path) has no refresh; it is the ordinary-step baseline. Every number
of a table comes from one run on one machine; ratios are ``other / ours`` (above 1: we are faster).

    python bench/bench_optimizer.py            # 1024x1024 and 2048x5504, rank 128, on CUDA if present
    python bench/bench_optimizer.py --quick    # small shapes, to exercise the code
"""
from __future__ import annotations

import argparse
import warnings

import torch

from common import environment, timeit, write_results
from lowrank_kernels import GaLoreAdamW

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import galore_torch
except ImportError:  # galore-torch needs transformers and bitsandbytes to import
    galore_torch = None


def _optimizer(kind: str, weight: torch.nn.Parameter, rank: int, gap: int):
    group = {"params": [weight], "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
    if kind == "adamw":
        return torch.optim.AdamW([weight], lr=1e-3, weight_decay=0.0)
    if kind == "galore-torch":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return galore_torch.GaLoreAdamW([group], lr=1e-3)
    backend, projector = kind.split("/")[1:]
    return GaLoreAdamW([{**group, "projector": projector}], lr=1e-3, backend=backend)


def _step_time(kind, m, n, rank, refresh, device, dtype, warmup, rep) -> float:
    g = torch.Generator(device="cpu").manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(m, n, generator=g).to(device, dtype) * 0.02)
    weight.grad = torch.randn(m, n, generator=g).to(device, dtype)
    opt = _optimizer(kind, weight, rank, gap=1 if refresh else 10**9)
    opt.step()  # first step: creates state and the basis, so "ordinary" times exclude the refresh
    return timeit(opt.step, warmup=warmup, rep=rep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    shapes = [(256, 256), (256, 688)] if args.quick else [(1024, 1024), (2048, 5504)]
    rank = 32 if args.quick else 128
    backend = "auto" if device == "cuda" else "torch"
    kinds = ["adamw"] + (["galore-torch"] if galore_torch else []) + [f"ours/{backend}/svd",
                                                                     f"ours/{backend}/rsvd"]
    rows = []
    for m, n in shapes:
        for refresh in (True, False):
            times = {}
            for kind in kinds:
                if kind == "adamw" and refresh:
                    continue
                reps = (2, 3) if refresh else (3, 10)
                times[kind] = _step_time(kind, m, n, rank, refresh, device, dtype, *reps)
            for kind, ms in times.items():
                rows.append({
                    "shape": f"{m}x{n}", "rank": rank, "step": "refresh" if refresh else "ordinary",
                    "optimizer": kind, "ms": round(ms, 3),
                    "galore-torch / this": round(times["galore-torch"] / ms, 2) if "galore-torch" in times else "",
                    "AdamW / this": round(times["adamw"] / ms, 2) if "adamw" in times else "",
                })
    meta = {**environment(), "dtype": args.dtype, "quick": args.quick}
    columns = ["shape", "rank", "step", "optimizer", "ms", "galore-torch / this", "AdamW / this"]
    write_results("optimizer" + ("_quick" if args.quick else ""), rows, meta, columns)


if __name__ == "__main__":
    main()
