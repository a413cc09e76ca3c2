"""Train one small LLaMA per optimizer on the same init and data; print one comparison table.

    python -m lowrank_kernels.demo [--steps 200 --dim 128 --layers 4 ...] [--out demo_results]

Optimizers (``--optimizers``): ``adamw`` (torch.optim.AdamW), ``galore-torch`` (its GaLoreAdamW, when
importable), ``ours`` (lowrank_kernels.GaLoreAdamW, backend "auto": the fused Triton kernels on CUDA, the
reference on CPU), ``ours-rsvd`` (randomized-SVD bases), ``ours-layerwise`` (steps inside backward,
lowrank_kernels.layerwise), and strategy variants (``ours-warm``, ``ours-energy``, ``ours-zero``,
``ours-rotate``, ``ours-lazy``, ``ours-converged``), update rules and bases (``ours-fira``,
``ours-frugal``, ``ours-apollo``, ``ours-apollo-mini``, ``ours-dct``) and 8-bit moments (``ours-int8``):
see ``VARIANTS``. GaLore projects the attention and
MLP weights; embeddings, norms and lm_head stay plain AdamW, as in GaLore's scripts. As in the GaLore paper, AdamW and the GaLore runs have their own
peak lr (``--lr``, ``--galore-lr``; projected weights move at ``galore_lr * scale``), with the same schedule
(linear warm-up over 10% of the steps, cosine decay to 10%).
Writes ``results.md`` (the table and the settings) and ``loss_curves.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import gc
import math
import platform
import textwrap
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from lowrank_kernels import GaLoreAdamW, __version__
from lowrank_kernels.hf import galore_param_groups
from lowrank_kernels.layerwise import LayerwiseUpdates
from lowrank_kernels.memory import state_bytes

from .data import eval_batches, load_splits, train_batches
from .model import GALORE_TARGETS, Llama, ModelConfig

# Our optimizer's variants: extra keys of the projected group (strategy axes, lowrank_kernels.projection).
VARIANTS = {
    "ours": {},
    "ours-layerwise": {},
    "ours-rsvd": {"projector": "rsvd"},
    "ours-warm": {"projector": "warm"},
    "ours-energy": {"projector": "rsvd", "rank_policy": "energy", "energy_threshold": 0.2},
    "ours-zero": {"moments_on_refresh": "zero"},
    "ours-rotate": {"moments_on_refresh": "rotate"},
    "ours-lazy": {"refresh_policy": "lazy"},
    "ours-converged": {"refresh_policy": "converged"},
    # Update rules and sources beyond GaLore (lowrank_kernels.update_rules), at their papers' settings:
    "ours-fira": {"update": "fira"},
    "ours-frugal": {"update": "frugal", "moments_on_refresh": "zero"},  # FRUGAL resets the moments
    "ours-apollo": {"update": "apollo", "projector": "random", "scale": 1.0},
    "ours-apollo-mini": {"update": "apollo-mini", "projector": "random", "rank": 1, "scale": 128.0,
                         "scale_front": True},  # APOLLO's small-model Mini runs use scale_front
    "ours-dct": {"projector": "dct"},
    "ours-int8": {"state_dtype": "int8"},  # applies to every group (see make_optimizer)
}
ALL_OPTIMIZERS = ("adamw", "galore-torch", *VARIANTS)
DEFAULT_OPTIMIZERS = ("adamw", "galore-torch", "ours", "ours-rsvd")
COLUMNS = ("optimizer", "final train loss", "eval loss", "tokens/s", "optimizer-state bytes", "peak CUDA memory")


def galore_torch_module():
    """galore_torch, or None when it does not import (it needs transformers and bitsandbytes)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import galore_torch
        return galore_torch
    except ImportError:
        return None


