"""Run every benchmark and plot its results: ``python -m bench [--quick] [--out DIR]`` from the repository root.

A thin runner: each script runs in its own process (as ``python bench/<script>.py``, so its
``from common import ...`` works and its argument parsing is its own) and writes its markdown and JSON
with device, versions and min/median/max timings via bench/common.write_results; a script that needs a
GPU says so on a machine without one and measures nothing. Then every results JSON written in this run
gets a PNG bar chart.

Results go to bench/results/ for a full run and to a fresh scratch directory for ``--quick`` (a quick
run never writes to bench/results/); ``--out DIR`` chooses. ``python -m bench --gpu`` is the one
command for a GPU machine (bench/gpu.py: build the extension, run the GPU tests and the goal-shape
benchmarks).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

try:
    from tqdm import tqdm
except ImportError:  # optional: the GPU machine may not have it
    class tqdm:  # noqa: N801
        def __init__(self, items, **_):
            self.items = items

        def __iter__(self):
            return iter(self.items)

        @staticmethod
        def write(text):
            print(text, flush=True)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
# Every bench_*.py (each takes --quick), then the memory table; a new benchmark joins by its file name.
SCRIPTS = sorted(f for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py")) + ["memory_table.py"]
VALUE_COLUMNS = ("ms", "total GiB")  # the first one a table has is plotted
SERIES_COLUMNS = ("optimizer", "method", "kernel", "implementation", "backend")


def plot(json_path: str) -> str | None:
    """A bar chart of the table's value column: one bar group per row key, one colour per series."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path, encoding="utf-8") as f:
        result = json.load(f)
    columns, rows = result["columns"], result["rows"]
    value = next((c for c in VALUE_COLUMNS if c in columns), None)
    if value is None or not rows:
        return None
    series = next((c for c in SERIES_COLUMNS if c in columns), None)
    # Row key: the columns left of the value column (shape, rank, step...), except the series column.
    keys = [c for c in columns[:columns.index(value)] if c != series]
    labels = list(dict.fromkeys(" ".join(str(r.get(k, "")) for k in keys) for r in rows))
    names = list(dict.fromkeys(str(r.get(series, "")) for r in rows))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) * max(1, len(names)) ** 0.5), 4.5))
    for i, name in enumerate(names):
        xs, ys = [], []
        for r in rows:
            if str(r.get(series, "")) == name and isinstance(r.get(value), (int, float)):
                xs.append(labels.index(" ".join(str(r.get(k, "")) for k in keys)) + i * width)
                ys.append(r[value])
        ax.bar(xs, ys, width, label=name or value)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(value + " (log scale)")
    ax.set_yscale("log")  # values span orders of magnitude (shapes, model sizes)
    meta = result.get("meta", {})
    ax.set_title(f"{os.path.basename(json_path)[:-5]}\n{meta.get('device', '')}, torch {meta.get('torch', '')}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = json_path[:-5] + ".png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions (CPU-friendly)")
    parser.add_argument("--only", nargs="+", metavar="SCRIPT", help=f"a subset of {SCRIPTS}")
    parser.add_argument("--out", metavar="DIR", help="results directory (default: bench/results/; "
                                                     "with --quick, a new scratch directory)")
    parser.add_argument("--gpu", action="store_true", help="the GPU machine's run: see bench/gpu.py "
                                                           "(other options are ignored)")
    args, rest = parser.parse_known_args()
    if args.gpu:
        sys.path.insert(0, HERE)
        import gpu
        sys.exit(gpu.main(rest))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    out = os.path.abspath(args.out) if args.out else (
        tempfile.mkdtemp(prefix="lowrank_bench_quick_") if args.quick else RESULTS)
    os.makedirs(out, exist_ok=True)
    print(f"results go to {out}")
    env = {**os.environ, "BENCH_RESULTS_DIR": out}
    start = time.time()
    failed = []
    for script in tqdm(args.only or SCRIPTS, desc="benchmarks", unit="script"):
        path = os.path.join(HERE, script)
        if not os.path.exists(path):
            tqdm.write(f"skipping {script}: not found")
            failed.append(script)
            continue
        tqdm.write(f"== {script}")
        cmd = [sys.executable, path] + (["--quick"] if args.quick else [])
        if subprocess.run(cmd, cwd=HERE, env=env).returncode != 0:
            failed.append(script)
    written = sorted(os.path.join(out, f) for f in os.listdir(out)
                     if f.endswith(".json") and os.path.getmtime(os.path.join(out, f)) >= start)
    for json_path in written:
        png = plot(json_path)
        print(f"{json_path[:-5]}.{{md,json}}" + (f" + {os.path.basename(png)}" if png else ""))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
