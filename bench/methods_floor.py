"""The floor of one optimizer step per update rule: bytes moved and GEMM flops, COMPUTED FROM SHAPES.

Nothing here is measured. For each method and weight shape the fused design's kernels are walked and
every tensor they must read or write is counted once (an ideal cache: operands re-read by several tiles,
such as the basis, count once); the floor time is, per kernel, max(bytes / HBM bandwidth, flops / peak)
summed over the kernels of the grouped step (one launch per kernel over all weights), with an H100 SXM's datasheet peaks: 3.35 TB/s HBM3 and 989 TFLOP/s
dense bf16. Real kernels sit above it (launch gaps, tile quantisation, imperfect overlap); measured
timings live in the model_step_* and step_* results.

Per projected m x n weight, rank r (galore "std": the short side s = min(m, n) is projected, so the
low-rank tensors R, N, M, V are r x l with l = max(m, n), L = r l entries; the basis is s x r); b bytes
per weight/gradient/basis/low-rank entry, moments in the gradient's dtype (state_dtype None, the
default) or int8 (1 byte per entry + one fp32 absmax per 256):

* galore (also dct and random: the same step on a materialised basis; they differ only at refreshes):
  (a) read G, basis; read+write M, V; write N.  (b) read N, basis, W; write W.  3 passes over m x n.
* int8 galore: (a, ADAM=False) read G, basis; write R.  (q, grouped_int8_adam) read R; read+write
  codes and absmax; write N.  (b) as galore.  3 passes; the moments cost 1.03 B per entry.
* fira: (a) also writes R and per-channel norm partials (of N, R and G's channels); (s) one small
  program per weight turns partials into channel factors; (b) reads N, R, basis, G, W, writes W: two
  accumulators (s P N and P R), so twice galore's back-projection flops.  4 passes (G read twice).
* frugal: as fira without the norms.  4 passes.
* apollo / apollo-mini (rank 1, one tensor-wise factor): (a) with the norms (N written too, as kernel
  (a) does); (s); (b) has no GEMM: reads G and W, writes W, W <- W - step_size G f.  4 passes.
* AdamW (torch.optim.AdamW, moments in the parameter's dtype): read p, g, m, v; write p, m, v.  7 passes.
* AdamW on int8 moments (grouped_int8_adam, unprojected mode): read p, g, codes, absmax; write p, codes,
  absmax.  3 passes + 2 x 2 x 1.03 B per entry.

Partials: one fp32 per channel per 64-row rank tile for N and for R, one per channel for G, one factor
per channel; the limiter's scalars are ignored. Model rows sum the projected weights (attention and MLP
linears) of GaLore's LLaMA layouts at their ranks; the embedding, head and norms (AdamW in every method)
are a separate row.

    python bench/methods_floor.py      # -> bench/results/methods_floor_computed-from-shapes_<date>.{md,json}
"""
from __future__ import annotations

import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from common import RESULTS_DIR, environment, write_results  # noqa: E402

from bench_model_step import LAYOUTS  # noqa: E402

HBM = 3.35e12      # bytes/s, H100 SXM5 HBM3 (datasheet)
PEAK = 989e12      # flop/s, H100 SXM5 dense bf16 tensor cores (datasheet)
QBLOCK = 256       # int8 moments: one fp32 absmax per 256 entries (quant.BLOCK)
RANK_TILE = 64     # rank-axis tile of the norm partials
METHODS = ("adamw", "galore", "int8 galore", "dct", "random", "fira", "frugal", "apollo", "apollo-mini")
MiB = 2**20


def kernels(method: str, m: int, n: int, r: int, b: int) -> list:
    """[(kernel, bytes, flops)] of one step of an m x n weight (``r``: rank; ``b``: bytes per entry)."""
    mn, s, l = m * n, min(m, n), max(m, n)
    if method == "adamw":
        return [("adamw", 7 * mn * b, 0)]
    if method == "adamw int8":
        return [("int8 adamw", 3 * mn * b + 2 * int8_state(mn), 0)]
    if method == "apollo-mini":
        r = 1
    L, basis, gemm = r * l, s * r * b, 2 * m * n * r
    moments_rw = 2 * 2 * L * b  # M and V, read and written, in the gradient dtype
    partials = (2 * math.ceil(r / RANK_TILE) + 1) * l * 4
    factors = l * 4 if method != "apollo-mini" else 4
    back = ("b", L * b + basis + 2 * mn * b, gemm)  # read N, basis, W; write W
    if method in ("galore", "dct", "random"):
        return [("a", mn * b + basis + moments_rw + L * b, gemm), back]
    if method == "int8 galore":
        return [("a", mn * b + basis + L * b, gemm),                       # writes R
                ("q", L * b + 2 * int8_state(L) + L * b, 0),                # R in; codes, absmax r/w; N out
                back]
    if method in ("fira", "frugal"):
        norms = partials if method == "fira" else 0
        kern = [("a", mn * b + basis + moments_rw + 2 * L * b + norms, gemm)]   # writes N and R
        if method == "fira":
            kern.append(("s", partials + factors, 0))
        # reads N, R, basis, G, W (+ factors); writes W; two GEMMs sharing the basis
        kern.append(("b", 2 * L * b + basis + 3 * mn * b + (factors if method == "fira" else 0), 2 * gemm))
        return kern
    if method in ("apollo", "apollo-mini"):
        return [("a", mn * b + basis + moments_rw + L * b + partials, gemm), ("s", partials + factors, 0),
                ("b", 3 * mn * b + factors, 0)]  # no GEMM: W <- W - step_size * G * f
    raise ValueError(method)


