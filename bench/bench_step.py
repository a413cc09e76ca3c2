"""The fused ordinary step against the reference step, galore-torch's step and torch's fused AdamW.

Floor, before optimizing (4096 x 11008, bf16, rank 512; std projects the smaller side, so left,
P 4096 x 512, R and the moments 512 x 11008):

* bytes: the full-size tensors pass three times (G read, W read, W written): 3 x 45.1M x 2 B = 271 MB,
  81 us at the H100 SXM's 3.35 TB/s. The low-rank tensors add ~60 MB (P 4 MB; M and V read and written,
  N written and read, 11 MB each), much of it from L2.
* flops: two GEMMs of 2mnr = 46.2 GFLOP each, 92 GFLOP: 93 us at the dense bf16 peak (989 TFLOPS),
  ~130-150 us at a realistic 60-70% of it. At r = 512 the step is compute-bound, not bandwidth-bound:
  the design goal "within 1.3x of the 3-pass floor" is only reachable at ranks up to ~256-384.
* torch.optim.AdamW(fused=True) on the same weight reads p, g, m, v and writes p, m, v: 7 passes,
  14 B/param in bf16 = 631 MB = 188 us (28 B/param, 377 us, with fp32 weights). So the fused step
  should beat it by ~1.3-2x in bf16 at r = 512 (more at r = 128, about even at r = 1024).
* fp32 weights: 12 B/param = 541 MB = 161 us, but fp32 GEMMs at torch's default "highest" precision
  (which the kernels honour, as the reference does) run on the FP32 units, ~67 TFLOPS: ~1.4 ms at
  r = 512, slower than fused AdamW. With torch.set_float32_matmul_precision("high") they use TF32.

What is timed: ``optimizer.step()`` on one m x n weight with a fixed gradient, for the ordinary step only
(update_proj_gap is huge; the basis is computed in the first, untimed step), plus the fused kernels
alone (``kernels.galore_step`` on the optimizer's own state) to separate the optimizer's Python
overhead. "x floor" is the time over three passes of m x n at the copy bandwidth measured in the same
run; ratios are ``other / this`` (above 1: this row is faster).

    python bench/bench_step.py            # needs a GPU
    python bench/bench_step.py --shapes 4096x11008 --ranks 128 512 1024 --dtypes bfloat16   # goal shapes
    python bench/bench_step.py --quick    # tiny shapes on CPU, reference backend only: exercises the code
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch

from common import environment, timeit, write_results
from lowrank_kernels import GaLoreAdamW
from lowrank_kernels.reference import adam_step_size

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import galore_torch
except ImportError:  # galore-torch needs transformers and bitsandbytes to import
    galore_torch = None

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
RANKS = [128, 512, 1024]
DTYPES = [torch.bfloat16, torch.float32]
LR = 1e-3
COLUMNS = ["shape", "rank", "dtype", "implementation", "ms", "GB/s (3 passes)", "x floor",
           "galore-torch / this", "AdamW fused / this", "reference / this"]


def copy_bandwidth(device: str, numel: int) -> float:
    """Bytes per ms of a large device copy (one read, one write): the achievable streaming bandwidth."""
    src = torch.empty(numel, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timeit(lambda: dst.copy_(src), warmup=5, rep=50)


def make_weight(m, n, dtype, device):
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(m, n, generator=g) * 0.02).to(device, dtype))
    weight.grad = torch.randn(m, n, generator=g).to(device, dtype)
    return weight


def optimizer(kind: str, weight, rank: int):
    group = {"params": [weight], "rank": rank, "update_proj_gap": 10**9, "scale": 0.25, "proj_type": "std"}
    if kind == "AdamW fused":
        return torch.optim.AdamW([weight], lr=LR, fused=True)
    if kind == "galore-torch":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return galore_torch.GaLoreAdamW([group], lr=LR)
    return GaLoreAdamW([group], lr=LR, backend={"ours": "triton", "reference": "torch"}[kind])


def kernels_only(opt: GaLoreAdamW, weight):
    """The fused kernels on the optimizer's own state, without the optimizer around them."""
    from lowrank_kernels.kernels import galore_step

    state = opt.state[weight]
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    hyper = dict(beta1=beta1, beta2=beta2, eps=group["eps"], scale=0.25, lr=LR, weight_decay=0.0,
                 step_size=adam_step_size(LR, beta1, beta2, state["step"] + 1))
    P, Q = state.get("proj_left"), state.get("proj_right")
    return lambda: galore_step(weight, weight.grad, P, Q, state["exp_avg"], state["exp_avg_sq"], **hyper)


