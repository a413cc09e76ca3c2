"""The grouped kernels (kernels/grouped.py) against reference.galore_step, problem by problem.

Without CUDA these run under TRITON_INTERPRET=1 (conftest.py) on small odd shapes; the ``gpu`` tests
repeat them at larger shapes with the compiled kernels and capture a step in a CUDA graph.

Tolerances are test_kernels.py's (its helpers, whose docstring derives them): fp32 elementwise (rtol 1e-5,
atol 1e-6 x the tensor's largest magnitude: both sides round each operation once in fp32 and differ only
in the GEMMs' summation order); 16-bit norm-wise on W_T - W_0 (bf16 12%, fp16 3%) and on the moments (bf16
2%, fp16 0.3%), because the reference rounds to the low dtype after every operation and the kernels once
per stored value. The grouped kernels run per tile exactly the per-parameter kernels' math (the same device
helpers), so the same bounds hold; anything wrong in the tables (a swapped pointer, stride, problem or
scalar row) is an O(1) error.
"""
import pytest
import torch

pytest.importorskip("triton")

from lowrank_kernels import reference  # noqa: E402
from lowrank_kernels.kernels import grouped  # noqa: E402
from lowrank_kernels.kernels import grouped_backproject_update as gbu  # noqa: E402
from lowrank_kernels.kernels import grouped_project_adam as gpa  # noqa: E402
from lowrank_kernels.kernels import multi_tensor_adamw as mta  # noqa: E402
from test_kernels import assert_change_matches, assert_moment_matches, orthonormal, rel_err  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (m, n, rank, strided gradient, column-major basis, (beta1, beta2, eps), weight_decay): tall and wide,
# no extent a multiple of a block size; per-problem hyperparameters (one bucket spanning param groups),
# one problem without weight decay.
SMALL = [
    (37, 53, 3, False, False, (0.9, 0.999, 1e-6), 0.1),
    (64, 29, 5, True, True, (0.8, 0.99, 1e-5), 0.0),
    (23, 70, 7, False, True, (0.9, 0.999, 1e-6), 0.05),
    (41, 17, 4, True, False, (0.95, 0.98, 1e-6), 0.1),
]
STEPS = 3
LR = {torch.float32: 1e-2, torch.bfloat16: 1e-1, torch.float16: 1e-1}  # 16-bit: a step spans W's ulps


def make_problem(side, m, n, r, strided, column_major, hyper, dtype, moment_dtype, gen):
    """A projected problem and its reference twin (independent copies of every tensor)."""
    W = (torch.randn(m, n, generator=gen) * 0.02).to(DEVICE, dtype)
    basis = orthonormal(m if side == "left" else n, r, dtype, gen, column_major=column_major)
    low = (r, n) if side == "left" else (m, r)
    M = (torch.randn(low, generator=gen) * 0.1).to(DEVICE, moment_dtype)
    V = (torch.rand(low, generator=gen) * 0.01).to(DEVICE, moment_dtype)
    prob = dict(param=W, grad=gradient(m, n, strided, dtype, gen), basis=basis, exp_avg=M, exp_avg_sq=V,
                N=torch.empty(low, dtype=dtype, device=DEVICE), beta1=hyper[0], beta2=hyper[1], eps=hyper[2])
    twin = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in prob.items()}
    return prob, twin


def gradient(m, n, strided, dtype, gen):
    """m x n; ``strided``: a transposed view (non-contiguous) of an n x m tensor."""
    g = torch.randn(n, m, generator=gen).T if strided else torch.randn(m, n, generator=gen)
    g = g.to(DEVICE, dtype)
    return g.T.contiguous().T if strided else g.contiguous()


def reference_step(side, twin, grad, step_size, scale, lr, wd):
    P, Q = (twin["basis"], None) if side == "left" else (None, twin["basis"])
    reference.galore_step(twin["param"], grad, P, Q, twin["exp_avg"], twin["exp_avg_sq"], beta1=twin["beta1"],
                          beta2=twin["beta2"], eps=twin["eps"], step_size=step_size, scale=scale, lr=lr,
                          weight_decay=wd)


