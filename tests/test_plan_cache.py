"""The step's plan cache (GaLoreAdamW._check_group / _plan_param): checks skipped while their inputs are
unchanged must run again as soon as anything they read changes, before anything mutates."""
import pytest
import torch

from lowrank_kernels import GaLoreAdamW
from lowrank_kernels.engine import _run_bucket_torch

from helpers import assert_unchanged, fresh_grads, snapshot, trained


def _refused(model, opt, error, match):
    fresh_grads(model)
    snap = snapshot(model, opt)
    with pytest.raises(error, match=match):
        opt.step()
    assert_unchanged(model, opt, snap)


def test_group_checks_are_skipped_only_while_the_group_is_unchanged(monkeypatch):
    model, opt = trained(steps=3, gap=2)
    calls = []
    import lowrank_kernels.optim as optim
    original = optim.check_hyperparameters
    monkeypatch.setattr(optim, "check_hyperparameters", lambda g: (calls.append(g), original(g)))
    fresh_grads(model)
    opt.step()
    assert calls == []  # nothing edited: the cached verdict stands (the test of the cache itself)
    opt.param_groups[1]["lr"] = 2e-2
    opt.step()
    assert calls == [opt.param_groups[1]]  # the edited group, and only it, is checked again
    opt.step()
    assert len(calls) == 1


@pytest.mark.parametrize("edit,match", [
    (lambda g: g["betas"].__setitem__(0, 1.5), "beta"),           # a list edited in place
    (lambda g: g.__setitem__("check_finite", 1), "check_finite"),  # 1 == True, but not a bool
    (lambda g: g.__setitem__("rank", 12), "rank=12 is too large"),
    (lambda g: g.__setitem__("proj_type", "sideways"), "proj_type"),
    (lambda g: g.__setitem__("rank_policy", "energy") or g.__setitem__("max_rank", 40), "rank=40 is too large"),
])
def test_a_group_edited_after_cached_steps_is_checked_again(edit, match):
    model, opt = trained(steps=3, gap=2)
    opt.param_groups[1].update(betas=[0.9, 0.999], check_finite=True)
    fresh_grads(model)
    opt.step()  # the list is now what the cache last saw
    edit(opt.param_groups[1])
    _refused(model, opt, ValueError, match)


def test_a_tensor_lr_is_checked_at_every_step():
    model, opt = trained(steps=3, gap=2)
    lr = torch.tensor(1e-2)
    opt.param_groups[1]["lr"] = lr
    fresh_grads(model)
    opt.step()
    lr.fill_(-1.0)  # the same object, a new value
    _refused(model, opt, ValueError, "learning rate")


def test_a_gradient_resized_in_place_after_cached_steps_is_refused():
    """The same gradient tensor as at the last step (zero_grad(set_to_none=False) keeps it), resized:
    the cache keys on its shape, not its identity."""
    model, opt = trained(steps=3, gap=2)
    fresh_grads(model)
    opt.step()
    grad = model.mid.weight.grad
    grad.data = torch.randn(49, 48)
    assert model.mid.weight.grad is grad
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"has shape \(49, 48\).*must match its parameter"):
        opt.step()
    assert_unchanged(model, opt, snap)


def test_a_parameter_gaining_and_losing_its_gradient():
    model, opt = trained(steps=3, gap=2)
    fresh_grads(model)
    model.out.weight.grad = None
    before = opt.state[model.out.weight]["step"]
    opt.step()
    assert opt.state[model.out.weight]["step"] == before
    fresh_grads(model)
    opt.step()
    assert opt.state[model.out.weight]["step"] == before + 1


def test_a_parameter_resized_after_cached_steps_is_refused():
    model, opt = trained(steps=3, gap=2)
    w = model.mid.weight
    w.data = torch.randn(40, 48)
    _refused(model, opt, RuntimeError, r"'exp_avg' has shape .*resized")