def int8_state(entries: int) -> int:
    """Bytes of one int8 moment read once and written once: codes plus fp32 absmax."""
    return 2 * (entries + 4 * math.ceil(entries / QBLOCK))


def passes(method: str) -> int:
    return {"adamw": 7, "adamw int8": 3, "fira": 4, "frugal": 4, "apollo": 4, "apollo-mini": 4}.get(method, 3)


def floor_us(kern: list) -> float:
    """Per kernel of the grouped step (one launch over every weight), max(bytes / HBM, flops / peak),
    summed over the kernels: launches run one after the other, a launch's weights overlap."""
    per = {}
    for name, nbytes, flops in kern:
        b, f = per.get(name, (0, 0))
        per[name] = (b + nbytes, f + flops)
    return sum(max(b / HBM, f / PEAK) for b, f in per.values()) * 1e6


def model_shapes(layout: str) -> tuple:
    """(projected weight shapes, unprojected shapes, rank) of a LLaMA layout (bench_model_step.LAYOUTS)."""
    dim, layers, _, ffn, vocab, rank = LAYOUTS[layout]
    projected = [(dim, dim)] * 4 * layers + [(ffn, dim)] * 2 * layers + [(dim, ffn)] * layers
    rest = [(vocab, dim), (vocab, dim)] + [(dim, 1)] * (2 * layers + 1)  # embed, lm_head, norms
    return projected, rest, rank


def row(name: str, method: str, shapes: list, r: int, b: int, adamw_us: float | None) -> dict:
    kern = [k for m, n in shapes for k in kernels(method, m, n, r, b)]
    nbytes = sum(k[1] for k in kern)
    full = sum(m * n * b for m, n in shapes) * passes(method)
    us = floor_us(kern)
    return {"weights": name, "rank": r if method not in ("adamw", "adamw int8") else "-",
            "method": method, "passes over m x n": passes(method),
            "m x n MiB": round(full / MiB, 1), "other MiB": round((nbytes - full) / MiB, 2),
            "total MiB": round(nbytes / MiB, 1), "GEMM GFLOP": round(sum(k[2] for k in kern) / 1e9, 2),
            "floor us (memory only)": round(nbytes / HBM * 1e6, 1), "floor us": round(us, 1),
            "x AdamW floor": round(us / adamw_us, 2) if adamw_us else 1.0}


def table(b: int = 2) -> list:
    rows = []
    cases = [(f"LLaMA {name} projected", *model_shapes(name)[::2]) for name in ("60M", "350M", "1B")]
    cases += [("4096x11008", [(4096, 11008)], r) for r in (128, 512)]
    for name, shapes, r in cases:
        base = floor_us([k for m, n in shapes for k in kernels("adamw", m, n, r, b)])
        for method in METHODS:
            rows.append(row(name, method, shapes, r, b, base))
        rows.append(row(name, "adamw int8", shapes, r, b, base))
    for name in ("60M", "350M", "1B"):
        _, rest, r = model_shapes(name)
        rows.append(row(f"LLaMA {name} unprojected (every method)", "adamw", rest, r, b, None))
    return rows


def summary(rows: list, weights: str) -> str:
    floor = {r["method"]: r for r in rows if r["weights"] == weights}
    ratio = ", ".join(f"{m} {floor[m]['x AdamW floor']}" for m in METHODS[1:] + ("adamw int8",))
    return (f"floor over AdamW's: {ratio}. The residual rules (fira, frugal) and apollo read G a second time: "
            f"4 passes over m x n instead of 3. int8 galore moves about galore's bytes with bf16 moments (the "
            f"R round trip costs what the 1-byte codes save) and splits the moment update out of the "
            f"projection GEMM, which can then no longer hide its flops under the moment traffic "
            f"(floor {floor['int8 galore']['floor us']} us vs galore's {floor['galore']['floor us']} us).")


def main() -> None:
    rows = table()
    meta = {**environment(), "device": "computed from shapes",
            "what": "computed from shapes, NOT measured: bytes each kernel must move (ideal cache) and GEMM "
                    "flops; floor = sum over kernels of max(bytes / HBM, flops / peak)",
            "peaks": "H100 SXM datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16",
            "dtype": "bf16 weights, gradients, bases, low-rank buffers and moments (state_dtype None); int8 "
                     "rows: 1-byte codes + fp32 absmax per 256 entries",
            "layouts": "GaLore LLaMA (dim, layers, heads, ffn, vocab, rank): "
                       + "; ".join(f"{k} {v}" for k, v in LAYOUTS.items() if k != "tiny-24"),
            "columns": "'m x n MiB': the passes over the full-size weights; 'other MiB': low-rank state, basis, "
                       "R/N buffers and norm partials; 'x AdamW floor': this floor over AdamW's on the same weights"}
    meta.pop("cpu_threads", None)
    meta["reading (LLaMA 1B projected weights)"] = summary(rows, "LLaMA 1B projected")
    columns = list(rows[0])
    write_results("methods_floor", rows, meta, columns, directory=RESULTS_DIR)


if __name__ == "__main__":
    main()