def run_projected(side, dtype, moment_dtype, spec=SMALL, steps=STEPS, seed=0):
    """STEPS steps of one bucket; each step new gradients (new tensors) and new step sizes, written in place
    into the same scalars tensor. Returns the problems, their reference twins and the start weights."""
    gen = torch.Generator().manual_seed(seed)
    pairs = [make_problem(side, m, n, r, s, cm, h, dtype, moment_dtype, gen) for m, n, r, s, cm, h, _ in spec]
    probs, twins = [p for p, _ in pairs], [t for _, t in pairs]
    start = [p["param"].clone() for p in probs]
    tables = grouped.build_projected_tables(probs, side)
    scalars = torch.zeros(len(spec), 4, device=DEVICE)
    scale, lr = 0.25, LR[dtype]
    for t in range(1, steps + 1):
        if t > 1:  # fresh gradient tensors, as zero_grad(set_to_none=True) gives
            grads = [gradient(m, n, s, dtype, gen) for m, n, _, s, _, _, _ in spec]
        else:
            grads = [p["grad"] for p in probs]
        lr_t = lr / t  # a schedule: the step size changes every step
        sizes = [reference.adam_step_size(lr_t, p["beta1"], p["beta2"], t) for p in probs]
        scalars.copy_(torch.tensor([[s, scale, lr_t * wd, 0.0] for s, (*_, wd) in zip(sizes, spec)]))
        grouped.grouped_projected_step(tables, scalars, grads=grads)
        for twin, g, size, (*_, wd) in zip(twins, grads, sizes, spec):
            reference_step(side, twin, g, size, scale, lr_t, wd)
    return probs, twins, start


def check(probs, twins, start, grad_dtype, labels):
    for label, p, twin, w0 in zip(labels, probs, twins, start):
        moved = rel_err(twin["param"], w0)
        assert moved > 0.01, f"{label}: the reference barely moved the weight ({moved:.3g}); vacuous test"
        assert_change_matches(p["param"], twin["param"], w0, f"{label}: W")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_moment_matches(p[key], twin[key], f"{label}: {key}", grad_dtype)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype,moment_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),  # fp32 moments of a bf16 weight
], ids=["fp32", "bf16", "fp16", "bf16-fp32moments"])
def test_grouped_projected_step_matches_reference(side, dtype, moment_dtype):
    probs, twins, start = run_projected(side, dtype, moment_dtype)
    check(probs, twins, start, dtype, [f"{side} {m}x{n} r={r}" for m, n, r, *_ in SMALL])


def test_grouped_projected_step_with_step_keywords_and_strided_weight():
    """beta1/beta2/eps given to the step instead of per problem; W a column slice of a wider tensor."""
    gen = torch.Generator().manual_seed(7)
    probs, twins, around = [], [], []
    for m, n, r in ((29, 45, 6), (50, 33, 2)):
        prob, twin = make_problem("right", m, n, r, False, False, (0.9, 0.999, 1e-6), torch.float32,
                                  torch.float32, gen)
        full = (torch.randn(m, n + 3, generator=gen) * 0.02).to(DEVICE)
        prob["param"], twin["param"] = full[:, 1:n + 1], full[:, 1:n + 1].clone()
        for p in (prob,):
            for k in ("beta1", "beta2", "eps"):
                del p[k]
        probs.append(prob), twins.append(twin), around.append((full, full.clone()))
    start = [t["param"].clone() for t in twins]
    tables = grouped.build_projected_tables(probs, "right")
    assert tables.kernels["backproject_update"].meta["W_LAYOUT"] == 1
    scalars = torch.tensor([[0.05, 0.5, 0.01, 0.0], [0.02, 0.5, 0.0, 0.0]], device=DEVICE)
    grouped.grouped_projected_step(tables, scalars, beta1=0.9, beta2=0.999, eps=1e-6)
    for twin, (size, scale, decay, _) in zip(twins, scalars.tolist()):
        reference_step("right", twin, twin["grad"], size, scale, decay / 0.1, 0.1 if decay else 0.0)
    check(probs, twins, start, torch.float32, ["29x45", "50x33"])
    for (full, before), n in zip(around, (45, 33)):  # the columns around each view are untouched
        assert torch.equal(full[:, 0], before[:, 0]) and torch.equal(full[:, n + 1:], before[:, n + 1:])


# Every extent a multiple of 8 but the third problem's n: the launches promise the compiler (DIMS8) the
# multiples of 8 on the other axes only.
ALIGNED8 = [
    (48, 40, 8, False, False, (0.9, 0.999, 1e-6), 0.1),
    (24, 64, 16, True, True, (0.8, 0.99, 1e-5), 0.0),
    (32, 37, 8, False, True, (0.9, 0.999, 1e-6), 0.05),
]


