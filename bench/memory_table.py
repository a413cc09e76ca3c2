"""Training memory of LLaMA 60M-7B (GaLore's configs) with AdamW and GaLore, from the optimizers' state.

Rows include 8-bit moments (state_dtype="int8": uint8 codes + fp32 absmax per 256 entries) and the
seed-only random basis (projector="random").

Models are built on the meta device (nothing is allocated) with the demo's LLaMA
(lowrank_kernels/demo/model.py), at the shapes of GaLore's configs/llama_*.json (untied embeddings,
vocabulary 32000) and the ranks of the GaLore paper's tables. Optimizer state is measured from real
optimizer objects: torch.optim.AdamW after a real step on meta tensors; GaLoreAdamW with the state its
first step creates (lowrank_kernels.memory.init_state, no SVD; tests/test_memory.py checks it against a
real step, against galore-torch and against the analytic count).

    python bench/memory_table.py      # -> bench/results/memory_meta_<date>.md and .json
"""
from __future__ import annotations

import argparse

import torch

from common import environment, write_results
from lowrank_kernels import GaLoreAdamW
from lowrank_kernels.demo.model import GALORE_TARGETS, Llama, ModelConfig
from lowrank_kernels.hf import galore_param_groups
from lowrank_kernels.memory import gradient_bytes, init_state, state_bytes, tensor_bytes

# name: (hidden size, layers, heads, intermediate size, GaLore rank)
LLAMA = {
    "60M": (512, 8, 8, 1376, 128),
    "130M": (768, 12, 12, 2048, 256),
    "350M": (1024, 24, 16, 2736, 256),
    "1B": (2048, 24, 32, 5461, 512),
    "7B": (4096, 32, 32, 11008, 1024),
}

# label: (weight dtype, optimizer kind, state_dtype for every group[, extra keys of the projected groups])
SETUPS = {
    "AdamW, fp32": (torch.float32, "adamw", None),
    "AdamW, bf16": (torch.bfloat16, "adamw", None),
    "GaLore, fp32 (galore-torch layout)": (torch.float32, "galore", None),
    "ours, bf16 weights + states": (torch.bfloat16, "galore", "bfloat16"),
    # state_dtype keeps moments in fp32 under bf16 weights (galore-torch ties them to the gradient's dtype)
    "ours, bf16 weights, fp32 moments": (torch.bfloat16, "galore", "float32"),
    # bitsandbytes-style 8-bit moments (codes + one fp32 scale per 256) in every group, embeddings included
    "ours, bf16 weights, int8 moments": (torch.bfloat16, "galore", "int8"),
    # APOLLO's seeded basis: the state keeps the seed, not the r x min(m, n) matrix
    "ours, bf16 weights, int8 moments, random basis (seed only)": (torch.bfloat16, "galore", "int8",
                                                                   {"projector": "random"}),
}

COUNTED = ("weights (parameter dtype) + gradients (full size, parameter dtype) + optimizer states (every "
           "tensor in optimizer.state: moments, projection bases, torch's step tensors). Layer-wise "
           "(lowrank_kernels.layerwise, accumulation_steps=1): each gradient is freed right after its "
           "parameter's step, so only the largest single gradient (the 32000-row embedding or lm_head) is "
           "counted; for AdamW that needs a per-parameter step, e.g. GaLoreAdamW without projected groups. "
           "Not counted: activations, SVD workspace, "
           "temporaries of the step, CUDA context, allocator overhead. GiB = 2^30 bytes.")


def measure(name: str, setup: str) -> dict:
    dim, layers, heads, ffn, rank = LLAMA[name]
    dtype, kind, state_dtype, *extra = SETUPS[setup]
    with torch.device("meta"):
        model = Llama(ModelConfig(vocab_size=32000, dim=dim, n_layers=layers, n_heads=heads, ffn_dim=ffn))
    model.to(dtype)
    params = list(model.parameters())
    if kind == "adamw":
        opt = torch.optim.AdamW(params)
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step()  # the real state, on meta tensors
    else:
        groups = galore_param_groups(model, GALORE_TARGETS, rank=rank)
        extra = extra[0] if extra else {}
        opt = GaLoreAdamW([{**g, "state_dtype": state_dtype, **(extra if "rank" in g else {})} for g in groups])
        init_state(opt)
    gib = 2.0**30
    weights = sum(tensor_bytes(p) for p in params)
    grads, grads_lw, states = gradient_bytes(params), gradient_bytes(params, layerwise=True), state_bytes(opt)
    # model and optimizer first, then the plotted value (bench/__main__ plots the first value column)
    return {
        "model": f"LLaMA {name}", "optimizer": setup,
        "total GiB": round((weights + grads + states) / gib, 2),
        "total GiB, layer-wise": round((weights + grads_lw + states) / gib, 2),
        "weights GiB": round(weights / gib, 2), "grads GiB": round(grads / gib, 2),
        "grads GiB, layer-wise": round(grads_lw / gib, 3), "optimizer states GiB": round(states / gib, 3),
        "params (M)": round(sum(p.numel() for p in params) / 1e6, 1), "rank": rank if kind == "galore" else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="accepted for bench/__main__; the table is always fast")
    parser.parse_args()
    rows = [measure(name, setup) for name in LLAMA for setup in SETUPS]
    meta = {**environment(), "device": "meta", "measured on": "torch's meta device (shapes and dtypes only; "
            "the same on every machine)", "counted": COUNTED}
    write_results("memory", rows, meta, list(rows[0]))


if __name__ == "__main__":
    main()
