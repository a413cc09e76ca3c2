"""Gradient-initialised adapters (lowrank_kernels.adapters): invariants at init, LoRA-GA's first step, PEFT
parity, merge / unmerge, adapter-only checkpoints, bad input, and the demo's fine-tuning mode.

Tolerances: fp32 throughout. Output-at-init checks compare against the base model's output (values ~1):
an offset W − sBA followed by + sBA costs a few ulps, so 1e-5. Singular vectors from two exact SVD routes
(our rsvd with a full-width sketch vs torch.svd_lowrank) agree to ~1e-6 relative when singular values
are distinct; 1e-4 leaves room for gaps in small random matrices.
"""
import copy
import importlib.util

import pytest
import torch
from torch import nn

from lowrank_kernels.adapters import (AdapterSet, DeepLoraLinear, LoraLinear, accumulate_gradients, deep_lora,
                                      lora, lora_ga, lora_sb)
from lowrank_kernels.adapters.core import bucketed_rsvd
from lowrank_kernels.linalg import rsvd

HAS_HF = importlib.util.find_spec("transformers") is not None
HAS_PEFT = HAS_HF and importlib.util.find_spec("peft") is not None


class Block(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up_proj = nn.Linear(d, f)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return x + self.down_proj(torch.tanh(self.up_proj(self.norm(x))))


class Net(nn.Module):
    """Odd shapes (13, 23, 7); two blocks share shapes, so rsvd buckets hold two matrices."""

    def __init__(self, d=13, f=23, out=7):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d, f), Block(d, f)])
        self.head = nn.Linear(d, out)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


TARGETS = r".*\.(up|down)_proj"


def make(seed=0):
    torch.manual_seed(seed)
    net = Net()
    x = torch.randn(32, 13)
    y = torch.randint(0, 7, (32,))
    return net, x, y


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def grads_of(net, x, y, targets=TARGETS):
    return accumulate_gradients(net, loss_fn, [(x[:16], y[:16]), (x[16:], y[16:])], targets)


def adapt(method, net, grads, **kw):
    if method == "lora":
        return lora(net, TARGETS, 4, **kw)
    if method == "lora_ga":
        return lora_ga(net, TARGETS, 4, grads, **kw)
    if method == "lora_sb":
        return lora_sb(net, TARGETS, 4, grads, lr=1e-2, **kw)
    return deep_lora(net, TARGETS, 4, grads, gamma=0.5, **kw)


METHODS = ["lora", "lora_ga", "lora_sb", "deep_lora"]


def train_steps(net, adapters: AdapterSet, x, y, steps=3, lr=0.1):
    # lr 0.1: large enough that Deep LoRA's ε·I inner factors (1e-3) grow to a visible ΔW in 3 steps
    opt = torch.optim.AdamW(adapters.param_groups(lr=lr))
    for _ in range(steps):
        loss_fn(net, (x, y)).backward()
        opt.step()
        opt.zero_grad()


# ---- initialisation invariants ------------------------------------------------------------------------
def test_accumulate_gradients_is_the_mean_and_restores_the_model():
    net, x, y = make()
    net.head.weight.requires_grad_(False)
    net.eval()
    g = grads_of(net, x, y)
    assert list(g) == ["blocks.0.up_proj", "blocks.0.down_proj", "blocks.1.up_proj", "blocks.1.down_proj"]
    manual = []
    for sl in (slice(0, 16), slice(16, 32)):
        net.zero_grad()
        loss_fn(net, (x[sl], y[sl])).backward()
        manual.append(net.blocks[1].up_proj.weight.grad.clone())
    torch.testing.assert_close(g["blocks.1.up_proj"], (manual[0] + manual[1]) / 2, rtol=1e-6, atol=1e-8)
    assert not net.training and not net.head.weight.requires_grad and net.blocks[0].norm.weight.requires_grad


def test_batched_rsvd_buckets_give_each_matrix_its_own_seed():
    gen = torch.Generator().manual_seed(0)
    mats = {"a": torch.randn(20, 9, generator=gen), "b": torch.randn(20, 9, generator=gen),
            "c": torch.randn(9, 5, generator=gen)}
    seeds = {"a": 3, "b": 4, "c": 5}
    out = bucketed_rsvd(mats, 3, seeds, oversample=2, niter=1, desc="t")
    for name, a in mats.items():
        for got, want in zip(out[name], rsvd(a, 3, oversample=2, niter=1, seed=seeds[name])):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a different seed gives a different (oversample 2 < rank gap) sketch: the seed is really used
    other = rsvd(mats["a"], 3, oversample=2, niter=1, seed=99)[0]
    assert not torch.equal(other.abs(), out["a"][0].abs())