@pytest.mark.parametrize("side", ["left", "right"])
def test_dims_hint_covers_only_the_axes_every_problem_aligns(side):
    """DIMS8 tells the compiled kernels which of I, J, K are multiples of 8 (so their bounds masks keep the
    loads vectorised and the K loop pipelined on a GPU); a wrong bit would let a vector load cross a bound,
    so it is set only where every problem of the launch agrees. The hinted kernels match the reference."""
    gen = torch.Generator().manual_seed(5)
    probs = [make_problem(side, m, n, r, s, cm, h, torch.float32, torch.float32, gen)[0]
             for m, n, r, s, cm, h, _ in ALIGNED8]
    tables = grouped.build_projected_tables(probs, side)
    # (a): (I, J, K) = (r, n, m) left, (m, r, n) right; (b): (m, n, r); bits 1, 2, 4 = I, J, K; n = 37 misses
    assert tables.kernels["project_adam"].meta["DIMS8"] == (1 | 4 if side == "left" else 1 | 2)
    assert tables.kernels["backproject_update"].meta["DIMS8"] == 1 | 4
    assert grouped.build_projected_tables(probs[:2], side).kernels["project_adam"].meta["DIMS8"] == 7
    for spec in (ALIGNED8[:2], ALIGNED8):  # every hint, then a partial one
        probs, twins, start = run_projected(side, torch.float32, torch.float32, spec=spec, steps=2)
        check(probs, twins, start, torch.float32, [f"{side} {m}x{n} r={r}" for m, n, r, *_ in spec])


ADAMW_SHAPES = [(1030,), (37, 29), (5,), (13, 7)]  # 1030: two 1024-element blocks, the second ragged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_multi_tensor_adamw_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    probs, twins, wds = [], [], [0.1, 0.0, 0.1, 0.05]
    hypers = [(0.9, 0.999, 1e-6), (0.9, 0.999, 1e-6), (0.8, 0.99, 1e-5), (0.9, 0.95, 1e-6)]
    for i, shape in enumerate(ADAMW_SHAPES):
        W = (torch.randn(shape, generator=gen) * 0.02).to(DEVICE, dtype)
        if i == 3:  # a transposed (dense, non-contiguous) parameter: moments and grads share its layout
            W = W.T.contiguous().T
        prob = dict(param=W, grad=torch.empty_like(W), exp_avg=torch.zeros_like(W), exp_avg_sq=torch.zeros_like(W),
                    beta1=hypers[i][0], beta2=hypers[i][1], eps=hypers[i][2])
        probs.append(prob)
        twins.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in prob.items()})
    start = [p["param"].clone() for p in probs]
    tables = grouped.build_adamw_tables(probs)
    scalars = torch.zeros(len(probs), 4, device=DEVICE)
    for t in range(1, STEPS + 1):
        grads = []
        for p in probs:
            values = torch.randn(p["param"].shape, generator=gen)
            if t == 1:
                values.view(-1)[:4] = 1e-3  # fp16: V underflows to 0, so N = M / eps; both must agree
            grads.append(torch.empty_like(p["param"]).copy_(values))  # in the parameter's layout
        lr = LR[dtype] / t
        sizes = [reference.adam_step_size(lr, p["beta1"], p["beta2"], t) for p in probs]
        scalars.copy_(torch.tensor([[s, 1.0, lr * wd, 0.0] for s, wd in zip(sizes, wds)]))
        grouped.grouped_adamw_step(tables, scalars, grads=grads)
        for twin, g, size, wd in zip(twins, grads, sizes, wds):
            reference.galore_step(twin["param"], g, None, None, twin["exp_avg"], twin["exp_avg_sq"],
                                  beta1=twin["beta1"], beta2=twin["beta2"], eps=twin["eps"], step_size=size,
                                  scale=1.0, lr=lr, weight_decay=wd)
    assert probs[3]["param"].stride() == start[3].stride()
    check(probs, twins, start, dtype, [str(s) for s in ADAMW_SHAPES])


# ---- one launch per kernel and bucket, no host synchronisation ------------------------------------------
class LaunchCounter:
    """Counts launches of every triton kernel (compiled or interpreted) by kernel name."""

    def __init__(self, monkeypatch):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
        self.counts = {}
        for cls in (JITFunction, InterpretedFunction):
            original = cls.run

            def run(kernel, *args, _original=original, **kwargs):
                name = kernel.fn.__name__
                self.counts[name] = self.counts.get(name, 0) + 1
                return _original(kernel, *args, **kwargs)
            monkeypatch.setattr(cls, "run", run)


