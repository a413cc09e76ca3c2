"""The method comparison: the demo's optimizer variants over several seeds, and eval loss against
optimizer-state memory (the frontier people choose on).

    python bench/methods_frontier.py [--seeds 0 1] [--steps 200] [--threads 1]
    # -> bench/results/methods_<cpu|cuda>_<date>/: seed<N>/ (the demo's table and loss curves),
    #    results.md and results.json (per-seed eval loss, mean, tokens/s, state bytes), frontier.png

Each run is ``python -m lowrank_kernels.demo`` in this process with the same settings; extra arguments
after ``--`` go to the demo (e.g. ``-- --dim 64``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from common import environment
from lowrank_kernels.demo.__main__ import demo, new_plot, save_plot

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIMIZERS = ("adamw", "ours", "ours-fira", "ours-frugal", "ours-apollo", "ours-apollo-mini", "ours-dct",
              "ours-int8")


def number(text: str) -> float:
    return float(str(text).replace(",", ""))


def plot(summary: list, path: str, title: str) -> None:
    import matplotlib.ticker

    fig, ax = new_plot(figsize=(7.5, 4.8))
    markers = "osD^vP*Xh<>"
    for i, row in enumerate(summary):  # a legend, not inline labels: equal-memory points overlap
        x, y = row["optimizer-state bytes"] / 2**20, row["eval loss, mean"]
        ax.errorbar(x, y, yerr=[[y - min(row["eval loss"])], [max(row["eval loss"]) - y]], fmt=markers[i % 11],
                    capsize=3, label=f"{row['optimizer']}: {y:.3f}, {x:.2f} MiB")
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("optimizer-state memory (MiB, log scale)")
    ax.set_ylabel("eval loss (mean over seeds; bars: min to max)")
    save_plot(fig, ax, path, title, width=110, legend_size=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine may be shared)")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--quick", action="store_true", help="accepted for bench/__main__: 2 seeds of 20 steps")
    parser.add_argument("--replot", metavar="DIR", help="only redraw DIR/frontier.png from DIR/results.json")
    args, demo_args = parser.parse_known_args()
    if args.replot:
        with open(os.path.join(args.replot, "results.json"), encoding="utf-8") as f:
            result = json.load(f)
        meta = result["meta"]
        plot(result["rows"], os.path.join(args.replot, "frontier.png"),
             f"{meta['setting']}; {meta['device']} {meta['date']}")
        return
    demo_args = [a for a in demo_args if a != "--"]
    torch.set_num_threads(args.threads)
    steps = 20 if args.quick else args.steps
    env = environment()
    cuda = torch.cuda.is_available()
    out = os.path.join(HERE, "results", f"methods_{'cuda' if cuda else 'cpu'}_{env['date']}")
    per_seed = {}
    for seed in args.seeds:
        rows = demo(["--optimizers", *args.optimizers, "--steps", str(steps), "--seed", str(seed),
                     "--device", "cuda" if cuda else "cpu",
                     "--out", os.path.join(out, f"seed{seed}"), *demo_args])
        per_seed[seed] = {r["optimizer"]: r for r in rows}
    summary = []
    for name in args.optimizers:
        runs = [per_seed[s][name] for s in args.seeds]
        losses = [number(r["eval loss"]) for r in runs]
        summary.append({
            "optimizer": name, "eval loss": losses, "eval loss, mean": round(sum(losses) / len(losses), 4),
            "tokens/s": [number(r["tokens/s"]) for r in runs],
            "optimizer-state bytes": int(max(number(r["optimizer-state bytes"]) for r in runs)),
        })
    columns = ["optimizer", *(f"eval, seed {s}" for s in args.seeds), "eval, mean", "tokens/s (per seed)",
               "optimizer-state bytes"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in summary:
        cells = [row["optimizer"], *(f"{v:.4f}" for v in row["eval loss"]), f"{row['eval loss, mean']:.4f}",
                 " / ".join(f"{v:,.0f}" for v in row["tokens/s"]), f"{row['optimizer-state bytes']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    setting = (f"demo defaults (dim 128, 4 layers, rank 32, gap 50, scale 0.25, lr 3e-3 AdamW / 1e-2 "
               f"GaLore), {steps} steps, seeds {args.seeds}, {args.threads} thread(s); extra demo args: "
               f"{demo_args or 'none'}")
    meta = {**env, "threads": args.threads, "setting": setting, "command": " ".join(sys.argv)}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": summary}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write("# Method comparison: eval loss against optimizer memory\n\n"
                + "".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n" + "\n".join(lines) + "\n")
    plot(summary, os.path.join(out, "frontier.png"), f"{setting}; {env['device']} {env['date']}")
    print("\n".join(lines))
    print(f"wrote {out}/results.md, results.json, frontier.png")


if __name__ == "__main__":
    main()
