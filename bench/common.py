"""Shared pieces of the benchmarks: timing, the machine and versions, and the results files.

    from common import environment, timeit, write_results

    ms = timeit(fn, warmup=3, rep=10)     # a Timing: the median in ms, with .min, .max and .runs
    write_results("rsvd", rows, {**environment(), "quick": False}, columns)
    # -> <results dir>/rsvd_<device>_<date>.md and .json

Every table records min, median and max: a column whose cells are Timings (``round()`` keeps them
Timings) is written as the median, followed by "<column> min" and "<column> max".

Where results go (:func:`results_dir`): $BENCH_RESULTS_DIR when set (``python -m bench --out DIR``
sets it), else a scratch directory for quick runs (so a quick run never touches bench/results/), else
bench/results/.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import tempfile
import time
from typing import Callable, Sequence

import torch

try:
    import triton
    from triton.testing import do_bench
except ImportError:
    triton = None
    do_bench = None

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SCRATCH_DIR = os.path.join(tempfile.gettempdir(), "lowrank_kernels_bench_quick")


class Timing(float):
    """Milliseconds: the median of ``runs`` timed calls as a float, with their ``min`` and ``max``
    (``runs`` is 0 when triton's do_bench reported only those three)."""

    def __new__(cls, median: float, low: float, high: float, runs: int):
        self = super().__new__(cls, median)
        self.min, self.max, self.runs = float(low), float(high), runs
        return self

    @classmethod
    def of(cls, times: Sequence[float]) -> "Timing":
        times = [float(t) for t in times]
        return cls(statistics.median(times), min(times), max(times), len(times))

    def __round__(self, ndigits=None):
        return Timing(round(float(self), ndigits), round(self.min, ndigits), round(self.max, ndigits), self.runs)

    def __reduce__(self):
        return (Timing, (float(self), self.min, self.max, self.runs))


def timeit(fn: Callable[[], object], warmup: int = 3, rep: int = 10) -> Timing:
    """Time ``fn()`` in milliseconds over ``rep`` calls after ``warmup`` calls: median, min and max.

    On a CUDA machine the work is timed on the GPU: with ``triton.testing.do_bench`` when triton
    imports (it clears the L2 cache before each call), else with CUDA events. On CPU, wall time with
    ``time.perf_counter``.
    """
    if torch.cuda.is_available():
        if do_bench is not None:
            # do_bench takes its warm-up and repetition budgets in milliseconds: convert the counts
            # with one timed call (after a first call that may compile or allocate).
            fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            once_ms = (time.perf_counter() - start) * 1e3
            budget = dict(warmup=max(warmup * once_ms, 1e-3), rep=max(rep * once_ms, 1e-3))
            try:
                return Timing.of(do_bench(fn, return_mode="all", **budget))
            except (AssertionError, TypeError, ValueError):  # a triton without return_mode="all"
                low, median, high = do_bench(fn, quantiles=[0.0, 0.5, 1.0], **budget)
                return Timing(median, low, high, runs=0)
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rep):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        return Timing.of(times)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing.of(times)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Where and with what a benchmark ran: device, date and versions, for the results files."""
    from lowrank_kernels import __version__, cuda_ext_available

    cuda = torch.cuda.is_available()
    env = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu {_cpu_name()}",
        "cpu_threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__ if triton is not None else None,
        "python": platform.python_version(),
        "lowrank_kernels": __version__,
        "rsvd_cuda_extension": cuda_ext_available()[1],
    }
    if cuda:
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        env["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return env


def results_dir(quick: bool = False) -> str:
    """$BENCH_RESULTS_DIR if set; else a scratch directory for quick runs; else bench/results/."""
    chosen = os.environ.get("BENCH_RESULTS_DIR")
    if chosen:
        return os.path.abspath(chosen)
    return SCRATCH_DIR if quick else RESULTS_DIR


def _expand_timings(rows: Sequence[dict], columns: Sequence[str]) -> tuple[list[dict], list[str]]:
    """Each column holding Timings becomes three: the median (same name), "<name> min", "<name> max"."""
    timed = [c for c in columns if any(isinstance(row.get(c), Timing) for row in rows)]
    out_columns = []
    for c in columns:
        out_columns += [c, f"{c} min", f"{c} max"] if c in timed else [c]
    out_rows = []
    for row in rows:
        row = dict(row)
        for c in timed:
            value = row.get(c)
            if isinstance(value, Timing):
                row[c], row[f"{c} min"], row[f"{c} max"] = float(value), value.min, value.max
        out_rows.append(row)
    return out_rows, out_columns


def write_results(name: str, rows: Sequence[dict], meta: dict, columns: Sequence[str],
                  directory: str | None = None, out_dir: str | None = None) -> tuple[str, str]:
    """Write ``rows`` as a markdown table and as JSON to <results dir>/<name>_<device>_<date>.{md,json}.

    ``meta`` (usually :func:`environment` plus the run's options) heads both files; the directory is
    :func:`results_dir` (quick runs: scratch) unless ``directory`` is given. The table is printed too;
    returns the two paths.
    """
    rows, columns = _expand_timings(rows, columns)
    if any(c.endswith(" min") for c in columns):
        meta = {**meta, "timings": "each time column is the median of the timed runs, with min and max"}
    directory = directory or out_dir or results_dir(bool(meta.get("quick")))
    os.makedirs(directory, exist_ok=True)
    device = re.sub(r"[^a-z0-9]+", "-", str(meta.get("device", "unknown")).lower()).strip("-")
    stem = os.path.join(directory, f"{name}_{device}_{meta.get('date', datetime.date.today().isoformat())}")
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    lines = [f"# {name}", ""] + [f"- {key}: {value}" for key, value in meta.items()] + [""] + table
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "columns": list(columns), "rows": list(rows)}, f, indent=2)
    print("\n".join(table))
    print(f"wrote {stem}.md and {stem}.json")
    return stem + ".md", stem + ".json"