def ordinary_launches(monkeypatch, build, depths) -> dict:
    """{depth: {kernel name: launches}} of one ordinary ``opt.step()`` of ``build(depth)``'s (model,
    optimizer), whose grouped tables must be found cached (no rebuild)."""
    counts = {}
    for depth in depths:
        _, opt = build(depth)
        builds = opt._engine().table_builds
        counter = LaunchCounter(monkeypatch)
        opt.step()
        monkeypatch.undo()
        counts[depth] = counter.counts
        assert opt._engine().table_builds == builds  # cached across the ordinary step
    return counts


GROUPED_KERNELS = {gpa._grouped_project_adam_kernel.fn.__name__, gbu._grouped_backproject_update_kernel.fn.__name__,
                   mta._multi_tensor_adamw_kernel.fn.__name__}


def buckets(spec, dtype, gen):
    """A left bucket, a right bucket and an AdamW bucket from ``spec``."""
    left = [make_problem("left", m, n, r, s, cm, h, dtype, dtype, gen)[0] for m, n, r, s, cm, h, _ in spec]
    right = [make_problem("right", m, n, r, s, cm, h, dtype, dtype, gen)[0] for m, n, r, s, cm, h, _ in spec]
    plain = [dict(param=torch.zeros(k + 3, device=DEVICE, dtype=dtype), beta1=0.9, beta2=0.999, eps=1e-6)
             for k in range(len(spec))]
    for p in plain:
        p.update(grad=torch.ones_like(p["param"]), exp_avg=torch.zeros_like(p["param"]),
                 exp_avg_sq=torch.zeros_like(p["param"]))
    return [grouped.build_projected_tables(left, "left"), grouped.build_projected_tables(right, "right"),
            grouped.build_adamw_tables(plain)]


def step_all(tables):
    for t in tables:
        scalars = torch.full((t.num_problems, 4), 0.01, device=DEVICE)
        step = grouped.grouped_projected_step if t.kind == "projected" else grouped.grouped_adamw_step
        step(t, scalars)


def assert_one_launch_per_kernel_and_bucket(monkeypatch, spec, dtype):
    gen = torch.Generator().manual_seed(4)
    for count in (1, len(spec)):  # the number of launches does not depend on the number of problems
        tables = buckets(spec[:count], dtype, gen)
        counter = LaunchCounter(monkeypatch)
        step_all(tables)
        monkeypatch.undo()
        expected = {gpa._grouped_project_adam_kernel.fn.__name__: 2,  # a left and a right bucket
                    gbu._grouped_backproject_update_kernel.fn.__name__: 2,
                    mta._multi_tensor_adamw_kernel.fn.__name__: 1}
        assert counter.counts == expected, f"{count} problems per bucket: launches {counter.counts}"


def test_one_launch_per_kernel_and_bucket(monkeypatch):
    assert_one_launch_per_kernel_and_bucket(monkeypatch, SMALL, torch.float32)