def test_a_state_entry_edited_after_cached_steps_is_checked_again():
    model, opt = trained(steps=3, gap=2)
    state = opt.state[model.mid.weight]
    state["exp_avg"] = torch.zeros(3, 3)
    _refused(model, opt, RuntimeError, "'exp_avg' has shape")
    del opt.state[model.mid.weight]  # the documented restart
    fresh_grads(model)
    opt.step()
    assert opt.state[model.mid.weight]["step"] == 1


def test_groups_added_or_loaded_after_cached_steps_are_checked():
    model, opt = trained(steps=3, gap=2)
    extra = torch.nn.Parameter(torch.randn(6, 5))
    opt.add_param_group({"params": [extra], "rank": 2})
    extra.grad = torch.randn(6, 5)
    fresh_grads(model)
    opt.step()
    assert opt.state[extra]["step"] == 1
    opt.load_state_dict(opt.state_dict())  # new group dicts: nothing cached for them yet
    opt.param_groups[2]["rank"] = 5
    extra.grad = torch.randn(6, 5)
    _refused(model, opt, ValueError, "rank=5 is too large")


def test_a_dtype_or_backend_edited_after_cached_steps_is_checked_again():
    pytest.importorskip("triton")
    model, opt = trained(steps=3, gap=2)
    model.norm.weight.data = model.norm.weight.data.double()
    fresh_grads(model)
    opt.step()  # float64 is fine on the reference (backend "auto" on CPU)
    assert opt.state[model.norm.weight]["exp_avg"].dtype == torch.float64
    opt.backend = "triton"  # (TRITON_INTERPRET=1 on CPU: tests/conftest.py)
    # the plan's message (naming the parameter), not the engine's later safety net
    _refused(model, opt, TypeError, r"parameter #\d+ \(shape \(48,\)\): backend='triton' .*float64")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_dtype", [None, "float32", "bfloat16"])
def test_cpu_foreach_scalars_round_as_the_reference(dtype, state_dtype):
    """The CPU host-mode bucket passes beta1, beta2, eps and scale as cached 0-dim float64 tensors; they
    must round exactly as the reference's Python floats, in every dtype of weights and moments."""
    def run(per_parameter):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in ((20, 13), (9, 31), (17,))]
        opt = GaLoreAdamW([{"params": ps[:2], "rank": 3, "update_proj_gap": 3, "state_dtype": state_dtype},
                           {"params": ps[2:], "state_dtype": state_dtype, "betas": (0.8, 0.95)}],
                          lr=0.01, weight_decay=0.1, eps=1e-3)
        opt._per_parameter_step = per_parameter
        for step in range(4):
            gen = torch.Generator().manual_seed(step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        return ps, opt

    (ref, ref_opt), (new, new_opt) = run(True), run(False)
    for a, b in zip(ref, new):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ref_opt.state[a][key], new_opt.state[b][key])


def test_the_bucket_runner_is_what_ran():
    """Guards the test above: the whole-model step really took the foreach bucket path."""
    import lowrank_kernels.engine as engine
    seen = []

    def spy(*args):
        seen.append(args[0])
        return _run_bucket_torch(*args)

    p = torch.nn.Parameter(torch.randn(8, 6))
    opt = GaLoreAdamW([{"params": [p], "rank": 2}])
    p.grad = torch.randn(8, 6)
    original, engine._run_bucket_torch = engine._run_bucket_torch, spy
    try:
        opt.step()
    finally:
        engine._run_bucket_torch = original
    assert seen == ["right"]


def test_the_caches_keep_no_reference_cycle():
    """`del opt` frees the optimizer (and its state) at once, without waiting for the cyclic GC: its caches
    must not point back at it (a parameter's label holds it weakly)."""
    import gc
    import weakref

    model, opt = trained()
    fresh_grads(model)
    opt.step()
    with pytest.raises(ValueError, match=r"parameter #\d+ \(shape"):  # the labels still name parameters
        opt.param_groups[1]["rank"] = 100
        fresh_grads(model)
        opt.step()
    owner = weakref.ref(opt)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del opt
        assert owner() is None
    finally:
        if enabled:
            gc.enable()