def test_lora_ga_keeps_the_output_and_its_first_step_follows_the_gradient():
    net, x, y = make()
    g = grads_of(net, x, y)
    base_out = net(x).detach()
    ref = copy.deepcopy(net)
    ad = lora_ga(net, TARGETS, 2, g, niter=8)  # 2r = 4 pairs; more power iterations: an almost exact top-4
    torch.testing.assert_close(net(x), base_out, rtol=1e-5, atol=1e-5)
    assert ad.num_trainable() == sum(2 * (m.in_features + m.out_features) for m in ad.modules.values())

    def first_step_cosines(model, adapters):
        for p in adapters.parameters():
            p.grad = None
        # the mean of the two batches' losses: its gradient is exactly the accumulated one
        ((loss_fn(model, (x[:16], y[:16])) + loss_fn(model, (x[16:], y[16:]))) / 2).backward()
        out = {}
        for name, m in adapters.modules.items():  # SGD step on A, B -> change of s·BA to first order
            step = m.scaling * (m.lora_B.grad @ m.lora_A + m.lora_B @ m.lora_A.grad)
            out[name] = torch.nn.functional.cosine_similarity(step.flatten(), g[name].flatten(), dim=0).item()
        return out

    cos_ga = first_step_cosines(net, ad)
    cos_lora = first_step_cosines(ref, lora(ref, TARGETS, 2))
    for name, G in g.items():
        S = torch.linalg.svdvals(G)
        ideal = (S[:4].square().sum() / S.square().sum()).sqrt().item()  # cosine of G with its best rank-4 part
        assert cos_ga[name] == pytest.approx(ideal, abs=2e-3), name
        assert cos_ga[name] > cos_lora[name] + 0.2, (name, cos_ga[name], cos_lora[name])


def test_deep_lora_init():
    net, x, y = make()
    g = grads_of(net, x, y)
    base_out = net(x).detach()
    eps = 1e-3
    ad = deep_lora(net, TARGETS, 4, g, epsilon=eps, gamma=0.5, oversample=20)  # oversample 20: exact top-2 subspaces
    out = net(x)
    torch.testing.assert_close(out, base_out, rtol=1e-6, atol=1e-6)  # ΔW(0) = ε³ L Rᵀ: |ΔW x| <= 1e-9 |x|
    for name, m in ad.modules.items():
        assert isinstance(m, DeepLoraLinear) and m.left.shape == (m.out_features, 4) and m.right.shape == (m.in_features, 4)
        torch.testing.assert_close(m.delta_weight(), eps ** 3 * m.left @ m.right.T, rtol=1e-5, atol=1e-15)
        for Q in (m.left, m.right):
            torch.testing.assert_close(Q.T @ Q, torch.eye(4), rtol=0, atol=1e-5)
        U, _, Vh = torch.linalg.svd(g[name])
        # L contains the top-2 left singular vectors, R the top-2 right ones
        assert (m.left.T @ U[:, :2]).square().sum().item() == pytest.approx(2, abs=1e-4)
        assert (m.right.T @ Vh[:2].T).square().sum().item() == pytest.approx(2, abs=1e-4)
    groups = ad.param_groups(lr=1e-3)
    assert [g_["lr"] for g_ in groups] == [1e-3, 5e-4] and len(groups[0]["params"]) == 3 * len(ad.modules)
    # gamma = 0 (default): L and R frozen, one group
    net2, *_ = make()
    ad2 = deep_lora(net2, TARGETS, 2, g)
    assert len(ad2.param_groups(lr=1.0)) == 1 and ad2.num_trainable() == 3 * 4 * len(ad2.modules)
    assert not any(m.left.requires_grad or m.right.requires_grad for m in ad2.modules.values())


def test_lora_sb_starts_at_the_best_rank_r_first_update():
    net, x, y = make()
    g = grads_of(net, x, y)
    ad = lora_sb(net, TARGETS, 3, g, lr=1e-2, scaling=2.0, oversample=20)
    for name, m in ad.modules.items():
        D = -1e-2 * torch.sign(g[name])
        U, S, Vh = torch.linalg.svd(D)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        torch.testing.assert_close(m.delta_weight(), best, rtol=1e-4, atol=1e-6)
        assert not m.lora_A.requires_grad and not m.lora_B.requires_grad and m.lora_R.requires_grad
    assert ad.num_trainable() == 9 * len(ad.modules)
    assert all(not p.requires_grad for n, p in net.named_parameters() if "lora_R" not in n)