def test_launch_path_never_synchronises():
    """No .item()/.cpu()/bool(tensor) while stepping: a dispatch mode sees no _local_scalar_dense (the op
    every device-to-host scalar read goes through), nor any copy to the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bad = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._local_scalar_dense.default:
                self.bad.append(str(func))
            inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            if (isinstance(out, torch.Tensor) and out.device.type == "cpu"
                    and any(a.device.type != "cpu" for a in inputs)):  # a device -> host copy
                self.bad.append(str(func))
            return out

    gen = torch.Generator().manual_seed(5)
    tables = buckets(SMALL[:2], torch.float32, gen)
    scalars = [torch.full((t.num_problems, 4), 0.01, device=DEVICE) for t in tables]
    grads = [[p["grad"].clone() for p in t.problems] for t in tables]  # moved gradients: tables refreshed
    with Watch() as watch:
        for t, s, g in zip(tables, scalars, grads):
            step = grouped.grouped_projected_step if t.kind == "projected" else grouped.grouped_adamw_step
            step(t, s, grads=g)
            step(t, s, grads=g)  # unchanged gradients: nothing to refresh
    assert not watch.bad, watch.bad


# ---- tables: signature, errors ---------------------------------------------------------------------------
def test_signature_tracks_reallocation_and_grads_refresh_only_when_moved():
    gen = torch.Generator().manual_seed(6)
    probs = [make_problem("left", m, n, r, s, cm, h, torch.float32, torch.float32, gen)[0]
             for m, n, r, s, cm, h, _ in SMALL[:2]]
    tables = grouped.build_projected_tables(probs, "left")
    assert tables.matches(probs)
    assert not tables.update_grads([p["grad"] for p in probs])  # same tensors: no copy
    assert tables.update_grads([p["grad"].clone() for p in probs])
    moved = [dict(p) for p in probs]
    moved[1]["exp_avg"] = moved[1]["exp_avg"].clone()  # a refresh reallocated a moment
    assert not tables.matches(moved)
    assert tables.matches([dict(p, grad=p["grad"].clone()) for p in probs])  # gradients are not part of it


def test_grouped_errors_are_raised_before_anything_changes():
    gen = torch.Generator().manual_seed(8)
    probs = [make_problem("left", m, n, r, s, cm, h, torch.float32, torch.float32, gen)[0]
             for m, n, r, s, cm, h, _ in SMALL[:2]]
    before = [{k: v.clone() for k, v in p.items() if isinstance(v, torch.Tensor)} for p in probs]
    with pytest.raises(ValueError, match="side must be 'left' or 'right'"):
        grouped.build_projected_tables(probs, "full")
    with pytest.raises(ValueError, match=r"problem 0: basis has shape \(37, 3\), expected \(53, 3\)"):
        grouped.build_projected_tables(probs, "right")
    with pytest.raises(TypeError, match="share one dtype"):
        grouped.build_projected_tables([probs[0], dict(probs[1], exp_avg=probs[1]["exp_avg"].double())], "left")
    with pytest.raises(ValueError, match="lacks tensor"):
        grouped.build_projected_tables([dict(probs[0], N=None)], "left")
    with pytest.raises(ValueError, match="for every problem or for none"):
        grouped.build_projected_tables([probs[0], {k: v for k, v in probs[1].items() if k != "eps"}], "left")
    tables = grouped.build_projected_tables(probs, "left")
    with pytest.raises(ValueError, match=r"scalars must be a contiguous float32 tensor of shape \(2, 4\)"):
        grouped.grouped_projected_step(tables, torch.zeros(2, 2, device=DEVICE))
    with pytest.raises(ValueError, match="do not pass them"):
        grouped.grouped_projected_step(tables, torch.zeros(2, 4, device=DEVICE), beta1=0.9, beta2=0.9, eps=1e-8)
    with pytest.raises(ValueError, match="new gradient"):
        grouped.grouped_projected_step(tables, torch.zeros(2, 4, device=DEVICE),
                                       grads=[probs[0]["grad"], probs[0]["grad"]])
    with pytest.raises(TypeError, match="build_adamw_tables"):
        grouped.grouped_adamw_step(tables, torch.zeros(2, 4, device=DEVICE))
    W = torch.zeros(6, 4, device=DEVICE)
    with pytest.raises(ValueError, match="one dense layout"):
        grouped.build_adamw_tables([dict(param=W, grad=W.T.contiguous().T, exp_avg=W.clone(), exp_avg_sq=W.clone())])
    for p, b in zip(probs, before):
        assert all(torch.equal(p[k], v) for k, v in b.items())
    empty = grouped.build_projected_tables([], "left")
    grouped.grouped_projected_step(empty, torch.zeros(0, 4, device=DEVICE), beta1=0.9, beta2=0.9, eps=1e-8)


# ---- GPU: larger shapes, launch count, CUDA graph --------------------------------------------------------
LARGE = [
    (512, 1376, 128, False, False, (0.9, 0.999, 1e-4), 0.1),
    (1376, 512, 64, True, False, (0.9, 0.999, 1e-4), 0.0),
    (768, 768, 96, False, True, (0.8, 0.99, 1e-4), 0.05),
    (250, 1000, 40, False, False, (0.9, 0.999, 1e-4), 0.1),  # unaligned (250 % 8 != 0): unhinted variant
]


@pytest.mark.gpu
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_projected_step_on_gpu(side, dtype):
    # eps 1e-4: with thousands of entries, some R entries lie within eps of 0 where N's slope is 0.1 / eps
    # and the summation order decides N (see test_kernels.test_llama_shapes_on_gpu).
    probs, twins, start = run_projected(side, dtype, dtype, spec=LARGE)
    check(probs, twins, start, dtype, [f"{side} {m}x{n} r={r}" for m, n, r, *_ in LARGE])


@pytest.mark.gpu
@pytest.mark.parametrize("side", ["left", "right"])
def test_fully_hinted_grouped_step_on_gpu(side):
    """Every extent a multiple of 8 (DIMS8 = 7: vectorised, pipelined loads), none a multiple of the tiles:
    the hinted masks must still stop exactly at each edge (LARGE's 250 x 1000 problem leaves one axis
    unhinted, so this is the only GPU test of the full hint)."""
    probs = [make_problem(side, m, n, r, s, cm, h, torch.bfloat16, torch.bfloat16, torch.Generator())[0]
             for m, n, r, s, cm, h, _ in LARGE[:3]]
    assert all(t.meta["DIMS8"] == 7 for t in grouped.build_projected_tables(probs, side).kernels.values())
    probs, twins, start = run_projected(side, torch.bfloat16, torch.bfloat16, spec=LARGE[:3])
    check(probs, twins, start, torch.bfloat16, [f"{side} {m}x{n} r={r}" for m, n, r, *_ in LARGE[:3]])


@pytest.mark.gpu
def test_one_launch_per_kernel_and_bucket_on_gpu(monkeypatch):
    assert_one_launch_per_kernel_and_bucket(monkeypatch, LARGE, torch.bfloat16)


@pytest.mark.gpu
def test_grouped_step_replays_in_a_cuda_graph():
    """Capture one step of each bucket, replay it with new step scalars (written in place): the replay
    matches the reference with the new values."""
    gen = torch.Generator().manual_seed(9)
    pairs = [make_problem("left", m, n, r, s, cm, h, torch.float32, torch.float32, gen) for m, n, r, s, cm, h, _
             in LARGE]
    probs, twins = [p for p, _ in pairs], [t for _, t in pairs]
    tables = grouped.build_projected_tables(probs, "left")
    scalars = torch.zeros(len(probs), 4, device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles outside the capture; zero step sizes change no W
        grouped.grouped_projected_step(tables, scalars)
    torch.cuda.current_stream().wait_stream(stream)
    for p, twin in zip(probs, twins):  # the warm-up moved the moments: start the reference from there
        twin["exp_avg"].copy_(p["exp_avg"]), twin["exp_avg_sq"].copy_(p["exp_avg_sq"])
        twin["param"].copy_(p["param"])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grouped.grouped_projected_step(tables, scalars)
    start = [p["param"].clone() for p in probs]
    for t in (2, 3):
        sizes = [reference.adam_step_size(1e-2 / t, p["beta1"], p["beta2"], t) for p in probs]
        scalars.copy_(torch.tensor([[s, 0.25, 1e-2 / t * wd, 0.0] for s, (*_, wd) in zip(sizes, LARGE)]))
        graph.replay()
        for twin, size, (*_, wd) in zip(twins, sizes, LARGE):
            reference_step("left", twin, twin["grad"], size, 0.25, 1e-2 / t, wd)
    torch.cuda.synchronize()
    check(probs, twins, start, torch.float32, [f"{m}x{n}" for m, n, *_ in LARGE])


def test_aligned_hint_checks_the_loaded_strides_not_the_unit_one():
    """ALIGNED (tl.multiple_of hints on addresses and strides) holds for ordinary dense operands, in either
    layout, and is refused for an odd address, a stride that is not a multiple of 8, or an R buffer (read
    with N's strides) at an odd address. (Under the interpreter the hint changes nothing, so a wrong promise
    would only show on a GPU, as a misaligned access or wrong numbers: hence this test of the host rule.)"""
    from lowrank_kernels.kernels._tables import Operand, launch_layouts
    base = torch.empty(64 * 128 + 8, dtype=torch.bfloat16)
    W = base[:64 * 128].view(64, 128)
    assert launch_layouts({"W": [Operand.of(W)]})["ALIGNED"]                      # row-major: layout 1
    assert launch_layouts({"W": [Operand.of(W.T)]})["ALIGNED"]                    # column-major: layout 2
    assert launch_layouts({"W": [Operand.of(W, transposed=True)]})["ALIGNED"]
    assert not launch_layouts({"W": [Operand.of(base[1:1 + 64 * 128].view(64, 128))]})["ALIGNED"]
    odd = torch.empty(64, 129, dtype=torch.bfloat16)
    assert not launch_layouts({"W": [Operand.of(odd)]})["ALIGNED"]                # row stride 129
    assert not launch_layouts({"W": [Operand.of(W)]}, also=[base[1:9]])["ALIGNED"]
