"""Shared pieces of the benchmarks: timing, the machine and versions, and the results files.

    from common import environment, timeit, write_results

    ms = timeit(fn, warmup=3, rep=10)                 # median milliseconds of fn()
    write_results("rsvd", rows, {**environment(), "quick": False}, columns)
    # -> bench/results/rsvd_<device>_<date>.md and .json
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
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


def timeit(fn: Callable[[], object], warmup: int = 3, rep: int = 10) -> float:
    """Median time of ``fn()`` in milliseconds, over ``rep`` calls after ``warmup`` calls.

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
            return float(do_bench(fn, warmup=max(warmup * once_ms, 1e-3), rep=max(rep * once_ms, 1e-3),
                                  return_mode="median"))
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
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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


def write_results(name: str, rows: Sequence[dict], meta: dict, columns: Sequence[str],
                  out_dir: str = RESULTS_DIR) -> tuple[str, str]:
    """Write ``rows`` as a markdown table and as JSON to <out_dir>/<name>_<device>_<date>.{md,json}.

    ``meta`` (usually :func:`environment` plus the run's options) heads both files; ``out_dir`` defaults
    to bench/results. The table is printed too; returns the two paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    device = re.sub(r"[^a-z0-9]+", "-", str(meta.get("device", "unknown")).lower()).strip("-")
    stem = os.path.join(out_dir, f"{name}_{device}_{meta.get('date', datetime.date.today().isoformat())}")
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
