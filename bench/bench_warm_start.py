"""Warm-started basis (one subspace iteration from the previous basis) against a fresh randomized SVD.

A refresh sees a gradient close to the one the previous basis came from. This measures, on such a
pair, the cost and the residual ratio ||G - U U^T G||_F / ||G - G_k||_F (1.0 is optimal) of:

* ``svd``:   torch.linalg.svd (galore-torch's refresh), the time reference;
* ``rsvd``:  lowrank_kernels.rsvd, oversample 10, 2 power iterations, fresh Gaussian sketch;
* ``warm``:  the "warm" basis source: previous basis + 10 Gaussian columns, 1 power iteration.

The gradient pair is synthetic: G0 has singular values decay**i with random singular vectors, and
G1 = G0 + drift * (an independent matrix of the same spectrum) / ||.|| * ||G0||, so ``drift`` is the
relative size of the change between refreshes.

    python bench/bench_warm_start.py            # 1024x1024 and 2048x5504, k=128
    python bench/bench_warm_start.py --quick
"""
from __future__ import annotations

import argparse

import torch

from common import environment, timeit, write_results
from lowrank_kernels import projection, rsvd


def spectrum(m, n, decay, seed, device):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    return ((U * decay ** torch.arange(k, dtype=torch.float32)) @ V.T).to(device)


def residual_ratio(G, U, k):
    tail = torch.linalg.svdvals(G.double())[k:].norm()
    return float((G.double() - U.double() @ (U.double().T @ G.double())).norm() / tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(256, 256), (256, 688)] if args.quick else [(1024, 1024), (2048, 5504)]
    k = 32 if args.quick else 128
    rows = []
    for m, n in shapes:
        side = projection.orientation("std", m, n)
        for decay, drift in ((0.99, 0.1), (0.97, 0.3)):
            G0 = spectrum(m, n, decay, 0, device)
            noise = spectrum(m, n, decay, 1, device)
            G1 = G0 + drift * noise / noise.norm() * G0.norm()
            U0, _, V0 = projection._svd_source(G0, k, 0, side, {})
            previous = {"proj_left": U0} if side == "left" else {"proj_right": V0}
            methods = {
                "svd": lambda: projection._svd_source(G1, k, 0, side, {}),
                "rsvd": lambda: rsvd(G1, k, oversample=projection.OVERSAMPLE, seed=1),
                "warm": lambda: projection._warm_source(G1, k, 1, side, previous),
            }
            times = {name: timeit(fn, warmup=1, rep=3) for name, fn in methods.items()}
            for name, fn in methods.items():
                U, _, V = fn()
                basis, target = (U, G1) if side == "left" else (V, G1.T)
                rows.append({"shape": f"{m}x{n}", "k": k, "decay": decay, "drift": drift, "method": name,
                             "ms": round(times[name], 2), "svd / this": round(times["svd"] / times[name], 2),
                             "residual ratio": round(residual_ratio(target, basis, k), 4)})
    meta = {**environment(), "quick": args.quick}
    write_results("warm_start" + ("_quick" if args.quick else ""), rows, meta,
                  ["shape", "k", "decay", "drift", "method", "ms", "svd / this", "residual ratio"])


if __name__ == "__main__":
    main()