def measure(m, n, rank, dtype, device, kinds, warmup, rep, adamw_ms):
    """{implementation: ms} for one configuration; the AdamW time is shared across ranks."""
    times = {}
    for kind in kinds:
        if kind == "AdamW fused" and (m, n, dtype) in adamw_ms:
            times[kind] = adamw_ms[(m, n, dtype)]
            continue
        weight = make_weight(m, n, dtype, device)
        opt = optimizer(kind, weight, rank)
        opt.step()  # creates the state and, for the projected ones, the basis: not timed
        times[kind] = timeit(opt.step, warmup=warmup, rep=rep)
        if kind == "ours":
            times["ours (kernels only)"] = timeit(kernels_only(opt, weight), warmup=warmup, rep=rep)
        if kind == "AdamW fused":
            adamw_ms[(m, n, dtype)] = times[kind]
        del opt, weight
        if device == "cuda":
            torch.cuda.empty_cache()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU, reference backend only")
    parser.add_argument("--shapes", nargs="+", metavar="MxN", help=f"default: {' '.join(f'{m}x{n}' for m, n in SHAPES)}")
    parser.add_argument("--ranks", nargs="+", type=int, help=f"default: {' '.join(map(str, RANKS))}")
    parser.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32", "float16"],
                        help="default: bfloat16 float32")
    args = parser.parse_args()
    if not args.quick and not torch.cuda.is_available():
        print("no CUDA device: bench_step needs a GPU; nothing measured")
        return
    device = "cuda" if not args.quick else "cpu"
    if args.quick:
        shapes, ranks, warmup, rep = [(96, 160), (160, 96)], [16], 1, 3
    else:
        shapes, ranks, warmup, rep = SHAPES, RANKS, 5, 50
    kinds = (["ours"] if not args.quick else []) + ["reference"] + (["galore-torch"] if galore_torch else [])
    kinds.append("AdamW fused")
    bytes_per_ms = copy_bandwidth(device, 2**24 if args.quick else 2**30)
    if args.shapes:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    ranks = args.ranks or ranks
    dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else DTYPES
    adamw_ms, rows = {}, []
    for dtype in dtypes:
        for m, n in shapes:
            for rank in ranks:
                times = measure(m, n, rank, dtype, device, kinds, warmup, rep, adamw_ms)
                three_passes = 3 * m * n * dtype.itemsize
                for kind, ms in times.items():
                    rows.append({
                        "shape": f"{m}x{n}", "rank": rank, "dtype": str(dtype).removeprefix("torch."),
                        "implementation": kind, "ms": round(ms, 4),
                        "GB/s (3 passes)": round(three_passes / ms / 1e6, 1),
                        "x floor": round(ms / (three_passes / bytes_per_ms), 2),
                        **{f"{other} / this": round(times[other] / ms, 2) if other in times else ""
                           for other in ("galore-torch", "AdamW fused", "reference")},
                    })
                print(f"{m}x{n} r={rank} {dtype}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()),
                      file=sys.stderr)
    meta = {**environment(), "quick": args.quick, "copy GB/s": round(bytes_per_ms / 1e6, 1),
            "fp32 matmul precision": torch.get_float32_matmul_precision(),
            "timed": "ordinary step (basis computed in an untimed first step)"}
    write_results("step_quick" if args.quick else "step", rows, meta, COLUMNS)


if __name__ == "__main__":
    main()
