"""GaLoreAdamW in a Hugging Face Trainer: build the param groups, pass the optimizer in.

    python examples/hf_trainer.py                 # a tiny random LLaMA on the demo corpus, CPU, 20 steps
    python examples/hf_trainer.py --steps 100 --rank 16

transformers' own ``optim="galore_adamw"`` is wired to galore-torch; ``Trainer(optimizers=(opt, None))``
takes any optimizer, and the Trainer then builds its usual lr scheduler around it. The groups select
the same modules ``optim_target_modules`` would (lowrank_kernels.hf.galore_param_groups). Needs
``pip install transformers accelerate``.
"""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from lowrank_kernels import GaLoreAdamW
from lowrank_kernels.demo.data import load_splits, train_batches
from lowrank_kernels.hf import galore_param_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--output-dir", default="hf_trainer_out")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(config)  # randomly initialised: nothing is downloaded

    # As TrainingArguments(optim_target_modules=[r".*.attn.*", r".*.mlp.*"], optim_args="rank=...") would.
    groups = galore_param_groups(model, [r".*\.self_attn\..*", r".*\.mlp\..*"], rank=args.rank,
                                 update_proj_gap=50, scale=0.25)
    optimizer = GaLoreAdamW(groups, lr=1e-2, backend="auto")  # Triton kernels on CUDA, reference on CPU

    train, _ = load_splits()  # byte-level tokens of the shipped Python-docstrings corpus
    data = [{"input_ids": x[0], "labels": x[0]} for x, _ in train_batches(train, 1, 64, 8 * args.steps, seed=1)]
    training_args = TrainingArguments(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
                                      logging_steps=5, report_to=[], save_strategy="no",
                                      use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=training_args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train()
    state = optimizer.state[model.model.layers[0].self_attn.q_proj.weight]
    print(f"q_proj state: step {state['step']}, basis {tuple(state['proj_right'].shape)}, "
          f"moments {tuple(state['exp_avg'].shape)}")


if __name__ == "__main__":
    main()
