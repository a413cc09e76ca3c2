"""Whole optimizer step of LLaMA-shaped models: every parameter, ordinary steps (no basis refresh).

Optimizers, each on the same parameters and gradients, one at a time in one run:

* ``ours``: GaLoreAdamW's whole-model step (lowrank_kernels/engine.py; backend "auto": on a GPU the
  grouped Triton kernels, a constant number of launches per step; on CPU the foreach reference), and on
  a GPU the same step captured in a CUDA graph (``ours+graph``: ``opt.replay(graph)`` is timed);
* ``ours per-param``: the pre-engine path, one Python call per parameter (``opt._per_parameter_step``);
* ``galore-torch`` (when installed) and ``torch AdamW`` (foreach=True on CPU, fused=True on GPU).

Attention and MLP weights are projected (GaLore's targets) at the layout's rank; the rest is AdamW.
Times are min / median / max in ms over ``--rep`` steps (CPU: wall time; GPU: CUDA events around each
step); ratios are ``ours / other`` (below 1: ours is faster). ``launches`` per step: on a GPU the CUDA
kernels the profiler records; on CPU the non-view aten ops dispatched (each a kernel launch on a GPU;
a foreach op counts once). ``triton`` counts the Triton kernel launches of one step (eager variants);
``path`` says what ran ours (grouped kernels and how many tables, or the per-parameter path).

Every variant runs in its own try/except: a failure is printed and recorded in the results' meta, and
the run goes on with the next variant and layout.

Layouts: ``tiny-24`` (dim 64, 24 layers, 4 heads, MLP 172, vocab 256, rank 8): sizes so small that the
step's host machinery is what is timed, the CPU proxy for a GPU's host overhead. On CPU the
optimizers share the parameters and are timed interleaved (one step each per round). ``60M``, ``350M``,
``1B``: GaLore's LLaMA configurations (vocab 32000).

    python bench/bench_model_step.py                      # CPU: tiny-24 (1 thread); GPU: 60M, 350M, 1B
    python bench/bench_model_step.py --layouts tiny-24 60M --out bench/results
    python bench/bench_model_step.py --layouts 1B --kinds ours ours+graph "torch AdamW"
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import environment, write_results
from lowrank_kernels import GaLoreAdamW
from lowrank_kernels.demo.model import GALORE_TARGETS, Llama, ModelConfig
from lowrank_kernels.hf import galore_param_groups

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import galore_torch
except ImportError:  # needs transformers and bitsandbytes to import
    galore_torch = None

# name: (dim, layers, heads, MLP size, vocab, rank)
LAYOUTS = {
    "tiny-24": (64, 24, 4, 172, 256, 8),
    "60M": (512, 8, 8, 1376, 32000, 128),
    "350M": (1024, 24, 16, 2736, 32000, 256),
    "1B": (2048, 24, 32, 5461, 32000, 512),
}
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "unbind", "select", "slice", "alias", "detach",
            "expand", "as_strided", "reshape", "permute", "numpy_T", "lift_fresh"}


def build(layout: str, device: str, dtype: torch.dtype):
    dim, layers, heads, ffn, vocab, rank = LAYOUTS[layout]
    with torch.device(device):
        model = Llama(ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, ffn_dim=ffn))
    model.to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, device=device, dtype=dtype)
    return model, rank


def make_optimizer(kind: str, model, rank: int, device: str):
    groups = galore_param_groups(model, GALORE_TARGETS, rank=rank, update_proj_gap=10**9, scale=0.25)
    if kind == "torch AdamW":
        fast = dict(fused=True) if device == "cuda" else dict(foreach=True)
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, **fast)
    if kind == "galore-torch":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return galore_torch.GaLoreAdamW(groups, lr=1e-3, weight_decay=0.01)
    for group in groups:
        if "rank" in group:
            group["projector"] = "rsvd"  # a faster first refresh; ordinary steps do not depend on it
    opt = GaLoreAdamW(groups, lr=1e-3, weight_decay=0.01, backend="auto")
    opt._per_parameter_step = kind == "ours per-param"
    return opt


def times_ms(fn, warmup: int, rep: int, device: str) -> list:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(rep):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            out.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    return out


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in VIEW_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def launches(fn, device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    with _OpCounter() as counter:
        fn()
    return counter.count


def triton_launches(fn) -> int:
    """Triton kernel launches in one call of ``fn`` (JITFunction.run, as tests/test_grouped_kernels.py
    counts them; a CUDA graph replay launches none this way)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    count, originals = [0], {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def counting(original):
        def run(kernel, *args, **kwargs):
            count[0] += 1
            return original(kernel, *args, **kwargs)
        return run

    for cls, original in originals.items():
        cls.run = counting(original)
    try:
        fn()
    finally:
        for cls, original in originals.items():
            cls.run = original
    return count[0]


def path_of(opt) -> str:
    if not isinstance(opt, GaLoreAdamW):
        return ""
    if getattr(opt, "_per_parameter_step", False):
        return "per-parameter"
    tables = len(opt._engine()._tables)
    return f"grouped kernels ({tables} tables)" if tables else "torch foreach"


def attempt(what: str, errors: dict, fn, default=None):
    """``fn()``, or ``default`` after printing and recording the error (the run goes on)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark variant must never stop the others
        print(f"FAILED {what}: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        errors[what] = f"{type(exc).__name__}: {str(exc)[:300]}"
        return default


def graphed(opt, device: str):
    """The ordinary step captured in a CUDA graph (gradients are static tensors here)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # eager warm-up: compiles and builds everything outside the capture
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    opt.replay(graph)  # a capture runs and counts nothing; every replay is one step
    torch.cuda.synchronize()
    return lambda: opt.replay(graph)


def bench_layout(layout: str, kinds: list, device: str, dtype, warmup: int, rep: int, errors: dict) -> list:
    model, rank = build(layout, device, dtype)
    n_tensors = sum(1 for _ in model.parameters())
    results = {}  # kind: (times, launches, triton launches, path)
    if device == "cpu":
        # Interleaved, one step of each optimizer per round: a shared machine's load hits all alike.
        steps, opts = {}, {}
        for kind in kinds:
            def first(kind=kind):
                opt = make_optimizer(kind, model, rank, device)
                opt.step()  # state and bases; every later step is ordinary
                return opt
            opt = attempt(f"{layout} {kind}", errors, first)
            if opt is not None:
                steps[kind], opts[kind] = opt.step, opt
        ts = {kind: [] for kind in steps}
        for _ in range(warmup):
            for fn in steps.values():
                fn()
        for _ in range(rep):
            for kind, fn in steps.items():
                ts[kind] += times_ms(fn, 0, 1, device)
        results = {kind: (ts[kind], attempt(f"{layout} {kind} launches", errors, lambda: launches(fn, device)), "",
                          path_of(opts[kind])) for kind, fn in steps.items()}
    for kind in kinds if device == "cuda" else []:
        state = {}

        def one(kind=kind, state=state):
            opt = state["opt"] = make_optimizer(kind.replace("+graph", ""), model, rank, device)
            opt.step()  # state and bases; every later step is ordinary
            torch.cuda.synchronize()
            fn = state["fn"] = graphed(opt, device) if kind.endswith("+graph") else opt.step
            ts = times_ms(fn, warmup, rep, device)
            n_launch = attempt(f"{layout} {kind} launches", errors, lambda: launches(fn, device))
            n_triton = "" if kind.endswith("+graph") or not kind.startswith("ours") else attempt(
                f"{layout} {kind} triton launches", errors, lambda: triton_launches(fn), "")
            return ts, n_launch, n_triton, path_of(opt)

        out = attempt(f"{layout} {kind}", errors, one)
        if out is not None:
            results[kind] = out
        state.clear()
        gc.collect()
        attempt("cuda cleanup", errors, lambda: (torch.cuda.synchronize(), torch.cuda.empty_cache()))
    rows = []
    ours = statistics.median(results["ours"][0]) if "ours" in results else None
    for kind, (ts, n_launch, n_triton, path) in results.items():
        med = statistics.median(ts)
        rows.append({"layout": layout, "tensors": n_tensors, "optimizer": kind, "ms": round(med, 3),
                     "min": round(min(ts), 3), "max": round(max(ts), 3), "launches": n_launch,
                     "triton": n_triton, "path": path,
                     "ours / this": "" if ours is None else round(ours / med, 2)})
    model = None  # noqa: F841 - frees the layout's model before the next one
    gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS))
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--rep", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="tiny-24 only, few repetitions")
    parser.add_argument("--kinds", nargs="+", help="variants to run (default: all that apply); one of "
                        "ours, ours+graph (GPU), 'ours per-param', galore-torch, 'torch AdamW'")
    parser.add_argument("--out", help="results directory (default: a scratch directory)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    layouts = args.layouts or (["tiny-24"] if device == "cpu" or args.quick else ["60M", "350M", "1B"])
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    rep = 5 if args.quick else args.rep
    kinds = ["ours"] + (["ours+graph"] if device == "cuda" else []) + ["ours per-param"]
    kinds += (["galore-torch"] if galore_torch else []) + ["torch AdamW"]
    if args.kinds:
        kinds = [k for k in args.kinds if k in kinds] or kinds
    rows, errors = [], {}
    load_before = os.getloadavg()[0]
    for layout in layouts:
        rows += attempt(f"layout {layout}", errors,
                        lambda: bench_layout(layout, kinds, device, dtype, warmup=3, rep=rep, errors=errors), [])
    meta = {**environment(), "load_average_1min": f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
            "dtype": str(dtype).replace("torch.", ""), "rep": rep, "quick": args.quick,
            "step": "ordinary (no refresh), every parameter", "projected": GALORE_TARGETS,
            "errors": errors or "none"}
    columns = ["layout", "tensors", "optimizer", "ms", "min", "max", "launches", "triton", "path", "ours / this"]
    write_results("model_step" + ("_quick" if args.quick else ""), rows, meta, columns,
                  directory=args.out or tempfile.mkdtemp(prefix="bench_model_step_"))


if __name__ == "__main__":
    main()
