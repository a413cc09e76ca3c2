"""The new options on a CUDA device (skipped without one; the CPU tests cover the same rules).

CPU and CUDA runs are compared with one refresh only (update_proj_gap beyond the run): SVD
implementations may flip a singular vector's sign, which cancels within one basis (P N) but not across
a refresh with kept moments.
"""
import io

import pytest
import torch
from torch import nn

from lowrank_kernels import GaLoreAdamW, quant

pytestmark = pytest.mark.gpu

OPTIONS = {
    "fira": dict(update="fira"),
    "frugal": dict(update="frugal", inactive_lr_scale=0.1),
    "apollo": dict(update="apollo", scale=1.0),
    "apollo-mini": dict(update="apollo-mini", rank=1, scale=16.0),
    "dct": dict(projector="dct"),
    "int8": dict(state_dtype="int8"),
    "dct-int8-fira": dict(projector="dct", state_dtype="int8", update="fira", proj_type="reverse_std"),
}


def _make(device, backend="auto", **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 300), nn.Tanh(), nn.Linear(300, 29)).to(device)
    weights = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    opt = GaLoreAdamW([{"params": others, "state_dtype": options.get("state_dtype")},
                       {"params": weights, "rank": 6, "update_proj_gap": 100, **options}],
                      lr=1e-2, weight_decay=0.01, backend=backend)
    return model, opt


def _train(model, opt, steps=6, device="cpu"):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 37, generator=g).to(device), torch.randn(16, 29, generator=g).to(device)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", OPTIONS)
def test_cuda_run_matches_the_cpu_run(name):
    cpu, opt = _make("cpu", **OPTIONS[name])
    _train(cpu, opt)
    gpu, gopt = _make("cuda", **OPTIONS[name])
    _train(gpu, gopt, device="cuda")
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        # fp32 on both; cuBLAS/cuSOLVER order their sums differently, and int8 codes may round differently
        # when a value sits on a midpoint, so a loose relative bound
        torch.testing.assert_close(b.cpu(), a, rtol=2e-3, atol=2e-5)


def test_int8_codes_are_the_same_on_cuda():
    x = torch.randn(5000) * torch.logspace(-6, 0, 5000)
    for signed, values in ((True, x), (False, x.square())):
        codes, absmax = quant.quantize(values, signed)
        gcodes, gabsmax = quant.quantize(values.cuda(), signed)
        assert torch.equal(gabsmax.cpu(), absmax)
        assert (gcodes.cpu() == codes).float().mean() > 0.999


def test_int8_codes_equal_bitsandbytes_cuda_kernel():
    F = pytest.importorskip("bitsandbytes.functional")
    x = (torch.randn(256 * 20 + 13) * 1e-2).cuda()
    for signed, values in ((True, x), (False, x.square())):
        code = F.create_dynamic_map(signed=signed).cuda()
        ref, state = F.quantize_blockwise(values, code=code, blocksize=256)
        codes, absmax = quant.quantize(values, signed)
        torch.testing.assert_close(absmax, state.absmax)
        # the CUDA kernel rounds at the same midpoints; its fast division may differ by an ulp there
        assert (ref == codes).float().mean() > 0.999


@pytest.mark.parametrize("projector", ["random", "dct"])
def test_fused_kernels_with_regenerated_bases_on_cuda(projector):
    ref, ropt = _make("cuda", backend="torch", projector=projector)
    _train(ref, ropt, device="cuda")
    fused, fopt = _make("cuda", backend="triton", projector=projector)
    _train(fused, fopt, device="cuda")
    for a, b in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["apollo", "dct-int8-fira"])
def test_cuda_checkpoint_resumes_bit_exactly(name):
    options = {**OPTIONS[name], "update_proj_gap": 3, "projector": OPTIONS[name].get("projector", "random")}
    full, opt = _make("cuda", **options)
    _train(full, opt, steps=8, device="cuda")
    first, opt1 = _make("cuda", **options)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 37, generator=g).cuda(), torch.randn(16, 29, generator=g).cuda()) for _ in range(8)]
    for x, y in batches[:4]:
        opt1.zero_grad()
        nn.functional.mse_loss(first(x), y).backward()
        opt1.step()
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    resumed, opt2 = _make("cuda", **options)
    resumed.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["optim"])
    for x, y in batches[4:]:
        opt2.zero_grad()
        nn.functional.mse_loss(resumed(x), y).backward()
        opt2.step()
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# ---- the update rules in the grouped whole-model kernels, compiled (tests/test_grouped_rules.py on CPU) -------
GROUPED_RULES = ["fira", "frugal", "apollo", "apollo-mini"]
# LLaMA-1B-like MLP and attention shapes (scaled down 2x): tall, wide and square; rank 128 spans rank tiles
REALISTIC = [(1024, 2752, 128), (2752, 1024, 128), (1024, 1024, 128)]


@pytest.mark.parametrize("rule", GROUPED_RULES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_grouped_rules_bf16_realistic_shapes(rule, side):
    """bf16 grouped steps with the limiter triggered and a refresh, against update_rules' reference; the CPU
    tests' bounds (test_grouped_rules.py's docstring)."""
    pytest.importorskip("triton")
    import test_grouped_rules as tgr
    probs, twins, start = tgr.run_rule(rule, side, torch.bfloat16, tgr.GROWTH["grow"], shapes=REALISTIC, steps=3)
    tgr.check_rule(rule, torch.bfloat16, probs, twins, start)


@pytest.mark.parametrize("rule", GROUPED_RULES + ["galore-full", "galore-int8"])
def test_grouped_rules_optimizer_cuda_graph_replay(rule):
    """GaLoreAdamW(backend="triton") with a rule, captured after two eager steps (the limiter flags settled):
    replays match eager steps of a twin optimizer (fp32: the same kernels, so equal up to the device's
    own nondeterminism, none here: no atomics)."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    shapes = [(256, 384), (384, 256)]
    rank = 1 if rule == "apollo-mini" else 16

    def make():
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(s, device="cuda") * 0.1) for s in shapes]
        options = {"galore-full": dict(update="galore", proj_type="full"),
                   "galore-int8": dict(update="galore", state_dtype="int8")}.get(rule, dict(update=rule))
        return ps, GaLoreAdamW([{"params": ps, "rank": rank, "update_proj_gap": 1000, **options}], lr=1e-3,
                               backend="triton")

    g = torch.Generator(device="cuda").manual_seed(1)
    grads = [[torch.randn(s, device="cuda", generator=g) for s in shapes] for _ in range(5)]
    ps_a, eager = make()
    ps_b, graphed = make()
    for t in range(5):
        for p, gr in zip(ps_a, grads[t]):
            p.grad = gr.clone()
        eager.step()
    static = [torch.zeros(s, device="cuda") for s in shapes]
    for p, s in zip(ps_b, static):
        p.grad = s
    for t in range(2):  # eager: the refresh step, then the step whose limiter flags flip
        for s, gr in zip(static, grads[t]):
            s.copy_(gr)
        graphed.step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        graphed.step()
    torch.cuda.current_stream().wait_stream(stream)
    for t in range(2, 5):
        for s, gr in zip(static, grads[t]):
            s.copy_(gr)
        graphed.replay(graph)
    torch.cuda.synchronize()
    for a, b in zip(ps_a, ps_b):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        assert graphed.state[b]["step"] == eager.state[a]["step"] == 5  # the capture itself counted nothing
