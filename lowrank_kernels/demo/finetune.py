"""Fine-tuning mode: pretrain the tiny LLaMA briefly, then fine-tune it on a small held-out slice of text.

    python -m lowrank_kernels.demo.finetune [--pretrain-steps 300 --steps 120 --seeds 0 1 ...] [--out DIR]

Pretraining (AdamW, seed 0) uses the demo's training split. Fine-tuning uses the first ``--ft-bytes`` of
the held-out split (text the model never saw: the limited-data regime where Deep LoRA claims less
overfitting) and evaluates on the rest of the held-out split. Methods, all on the attention and MLP
linears (``GALORE_TARGETS``) at one ``--rank``:

* LoRA (A Kaiming, B = 0), Deep LoRA (gamma 0: only the 2h x 2h inner factors train), LoRA-GA (paper
  convention), LoRA-SB (only the r x r core trains): adapters from ``lowrank_kernels.adapters``, base model
  frozen, AdamW on the adapter parameters; the gradient-initialised ones start from the mean gradient of
  ``--grad-batches`` fine-tuning batches;
* GaLoreAdamW (ours) and full AdamW: every parameter trains.

Each method has its own peak lr (``--lr-*``), the same schedule (warm-up 10 %, cosine to 10 %) and the
same batches per seed; the seed also draws the adapters' random parts. Writes ``results.md`` (table:
eval loss mean ± spread over seeds, best eval loss along the run, trainable parameters, optimizer-state
bytes), ``results.json`` (every run's eval curve) and ``finetune.png`` (eval loss along fine-tuning)
under ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lowrank_kernels import GaLoreAdamW, __version__
from lowrank_kernels.adapters import accumulate_gradients, deep_lora, lora, lora_ga, lora_sb
from lowrank_kernels.hf import galore_param_groups
from lowrank_kernels.memory import state_bytes

from .__main__ import evaluate, lr_lambda, machine_name, new_plot, save_plot
from .data import load_splits, train_batches
from .model import GALORE_TARGETS, Llama, ModelConfig

METHODS = ("LoRA", "Deep LoRA", "LoRA-GA", "LoRA-SB", "GaLoreAdamW", "full AdamW")
LR_ARGS = {"LoRA": "lr_lora", "Deep LoRA": "lr_deep", "LoRA-GA": "lr_ga", "LoRA-SB": "lr_sb",
           "GaLoreAdamW": "lr_galore", "full AdamW": "lr_full"}


def build(method: str, model, args, seed: int, grads):
    """(optimizer, trainable parameter count) for one fine-tuning run; adapters are installed in place."""
    lr = getattr(args, LR_ARGS[method])
    if method == "full AdamW":
        params = list(model.parameters())
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0), sum(p.numel() for p in params)
    if method == "GaLoreAdamW":
        groups = galore_param_groups(model, GALORE_TARGETS, rank=args.rank, update_proj_gap=args.update_proj_gap,
                                     scale=args.galore_scale)
        opt = GaLoreAdamW(groups, lr=lr, weight_decay=0.0, backend="auto", seed=seed)
        return opt, sum(p.numel() for g in groups for p in g["params"])
    if method == "LoRA":
        adapters = lora(model, GALORE_TARGETS, args.rank, alpha=args.alpha, seed=seed)
    elif method == "Deep LoRA":
        adapters = deep_lora(model, GALORE_TARGETS, args.rank, grads, epsilon=args.epsilon, seed=seed)
    elif method == "LoRA-GA":
        adapters = lora_ga(model, GALORE_TARGETS, args.rank, grads, alpha=args.alpha, seed=seed)
    else:
        adapters = lora_sb(model, GALORE_TARGETS, args.rank, grads, lr=lr, seed=seed)
    return torch.optim.AdamW(adapters.param_groups(lr=lr), weight_decay=0.0), adapters.num_trainable()


def pretrain(args, train_data, device) -> dict:
    """A briefly pretrained model's state_dict (cached at ``--checkpoint`` when given)."""
    if args.checkpoint and args.checkpoint.exists():
        return torch.load(args.checkpoint, weights_only=True, map_location=device)
    torch.manual_seed(0)
    model = Llama(ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.pretrain_steps, max(1, args.pretrain_steps // 10)))
    batches = train_batches(train_data, args.batch_size, args.seq_len, args.pretrain_steps, seed=1)
    for x, y in tqdm(batches, total=args.pretrain_steps, desc="pretrain", leave=False):
        model.loss(x.to(device), y.to(device)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    state = model.state_dict()
    if args.checkpoint:
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, args.checkpoint)
    return state


def finetune(method: str, seed: int, state: dict, args, ft_data, ft_eval, device) -> dict:
    torch.manual_seed(seed)
    model = Llama(ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads)).to(device)
    model.load_state_dict(state)
    start = time.perf_counter()
    grads = None
    if method in ("Deep LoRA", "LoRA-GA", "LoRA-SB"):
        batches = train_batches(ft_data, args.batch_size, args.seq_len, args.grad_batches, seed=10_000 + seed)
        grads = accumulate_gradients(model, lambda m, b: m.loss(b[0].to(device), b[1].to(device)), batches,
                                     GALORE_TARGETS)
    opt, trainable = build(method, model, args, seed, grads)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps, max(1, args.steps // 10)))
    evals = [(0, evaluate(model, ft_eval, args, device))]
    losses = []
    for step, (x, y) in enumerate(train_batches(ft_data, args.batch_size, args.seq_len, args.steps, seed=seed), 1):
        loss = model.loss(x.to(device), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            evals.append((step, evaluate(model, ft_eval, args, device)))
    tail = losses[-min(10, len(losses)):]
    return {"method": method, "seed": seed, "lr": getattr(args, LR_ARGS[method]), "eval": evals[-1][1], "best eval": min(e for _, e in evals),
            "train": sum(tail) / len(tail), "evals": evals, "trainable": trainable,
            "optimizer bytes": state_bytes(opt), "seconds": time.perf_counter() - start}


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        ev = [r["eval"] for r in mine]
        rows.append({"method": method, "eval losses": ev, "eval": sum(ev) / len(ev),
                     "spread": (max(ev) - min(ev)) / 2, "best eval": sum(r["best eval"] for r in mine) / len(mine),
                     "train": sum(r["train"] for r in mine) / len(mine), "trainable": mine[0]["trainable"],
                     "optimizer bytes": max(r["optimizer bytes"] for r in mine),
                     "seconds": sum(r["seconds"] for r in mine) / len(mine), "runs": mine})
    return rows


def markdown_table(rows, seeds) -> str:
    head = ("| method | eval loss (mean ± half-range) | " + " | ".join(f"seed {s}" for s in seeds) +
            " | best eval along the run | final train loss | trainable params | optimizer-state bytes | s/run |")
    lines = [head, "|" + "---|" * (7 + len(seeds))]
    for r in rows:
        lines.append(f"| {r['method']} | {r['eval']:.4f} ± {r['spread']:.4f} | "
                     + " | ".join(f"{e:.4f}" for e in r["eval losses"])
                     + f" | {r['best eval']:.4f} | {r['train']:.4f} | {r['trainable']:,} | {r['optimizer bytes']:,} | "
                       f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def plot(rows, start_loss: float, path: Path, title: str) -> None:
    fig, ax = new_plot()
    for i, r in enumerate(rows):
        steps = [s for s, _ in r["runs"][0]["evals"]]
        mean = [sum(run["evals"][j][1] for run in r["runs"]) / len(r["runs"]) for j in range(len(steps))]
        ax.plot(steps, mean, marker="o", markersize=3, linestyle=("-", "--", ":", "-.")[i % 4],
                label=f"{r['method']} ({r['trainable']:,} trainable)")
    ax.axhline(start_loss, color="grey", linewidth=0.8, label="pretrained, before fine-tuning")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("eval loss (mean over seeds)")
    save_plot(fig, ax, path, title, legend_size=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lowrank_kernels.demo.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--checkpoint", type=Path, default=None, help="cache of the pretrained weights (read if present)")
    p.add_argument("--steps", type=int, default=120, help="fine-tuning steps")
    p.add_argument("--ft-bytes", type=int, default=12_000, help="fine-tuning text: the held-out split's first bytes")
    p.add_argument("--grad-batches", type=int, default=4, help="batches averaged for the initial gradient")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA / LoRA-GA alpha (scaling alpha / rank)")
    p.add_argument("--epsilon", type=float, default=1e-3, help="Deep LoRA's inner-factor scale")
    p.add_argument("--update-proj-gap", type=int, default=50)
    p.add_argument("--galore-scale", type=float, default=0.25)
    p.add_argument("--lr-lora", type=float, default=3e-3)
    p.add_argument("--lr-ga", type=float, default=3e-3)
    p.add_argument("--lr-deep", type=float, default=1e-2)
    p.add_argument("--lr-sb", type=float, default=3e-3)
    p.add_argument("--lr-galore", type=float, default=3e-3)
    p.add_argument("--lr-full", type=float, default=1e-3)
    p.add_argument("--eval-batches", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("demo_results/finetune"))
    args = p.parse_args(argv)
    if args.eval_every < 1:
        p.error("--eval-every must be >= 1")
    return args


def finetune_demo(argv=None) -> list[dict]:
    """Run the fine-tuning comparison with command-line ``argv``; returns one summary row per method."""
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    train_data, held_out = load_splits()
    ft_data, ft_eval = held_out[:args.ft_bytes], held_out[args.ft_bytes:]
    if len(ft_data) <= args.seq_len + 1 or len(ft_eval) <= args.seq_len + 1:
        raise SystemExit(f"--ft-bytes {args.ft_bytes} leaves too little text on one side of {len(held_out)} bytes")
    begin = time.perf_counter()
    state = pretrain(args, train_data, device)
    probe = Llama(ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads)).to(device)
    probe.load_state_dict(state)
    start_loss = evaluate(probe, ft_eval, args, device)
    pretrain_seconds = time.perf_counter() - begin
    methods = [m for m in METHODS if m in args.methods]
    runs = [finetune(m, s, copy.deepcopy(state), args, ft_data, ft_eval, device)
            for s in args.seeds for m in tqdm(methods, desc=f"fine-tune seeds {args.seeds}", unit="run", leave=False)]
    rows = summarise(runs)
    total = time.perf_counter() - begin
    machine = machine_name(device)
    setting = (f"dim {args.dim}, {args.layers} layers, {args.heads} heads, seq {args.seq_len}, batch {args.batch_size}; "
               f"pretrain {args.pretrain_steps} steps (AdamW lr {args.pretrain_lr}); fine-tune {args.steps} steps on "
               f"{len(ft_data):,} held-out bytes, eval on the other {len(ft_eval):,}; rank {args.rank}, alpha {args.alpha}, "
               f"epsilon {args.epsilon}, {args.grad_batches} gradient batches; lr LoRA {args.lr_lora}, LoRA-GA {args.lr_ga}, "
               f"Deep LoRA {args.lr_deep}, LoRA-SB {args.lr_sb}, GaLore {args.lr_galore} (gap {args.update_proj_gap}, "
               f"scale {args.galore_scale}), AdamW {args.lr_full}; seeds {args.seeds}")
    table = markdown_table(rows, args.seeds)
    print(f"\n{setting}; {machine}, {torch.get_num_threads()} threads; {total:.0f} s in all\n"
          f"eval loss before fine-tuning: {start_loss:.4f}\n\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(
        f"# Fine-tuning the pretrained tiny LLaMA on a small held-out slice\n\n- setting: {setting}\n"
        f"- machine: {machine}, torch {torch.__version__}, lowrank_kernels {__version__}, "
        f"{torch.get_num_threads()} threads; {total:.0f} s in all ({pretrain_seconds:.0f} s pretraining)\n"
        f"- eval loss of the pretrained model before fine-tuning: {start_loss:.4f}\n"
        "- eval loss: after the last step; best eval: the lowest of the evaluations every "
        f"{args.eval_every} steps (mean over seeds); final train loss: mean of the last 10 steps; "
        "optimizer-state bytes: every tensor in optimizer.state at the end; s/run includes gradient "
        "accumulation and the adapters' rsvd\n\n" + table + "\n", encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps(
        {"setting": setting, "machine": machine, "start_loss": start_loss, "seconds": total, "runs": runs}, indent=1))
    try:
        plot(rows, start_loss, args.out / "finetune.png", f"{setting}; {machine}")
    except ImportError:
        print("matplotlib is not installed: no plot (results.json has the curves)")
    print(f"\nwrote results.md, results.json and finetune.png under {args.out}")
    return rows


def main(argv=None) -> None:
    finetune_demo(argv)


if __name__ == "__main__":
    main()
