"""galore_param_groups: transformers' target-module rules, and GaLoreAdamW inside a HF Trainer."""
import warnings

import pytest
import torch
from torch import nn

from lowrank_kernels import GaLoreAdamW
from lowrank_kernels.hf import galore_param_groups, target_matches


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)  # with a bias: the bias stays plain
        self.v_proj = nn.Linear(16, 16, bias=False)
        self.norm = nn.LayerNorm(16)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(16, 10, bias=False)


def projected_names(model, targets, **kw):
    groups = galore_param_groups(model, targets, **kw)
    ids = {id(p) for p in groups[-1]["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


@pytest.mark.parametrize("targets,expected", [
    (r".*\.q_proj", ["layers.0.q_proj.weight", "layers.1.q_proj.weight"]),               # str: fullmatch
    (["v_proj"], ["layers.0.v_proj.weight", "layers.1.v_proj.weight"]),                  # list: substring
    (["layers.0.q_proj"], ["layers.0.q_proj.weight"]),                                   # list: exact
    ([r"layers\.1\..*"], ["layers.1.q_proj.weight", "layers.1.v_proj.weight"]),          # list: fullmatch
    ("all-linear", ["layers.0.q_proj.weight", "layers.0.v_proj.weight", "layers.1.q_proj.weight",
                    "layers.1.v_proj.weight", "lm_head.weight"]),                        # as transformers: lm_head too
])
def test_matching_rules(targets, expected):
    assert projected_names(Net(), targets, rank=4) == expected


def test_groups_keys_biases_and_defaults():
    model = Net()
    plain, projected = galore_param_groups(model, "all_linear", projector="rsvd", state_dtype="bfloat16")
    assert {k: v for k, v in projected.items() if k != "params"} == {
        "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "projector": "rsvd",
        "state_dtype": "bfloat16"}
    plain_ids = {id(p) for p in plain["params"]}
    assert id(model.layers[0].q_proj.bias) in plain_ids and id(model.embed.weight) in plain_ids
    assert len(plain["params"]) + len(projected["params"]) == len(list(model.parameters()))


def test_warns_for_non_linear_matched_by_name_only():
    with pytest.warns(UserWarning) as record:
        galore_param_groups(Net(), ["norm", "q_proj"], rank=4)
    assert [str(w.message).split(" matched")[0] for w in record] == ["layers.0.norm", "layers.1.norm"]
    assert "is a LayerNorm" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a regex match of a non-Linear module is silent, as in transformers
        galore_param_groups(Net(), [r".*norm", r".*q_proj"], rank=4)


def test_errors():
    with pytest.raises(ValueError, match="no nn.Linear"):
        galore_param_groups(Net(), ["nothing"])
    with pytest.raises(TypeError, match="target_modules"):
        galore_param_groups(Net(), ("q_proj",))


@pytest.mark.parametrize("targets", [r".*\.q_proj", "layers.0.q_proj", ["q_proj"], ["layers.0"], [r".*norm"],
                                     [r"layers\.\d\.v_proj", "lm"], "all-linear"])
def test_same_decisions_as_transformers(targets):
    trainer_utils = pytest.importorskip("transformers.trainer_utils")
    for name, _ in Net().named_modules():
        theirs = trainer_utils.check_target_module_exists(targets, name, return_is_regex=True)
        assert target_matches(targets, name) == (bool(theirs[0]), theirs[1]), name


def test_trainer_with_galore_adamw(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = galore_param_groups(model, [r".*\.self_attn\..*", r".*\.mlp\..*"], rank=4, update_proj_gap=2)
    optimizer = GaLoreAdamW(groups, lr=1e-2)
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                          use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train()
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer  # accelerate wraps it
    for name, p in model.named_parameters():
        assert not torch.equal(before[name], p), f"{name} did not change"
    q = model.model.layers[0].self_attn.q_proj.weight  # 32 x 32, "std": right basis, moments 32 x 4
    state = optimizer.state[q]
    assert state["step"] == 3 and state["refreshes"] == 2
    assert state["proj_right"].shape == (32, 4) and state["exp_avg"].shape == (32, 4)