# ---- merge, checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_round_trip(method):
    net, x, y = make()
    ad = adapt(method, net, grads_of(net, x, y))
    train_steps(net, ad, x, y)
    out = net(x).detach()
    weights = {n: m.base_layer.weight.detach().clone() for n, m in ad.modules.items()}
    ad.merge()
    torch.testing.assert_close(net(x), out, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        ad.merge()
    ad.unmerge()
    for n, m in ad.modules.items():
        torch.testing.assert_close(m.base_layer.weight, weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(net(x), out, rtol=1e-5, atol=1e-5)
    plain = ad.remove(merge=True)
    assert isinstance(plain.blocks[0].up_proj, nn.Linear) and type(plain.blocks[0].up_proj) is nn.Linear
    torch.testing.assert_close(plain(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_adapter_only_checkpoint_loads_with_weights_only(method, tmp_path):
    net, x, y = make()
    fresh = copy.deepcopy(net)
    ad = adapt(method, net, grads_of(net, x, y))
    train_steps(net, ad, x, y)
    path = tmp_path / "adapter.pt"
    torch.save(ad.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert all(".base_layer." not in k for k in state) and len(state) >= 2 * len(ad.modules)
    # The fresh copy is initialised from other gradients (half the data): a LoRA-GA checkpoint moves the
    # base-weight offset to its own, so the loaded model still equals the trained one.
    ad2 = adapt(method, fresh, grads_of(fresh, x[:16], y[:16]))
    assert not torch.allclose(fresh(x), net(x), atol=1e-4)
    ad2.load_state_dict(state)
    torch.testing.assert_close(fresh(x), net(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="mismatch"):
        ad2.load_state_dict({k: v for k, v in state.items() if "blocks.0" not in k})


# ---- bad input -----------------------------------------------------------------------------------------
def test_bad_input_raises_before_touching_the_model():
    net, x, y = make()
    g = grads_of(net, x, y)
    before = copy.deepcopy(net.state_dict())
    cases = [
        (lambda: lora_ga(net, TARGETS, 7, g), r"rank 7 is too large for blocks\.0\.up_proj \(weight 23x13\).*14"),
        (lambda: deep_lora(net, TARGETS, 14, g), r"rank 14 is too large for blocks\.0\.up_proj \(weight 23x13\)"),
        (lambda: lora_sb(net, TARGETS, 20, g, lr=1e-3), r"too large for blocks\.0\.up_proj"),
        (lambda: deep_lora(net, TARGETS, 3, g), "even"),
        (lambda: lora_ga(net, ["nothing_here"], 2, g), "no nn.Linear module matches"),
        (lambda: lora_ga(net, TARGETS + "|head", 2, g), r"no gradient for target head \(weight 7x13\)"),
        (lambda: lora_sb(net, TARGETS, 2, {}, lr=1e-3), "no gradient for target blocks.0.up_proj"),
        (lambda: lora_ga(net, TARGETS, 2, {**g, "blocks.1.down_proj": torch.zeros(3, 3)}), r"shape \(3, 3\)"),
        (lambda: lora_ga(net, TARGETS, 2, {**g, "blocks.0.up_proj": g["blocks.0.up_proj"] * float("nan")}),
         "non-finite"),
        (lambda: lora_ga(net, TARGETS, 2, g, variant="nope"), "variant"),
        (lambda: lora_ga(net, TARGETS, 2, [1, 2]), "grads must map"),
    ]
    for call, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            call()
    after = net.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m) is not LoraLinear for m in net.modules())
    tied = Net()
    tied.extra = nn.Linear(13, 7)
    tied.extra.weight = tied.head.weight  # LoRA-GA's offset of head would move extra too
    with pytest.raises(ValueError, match=r"head\.weight is tied to extra\.weight"):
        lora_ga(tied, ["head"], 2, {"head": torch.randn(7, 13)})
    lora(net, TARGETS, 2)
    with pytest.raises(ValueError, match="already"):
        lora_ga(net, "all-linear", 2, g)


# ---- transformers / PEFT ----------------------------------------------------------------------------------
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    batches = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return model, batches


def hf_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


@pytest.mark.skipif(not HAS_HF, reason="needs transformers")
@pytest.mark.parametrize("method", ["deep_lora", "lora_sb", "lora_ga"])
def test_transformers_llama(method):
    model, batches = tiny_llama()
    x = batches[0]
    with torch.no_grad():
        base = model(x).logits
    g = accumulate_gradients(model, hf_loss, batches, HF_TARGETS)
    ad = {"deep_lora": lambda: deep_lora(model, HF_TARGETS, 4, g),
          "lora_sb": lambda: lora_sb(model, HF_TARGETS, 4, g, lr=1e-3),
          "lora_ga": lambda: lora_ga(model, HF_TARGETS, 4, g)}[method]()
    assert len(ad.modules) == 14
    with torch.no_grad():
        start = model(x).logits
    if method == "lora_sb":  # starts at the approximated first update: a small, nonzero change
        assert 0 < (start - base).abs().max() < 0.05
    else:
        torch.testing.assert_close(start, base, rtol=1e-5, atol=1e-5)
    opt = torch.optim.AdamW(ad.param_groups(lr=1e-2))
    losses = []
    for _ in range(3):
        loss = hf_loss(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def _sign_aligned(ours, theirs, dim):
    s = torch.sign((ours * theirs).sum(dim, keepdim=True))
    return ours * s


@pytest.mark.skipif(not HAS_PEFT, reason="needs peft and transformers")
def test_lora_ga_peft_variant_equals_peft():
    from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga
    model, batches = tiny_llama()
    theirs = copy.deepcopy(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=HF_TARGETS, init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig())

    def train_step():  # PEFT's gradient estimation: the same batches, one backward each, averaged
        for b in batches:
            hf_loss(theirs, b).backward()

    with pytest.warns(UserWarning):  # torch: full backward hooks with no input requiring grad
        preprocess_loraga(theirs, config, train_step)
    peft_model = get_peft_model(theirs, config)
    ours = copy.deepcopy(model)
    g = accumulate_gradients(ours, hf_loss, batches, HF_TARGETS)
    ad = lora_ga(ours, HF_TARGETS, 4, g, variant="peft", alpha=8)
    as_peft = lora_ga(copy.deepcopy(model), HF_TARGETS, 4, g, variant="peft", alpha=8, peft=True)
    assert set(ad.modules) == {n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    # q = 4r = 16 >= min(shape) for every target: both SVDs are exact, so factors agree up to the sign of
    # each singular pair (A's rows and B's columns come from different pairs, so each flips on its own).
    for name, m in ad.modules.items():
        layer = peft_model.base_model.model.get_submodule(name)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert m.scaling == layer.scaling["default"] == 2.0
        torch.testing.assert_close(_sign_aligned(m.lora_A, A, 1), A, rtol=0, atol=1e-4 * A.abs().max().item())
        torch.testing.assert_close(_sign_aligned(m.lora_B, B, 0), B, rtol=0, atol=1e-4 * B.abs().max().item())
        # base weights differ only by the sign-dependent offsets: W + s·BA is the pretrained weight in both
        torch.testing.assert_close(m.base_layer.weight + m.delta_weight(),
                                   layer.get_base_layer().weight + layer.get_delta_weight("default"),
                                   rtol=0, atol=1e-6)
        # peft=True carries exactly our factors and offset
        mine = as_peft.base_model.model.get_submodule(name)
        assert torch.equal(mine.lora_A["default"].weight, m.lora_A) and torch.equal(mine.lora_B["default"].weight, m.lora_B)
        assert torch.equal(mine.get_base_layer().weight, m.base_layer.weight)
    x = batches[0]
    with torch.no_grad():
        base = model(x).logits
        for adapted in (ours, peft_model, as_peft):
            torch.testing.assert_close(adapted(x).logits, base, rtol=1e-5, atol=1e-5)
        assert as_peft.peft_config["default"].init_lora_weights == "lora_ga"
        merged = as_peft.merge_and_unload()  # PEFT's merge works on it
        torch.testing.assert_close(merged(x).logits, base, rtol=1e-5, atol=1e-5)


# ---- the demo's fine-tuning mode -----------------------------------------------------------------------------
def test_finetune_demo_tiny(tmp_path):
    from lowrank_kernels.demo.finetune import METHODS as FT_METHODS
    from lowrank_kernels.demo.finetune import finetune_demo
    rows = finetune_demo(["--pretrain-steps", "2", "--steps", "2", "--dim", "32", "--layers", "1", "--heads", "2",
                          "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--rank", "4",
                          "--grad-batches", "1", "--seeds", "0", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == list(FT_METHODS)
    by = {r["method"]: r for r in rows}
    assert by["full AdamW"]["trainable"] == by["GaLoreAdamW"]["trainable"] > by["LoRA"]["trainable"]
    assert by["LoRA-SB"]["trainable"] < by["LoRA"]["trainable"]
    assert by["LoRA"]["optimizer bytes"] < by["GaLoreAdamW"]["optimizer bytes"] < by["full AdamW"]["optimizer bytes"]
    assert all(len(r["eval losses"]) == 1 and r["runs"][0]["evals"][0][0] == 0 for r in rows)
    for name in ("results.md", "results.json", "finetune.png"):
        assert (tmp_path / name).stat().st_size > 0