def make_optimizer(name: str, model: torch.nn.Module, args):
    """(optimizer, LayerwiseUpdates or None) for one run."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay), None
    groups = galore_param_groups(model, GALORE_TARGETS, rank=args.rank, update_proj_gap=args.update_proj_gap,
                                 scale=args.galore_scale, proj_type="std")
    kwargs = dict(lr=args.galore_lr, weight_decay=args.weight_decay)
    if name == "galore-torch":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its "AdamW is deprecated" warning
            return galore_torch_module().GaLoreAdamW(groups, **kwargs), None
    groups[-1].update(VARIANTS[name])
    if "state_dtype" in VARIANTS[name]:  # the moments' precision is for every group, embeddings included
        for group in groups:
            group["state_dtype"] = VARIANTS[name]["state_dtype"]
    opt = GaLoreAdamW(groups, **kwargs, backend="auto", seed=args.seed)
    return opt, (LayerwiseUpdates(opt) if name == "ours-layerwise" else None)


def lr_lambda(steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


@torch.no_grad()
def evaluate(model, data, args, device) -> float:
    model.eval()
    losses = [model.loss(x.to(device), y.to(device)).item()
              for x, y in eval_batches(data, args.batch_size, args.seq_len, args.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def run(name: str, args, train_data, eval_data, device) -> dict:
    torch.manual_seed(args.seed)  # the same initial weights for every optimizer
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, tie_embeddings=args.tie_embeddings)
    model = Llama(cfg).to(device=device, dtype=getattr(torch, args.dtype))
    opt, layerwise = make_optimizer(name, model, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps, max(1, args.steps // 10)))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses = []
    batches = train_batches(train_data, args.batch_size, args.seq_len, args.steps, seed=args.seed + 1)
    start = time.perf_counter()
    for x, y in (bar := tqdm(batches, total=args.steps, desc=f"{name:>14}", leave=False)):
        loss = model.loss(x.to(device), y.to(device))
        if layerwise is not None:
            layerwise.backward(loss)
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())  # also a sync point, so the timing covers the device's work
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    seconds = time.perf_counter() - start
    peak = f"{torch.cuda.max_memory_allocated() / 2**20:.1f} MiB" if device.type == "cuda" else "n/a (CPU)"
    tail = losses[-min(10, len(losses)):]
    row = {
        "optimizer": name, "final train loss": f"{sum(tail) / len(tail):.4f}",
        "eval loss": f"{evaluate(model, eval_data, args, device):.4f}",
        "tokens/s": f"{args.steps * args.batch_size * args.seq_len / seconds:,.0f}",
        "optimizer-state bytes": f"{state_bytes(opt):,}", "peak CUDA memory": peak, "losses": losses,
    }
    if layerwise is not None:
        layerwise.remove()
    del model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown_table(rows) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows])


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture: the "machine" line of a results file."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"


def new_plot(figsize=(7, 4.5)) -> tuple:
    """(figure, axes) of a headless (Agg) matplotlib figure; :func:`save_plot` finishes it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_plot(fig, ax, path, title: str, width: int = 100, legend_size=None) -> None:
    """Title (wrapped at ``width`` characters), legend, tight layout; write ``path`` at 120 dpi, close."""
    import matplotlib.pyplot as plt

    ax.set_title(textwrap.fill(title, width), fontsize=8)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(rows, path: Path, title: str) -> None:
    fig, ax = new_plot()
    for i, r in enumerate(rows):
        losses = torch.tensor(r["losses"])
        k = min(10, len(losses))  # moving average: per-batch losses are noisy
        smooth = losses.unfold(0, k, 1).mean(1)
        # Identical runs (galore-torch and ours on CPU) overlap exactly: dashes keep both visible.
        ax.plot(range(k, k + len(smooth)), smooth, linestyle=("-", "--", ":", "-.")[i % 4],
                label=f"{r['optimizer']} (eval {r['eval loss']})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss ({k}-step moving average)")
    save_plot(fig, ax, path, title)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lowrank_kernels.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", nargs="+", choices=ALL_OPTIMIZERS, default=list(DEFAULT_OPTIMIZERS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--tie-embeddings", action="store_true")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW's peak lr")
    p.add_argument("--galore-lr", type=float, default=1e-2,
                   help="peak lr of the GaLore runs, all groups (projected weights move at lr * scale)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--update-proj-gap", type=int, default=50)
    p.add_argument("--galore-scale", type=float, default=0.25)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("demo_results"))
    return p.parse_args(argv)


def demo(argv=None) -> list[dict]:
    """Run the demo with command-line ``argv``; returns the table's rows (with each run's losses)."""
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    names = list(dict.fromkeys(args.optimizers))
    if "galore-torch" in names and galore_torch_module() is None:
        print("galore-torch is not importable (pip install galore-torch transformers bitsandbytes): skipped")
        names.remove("galore-torch")
    train_data, eval_data = load_splits()
    machine = machine_name(device)
    setting = (f"dim {args.dim}, {args.layers} layers, {args.heads} heads, seq {args.seq_len}, batch "
               f"{args.batch_size}, {args.steps} steps, lr {args.lr} (AdamW) / {args.galore_lr} (GaLore), "
               f"rank {args.rank}, gap {args.update_proj_gap}, scale {args.galore_scale}, {args.dtype}")
    rows = []
    start = time.perf_counter()
    for name in tqdm(names, desc="optimizers", unit="run"):
        rows.append(run(name, args, train_data, eval_data, device))
    total = time.perf_counter() - start
    table = markdown_table(rows)
    print(f"\n{setting}; {machine}, {torch.get_num_threads()} threads; {total:.0f} s in all\n\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(
        f"# lowrank_kernels demo\n\n- setting: {setting}\n- data: {len(train_data):,} train / {len(eval_data):,} "
        f"eval bytes of Python stdlib docstrings\n- machine: {machine}, torch {torch.__version__}, "
        f"lowrank_kernels {__version__}, {torch.get_num_threads()} threads, {total:.0f} s in all\n"
        "- final train loss: mean of the last 10 steps; eval loss: held-out split; tokens/s: training "
        "loop only\n\n" + table + "\n", encoding="utf-8")
    plot(rows, args.out / "loss_curves.png", f"{setting}; {machine}")
    print(f"\nwrote {args.out / 'results.md'} and {args.out / 'loss_curves.png'}")
    return rows


def main(argv=None) -> None:
    """The console script (``lowrank-demo``): returns None, since a return value would be the exit status."""
    demo(argv)


if __name__ == "__main__":
    main()
