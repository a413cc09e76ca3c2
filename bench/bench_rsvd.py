"""The CUDA randomized SVD (lowrank_kernels.rsvd) against torch.linalg.svd and torch.svd_lowrank.

For each shape and rank k, one run measures the median time (common.timeit) and the accuracy of:

* ours: ``lowrank_kernels.rsvd(A, k, oversample=10, niter=2)`` on the fp32 matrix and on its bf16 copy;
* ``torch.linalg.svd(A, full_matrices=False)``: the exact SVD GaLore uses (timed once per shape);
* ``torch.svd_lowrank(A, q=k + 10, niter=2)``: the same sketch width and power iterations as ours.

Accuracy is the residual ratio ||A - U U^T A||_F / ||A - A_k||_F of the first k left vectors, with
||A - A_k||_F from torch.linalg's singular values (1.0 is optimal). A is U diag(1/(1+i)) V^T with
random orthonormal U, V (a slowly decaying, gradient-like spectrum) and exactly representable in
bf16, so both inputs are the same matrix. Ratios are ``other / ours`` (above 1: ours is faster).
cusolverDnXgesvdr is not measured: PyTorch has no binding for it (it would need a C++ harness of its
own), and it needs full-size U and V buffers (n x n: 485 MB for V at 4096 x 11008).

    python bench/bench_rsvd.py            # 4096x4096, 4096x11008, 11008x4096; k = 128, 512, 1024
    python bench/bench_rsvd.py --shapes 4096x11008 --ranks 128 512 1024 --dtypes bfloat16   # goal shapes
    python bench/bench_rsvd.py --quick    # small shapes, to exercise the code

``--dtypes`` picks the inputs of ours (fp32 and bf16 by default); torch.svd_lowrank and
torch.linalg.svd always take the fp32 matrix (neither accepts bf16).
"""
from __future__ import annotations

import argparse
import sys

import torch

from common import environment, timeit, write_results
from lowrank_kernels import cuda_ext_available, rsvd

try:
    from tqdm import tqdm
except ImportError:
    def tqdm(items, **_):
        return items

OVERSAMPLE, NITER = 10, 2


def make_matrix(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """fp32 m x n, singular values 1/(1+i), and exactly representable in bf16."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, device="cuda", generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, r, device="cuda", generator=g)).Q
    S = 1.0 / (1.0 + torch.arange(r, device="cuda", dtype=torch.float32))
    return ((U * S) @ V.T).bfloat16().float()


def residual_ratio(A: torch.Tensor, U: torch.Tensor, best: float) -> float:
    A, U = A.double(), U.double()
    return ((A - U @ (U.T @ A)).norm() / best).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and ranks")
    parser.add_argument("--shapes", nargs="+", metavar="MxN", help="default: 4096x4096 4096x11008 11008x4096")
    parser.add_argument("--ranks", nargs="+", type=int, help="default: 128 512 1024")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"],
                        help="inputs of ours (default: both)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: bench_rsvd needs a GPU; nothing measured")
        sys.exit(0)
    ext_ok, ext_reason = cuda_ext_available()
    if not ext_ok:
        print(f"warning: the compiled CUDA rsvd is not in use ({ext_reason}); 'ours' is the PyTorch kernel")
    if args.quick:
        shapes, ranks = [(512, 512), (512, 1376), (1376, 512)], [16, 64]
    else:
        shapes, ranks = [(4096, 4096), (4096, 11008), (11008, 4096)], [128, 512, 1024]
    if args.shapes:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    ranks = args.ranks or ranks
    kernel = "compiled CUDA kernel" if ext_ok else f"PyTorch kernel ({ext_reason})"
    print(f"rsvd on CUDA runs the {kernel}")
    ours_name = "lowrank_kernels.rsvd" + ("" if ext_ok else " (PyTorch fallback)")

    rows = []
    for m, n in tqdm(shapes, desc="shapes"):
        A = make_matrix(m, n)
        A16 = A.bfloat16()
        svd_ms = timeit(lambda: torch.linalg.svd(A, full_matrices=False), warmup=1, rep=3)
        S_exact = torch.linalg.svdvals(A)
        for k in tqdm(ranks, desc=f"{m}x{n}", leave=False):
            best = S_exact[k:].norm().item()
            q = k + OVERSAMPLE
            runs = {}
            if "float32" in args.dtypes:
                runs[(ours_name, "fp32")] = lambda: rsvd(A, k, oversample=OVERSAMPLE, niter=NITER)
            if "bfloat16" in args.dtypes:
                runs[(ours_name, "bf16")] = lambda: rsvd(A16, k, oversample=OVERSAMPLE, niter=NITER)
            runs[("torch.svd_lowrank", "fp32")] = lambda: torch.svd_lowrank(A, q=q, niter=NITER)
            times = {key: timeit(fn, warmup=3, rep=10) for key, fn in runs.items()}
            ratios = {key: residual_ratio(A, fn()[0][:, :k], best) for key, fn in runs.items()}
            times[("torch.linalg.svd", "fp32")] = svd_ms
            ratios[("torch.linalg.svd", "fp32")] = 1.0
            lowrank_ms = times[("torch.svd_lowrank", "fp32")]
            for (method, dtype), ms in times.items():
                rows.append({
                    "shape": f"{m}x{n}", "k": k, "method": method, "input": dtype, "ms": round(ms, 2),
                    "linalg.svd / this": round(svd_ms / ms, 1),
                    "svd_lowrank / this": round(lowrank_ms / ms, 2),
                    "residual ratio": round(ratios[(method, dtype)], 4),
                })
        A = A16 = None  # (not del: the timed lambdas close over them; pyflakes reads del as undefining)
        torch.cuda.empty_cache()

    meta = {**environment(), "rsvd kernel": kernel, "oversample": OVERSAMPLE, "niter": NITER, "quick": args.quick,
            "spectrum": "1/(1+i)"}
    columns = ["shape", "k", "method", "input", "ms", "linalg.svd / this", "svd_lowrank / this",
               "residual ratio"]
    write_results("rsvd" + ("_quick" if args.quick else ""), rows, meta, columns)


if __name__ == "__main__":
    main()
