"""torch's own optimizer test suite applied to GaLoreAdamW.

torch tests its optimizers with ``TestOptimRenewed`` (pytorch's test/test_optim.py), driven by one
``OptimizerInfo`` per optimizer from torch/testing/_internal/common_optimizers.py. test_optim.py is not in
the wheel, so its applicable checks are ported here, one test per torch test (named in each docstring), and
driven the way torch drives them: by an ``OptimizerInfo`` for GaLoreAdamW built from torch's own AdamW
inputs (``optim_inputs_func_adamw``) and error inputs (``optim_error_inputs_func_adamw``), torch's
``_get_optim_inputs_including_global_cliquey_kwargs`` and ``TensorTracker``. Each AdamW input runs as a plain
AdamW group and with ``rank`` (the 13x9-style weights projected at rank 3, refreshed every 2 steps), on
backend "torch" and "triton" (the Triton interpreter on CPU). torch's 10x5 weights become 13x9 here, so that
rank 3 projects them.

Where GaLoreAdamW departs from torch.optim on purpose (no maximize/amsgrad/foreach/fused/differentiable/
capturable, no complex parameters, tensors only for lr, Python-int steps, full-state validation on load),
the test asserts the documented behaviour (README, "Use" and "Errors").

Already covered elsewhere and not repeated: deepcopy/pickle of every public attribute and zero_grad
(set_to_none True and False) in tests/test_optim_conventions.py and tests/test_audit_conventions.py.
"""
import copy
import functools
import gc
import io
from collections.abc import Iterable

import pytest
import torch
from torch import nn
from torch.nn import Parameter
from torch.optim import SGD
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from lowrank_kernels import GaLoreAdamW
from lowrank_kernels.projection import PROJECTED_DEFAULTS, matrix_shape

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (in the `test` extra)")
_FLAGS_WERE_FROZEN = torch.backends.flags_frozen()
from torch.testing._internal.common_optimizers import (  # noqa: E402
    ErrorOptimizerInput, OptimizerErrorEnum, OptimizerInfo, OptimizerInput, TensorTracker,
    _get_optim_inputs_including_global_cliquey_kwargs, optim_error_inputs_func_adamw, optim_inputs_func_adamw)

if not _FLAGS_WERE_FROZEN:
    # torch's common_utils calls torch.backends.disable_global_flags() on import (torch's own test
    # processes only); undo it so that this module leaves the other test modules' process as it found it.
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

BACKENDS = ("torch", "triton")
PROJECTED = dict(rank=3, update_proj_gap=2)  # 13x9 and 9x13 weights projected at rank 3, refreshes at 0, 2, 4, ...
GROUP_KEYS = ("rank", "state_dtype", *PROJECTED_DEFAULTS)  # GaLore's group keys, routed into the groups by `build`
# torch.optim's flags GaLoreAdamW does not take (its constructor is galore-torch's plus backend, seed,
# check_finite): as constructor arguments they are a TypeError; as group keys only False passes.
TORCH_FLAGS = ("maximize", "amsgrad", "foreach", "fused", "differentiable", "capturable")
DEVICE, DTYPE = "cpu", torch.float32


def _needs_triton(kwargs):
    if kwargs.get("backend") == "triton":
        pytest.importorskip("triton")


def build(params, **kwargs):
    """``optim_cls(params, **kwargs)`` as torch's tests call it, with GaLore's group keys allowed in
    ``kwargs`` or in a group: each matrix (2+ dimensions, both sides of its matrix shape > 1) gets them,
    every other parameter (biases, norms, 0-D, 5x1) stays in a plain AdamW group with the same other keys
    (galore_param_groups' rule). A rank too large for a matrix is left for GaLoreAdamW to refuse.
    ``backend`` is a constructor argument wherever it is given."""
    backend = kwargs.pop("backend", "auto")
    if not isinstance(params, (list, tuple)) or not params:  # a tensor, None, a generator: as torch passes it
        if "rank" not in kwargs or not isinstance(params, Iterable) or isinstance(params, torch.Tensor):
            return GaLoreAdamW(params, backend=backend, **kwargs)
        params = list(params)
    groups = list(params)
    if isinstance(groups[0], dict):
        groups = [dict(g) for g in groups]
        for g in groups:
            backend = g.pop("backend", backend)
    else:
        groups = [{"params": groups}]
    shared = {k: kwargs.pop(k) for k in list(kwargs) if k in GROUP_KEYS}
    out = []
    for g in groups:
        keys = {**shared, **{k: g.pop(k) for k in list(g) if k in GROUP_KEYS}}
        items = g.pop("params")
        items = [items] if isinstance(items, torch.Tensor) else list(items)
        if "rank" not in keys:
            out.append({"params": items, **g})
            continue

        def fits(item):
            p = item[1] if isinstance(item, tuple) else item
            return p.dim() >= 2 and min(matrix_shape(p.shape)) > 1
        for chosen, extra in (([i for i in items if fits(i)], keys), ([i for i in items if not fits(i)], {})):
            if chosen:
                out.append({"params": chosen, **g, **extra})
    return GaLoreAdamW(out, backend=backend, **kwargs)


build.__name__ = "GaLoreAdamW"  # OptimizerInfo.name


def optim_inputs_func_galore(device, dtype=None):
    """torch's AdamW inputs that GaLoreAdamW takes (not maximize, amsgrad: test_torch_flags_are_refused), a
    tensor lr (torch's MPS input), each as plain AdamW and with rank 3, on both backends."""
    inputs = [i for i in optim_inputs_func_adamw(device, dtype) if not set(i.kwargs) & set(TORCH_FLAGS)]
    inputs.append(OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.01)}, desc="Tensor lr"))
    out = []
    for backend in BACKENDS:
        for base in inputs:
            for extra, what in (({}, "plain"), (PROJECTED, "rank 3")):
                kwargs = {**copy.deepcopy(base.kwargs), **extra, "backend": backend}
                out.append(OptimizerInput(params=None, kwargs=kwargs, desc=f"{base.desc}, {what}, {backend}"))
    return out


def optim_error_inputs_func_galore(device, dtype):
    """torch's AdamW error inputs, and GaLore's own (bad eps, lr, rank, a torch flag in a group, complex)."""
    param = Parameter(torch.randn(13, 9, device=device, dtype=dtype))
    complex_param = Parameter(torch.randn(13, 9, device=device, dtype=torch.complex64))
    complex_param.grad = torch.randn_like(complex_param)
    ours = [
        (dict(lr=-1e-3), ValueError, "Invalid learning rate: -0.001"),
        (dict(lr=float("nan")), ValueError, "Invalid learning rate: nan"),
        (dict(eps=-1.0), ValueError, "Invalid epsilon value: -1.0"),
        (dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1: 1.0"),
        (dict(betas=(0.9,)), ValueError, "Invalid betas"),
        (dict(weight_decay=float("inf")), ValueError, "Invalid weight_decay value: inf"),
    ]
    inputs = [ErrorOptimizerInput(OptimizerInput(params=None, kwargs=kw, desc=regex), error_type=err, error_regex=regex)
              for kw, err, regex in ours]
    inputs += [
        ErrorOptimizerInput(OptimizerInput(params=[{"params": [param], "rank": 9}], kwargs={}, desc="rank too large"),
                            error_type=ValueError, error_regex="rank"),
        ErrorOptimizerInput(OptimizerInput(params=[{"params": [param], "maximize": True}], kwargs={},
                                           desc="maximize in a group"),
                            error_type=ValueError, error_regex="Invalid maximize: True"),
        ErrorOptimizerInput(OptimizerInput(params=[{"params": [complex_param], "rank": 3}], kwargs={},
                                           desc="complex weight in a projected group"),
                            error_type=ValueError, error_regex="complex"),
        ErrorOptimizerInput(OptimizerInput(params=[complex_param], kwargs={}, desc="complex parameter, plain group"),
                            error_on=OptimizerErrorEnum.STEP_ERROR, error_type=RuntimeError,
                            error_regex="does not support complex gradients"),
    ]
    return optim_error_inputs_func_adamw(device, dtype) + inputs


GALORE_INFO = OptimizerInfo(
    build,
    optim_inputs_func=optim_inputs_func_galore,
    optim_error_inputs_func=optim_error_inputs_func_galore,
    supported_impls=(),  # no foreach / fused / differentiable flags
    not_og_supported_flags=(),
    supports_complex=False,
    supports_sparse=False,
    has_capturable_arg=False,
    supports_fused_on=(),
)
# torch's error inputs that GaLoreAdamW answers differently on purpose: desc -> (error type, regex)
ERROR_DEPARTURES = {
    "lr as Tensor doesn't work with foreach & not capturable": (TypeError, "unexpected keyword argument 'foreach'"),
    r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True":
        (TypeError, "unexpected keyword argument 'foreach'"),
    "betas must be either both floats or both Tensors": (ValueError, "must be a Python number; only lr may be a tensor"),
}


def all_inputs(**where):
    """The OptimizerInfo's inputs (with the cliquey flags torch adds: none here), filtered by kwargs value."""
    inputs = _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, DTYPE, GALORE_INFO)
    return [i for i in inputs if all(i.kwargs.get(k, None if k != "backend" else "auto") in v
                                      for k, v in where.items())]


def ids(inputs):
    return [i.desc for i in inputs]


INPUTS = all_inputs()
TORCH_INPUTS = all_inputs(backend=("torch",))
# The Triton interpreter is slow: the longer loops run these triton inputs (default and weight decay)
LIGHT = all_inputs(backend=("torch",)) + [i for i in all_inputs(backend=("triton",))
                                          if i.desc.split(",")[0] in ("default", "nonzero weight_decay")]


class _Asserts:
    """The TestCase methods torch's TensorTracker calls; equality is exact unless told otherwise."""

    def assertGreater(self, a, b, msg=None):
        assert a > b, msg

    def assertTrue(self, x, msg=None):
        assert x, msg

    def assertEqual(self, a, b, **kwargs):
        torch.testing.assert_close(a, b, **{"rtol": 0, "atol": 0, **kwargs})


def weight_bias_input(contiguous=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        weight = Parameter(torch.randn(13, 9, generator=g))
        bias = Parameter(torch.randn(13, generator=g))
    else:
        weight = Parameter(torch.randn(13, 9, 2, generator=g)[..., 0])
        bias = Parameter(torch.randn(13, 2, generator=g)[..., 0])
    return weight, bias, torch.randn(9, generator=g)


def loss_of(weight, bias, x):
    return (weight.mv(x) + bias).pow(2).sum()


def same(a, b):
    """Exactly equal nested state dicts / lists / tensors (dtype included)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


# ---- construction and errors ----------------------------------------------------------------------------
def test_importing_torchs_test_helpers_leaves_backend_flags_as_they_were():
    """common_utils freezes torch.backends flags on import; the rest of the test process must not see it."""
    assert torch.backends.flags_frozen() == _FLAGS_WERE_FROZEN


def test_optim_infos_do_not_specify_global_cliquey_kwargs():
    """TestOptimRenewed.test_optim_infos_do_not_specify_global_cliquey_kwargs, on our OptimizerInfo; and
    every torch AdamW input we run is there (all but maximize and amsgrad), on both backends."""
    inputs = GALORE_INFO.optim_inputs_func(device=DEVICE)
    assert not any(f in i.kwargs for i in inputs for f in ("foreach", "fused", "differentiable"))
    torch_descs = {i.desc for i in optim_inputs_func_adamw(DEVICE)} - {"maximize", "amsgrad"}
    assert {i.desc.split(",")[0] for i in inputs} == torch_descs | {"Tensor lr"}
    assert len(INPUTS) == len(inputs) == 2 * 2 * (len(torch_descs) + 1)


def test_errors():
    """TestOptimRenewed.test_errors: torch's AdamW error inputs (and ours) raise the type and message torch
    expects, except ERROR_DEPARTURES (documented: no foreach, tensors only for lr). The hyperparameters are
    checked before params, as torch does (its inputs pass params=None)."""
    inputs = GALORE_INFO.optim_error_inputs_func(device=DEVICE, dtype=DTYPE)
    descs = {e.optimizer_error_input.desc for e in inputs}
    assert set(ERROR_DEPARTURES) <= descs  # the departures name torch inputs that exist
    for error_input in inputs:
        optim_input = error_input.optimizer_error_input
        params, kwargs = optim_input.params, optim_input.kwargs
        error_type, regex = ERROR_DEPARTURES.get(optim_input.desc, (error_input.error_type, error_input.error_regex))
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            if issubclass(error_type, Warning):
                with pytest.warns(error_type, match=regex):
                    GALORE_INFO.optim_cls(params, **kwargs)
            else:
                with pytest.raises(error_type, match=regex):
                    GALORE_INFO.optim_cls(params, **kwargs)
        else:
            optim = GALORE_INFO.optim_cls(params, **kwargs)
            before = [p.detach().clone() for g in optim.param_groups for p in g["params"]]
            with pytest.raises(error_type, match=regex):
                optim.step()
            after = [p for g in optim.param_groups for p in g["params"]]
            assert same(before, [p.detach() for p in after]) and not optim.state


@pytest.mark.parametrize("flag", TORCH_FLAGS)
def test_torch_flags_are_refused(flag):
    """torch's AdamW inputs maximize / amsgrad and the global flags (test_foreach_matches_forloop,
    test_fused_matches_forloop, differentiable, capturable) have no GaLoreAdamW counterpart: a constructor
    argument is Python's TypeError; in a param group (where torch.optim reads them) True is refused at
    construction and when set later, before anything changes; False (what we do) and foreach (a speed hint)
    pass. A maximize=True group used to be accepted and minimised."""
    torch_inputs = {i.desc: i.kwargs for i in optim_inputs_func_adamw(DEVICE)}
    kwargs = torch_inputs.get(flag, {flag: True})  # torch's own input where it has one
    weight, bias, _ = weight_bias_input()
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{flag}'"):
        GaLoreAdamW([weight, bias], **kwargs)
    for extra in ({}, PROJECTED):
        if flag == "foreach":
            build([{"params": [weight, bias], flag: True, **extra}])
            continue
        with pytest.raises(ValueError, match=f"Invalid {flag}: True"):
            build([{"params": [weight, bias], flag: True, **extra}])
        opt = build([{"params": [weight, bias], flag: False, **extra}], lr=1e-2)
        weight.grad, bias.grad = torch.ones_like(weight), torch.ones_like(bias)
        opt.step()
        before = [weight.detach().clone(), bias.detach().clone(), copy.deepcopy(opt.state_dict()["state"])]
        for group in opt.param_groups:
            group[flag] = True
        with pytest.raises(ValueError, match=f"Invalid {flag}: True.*nothing was updated"):
            opt.step()
        assert same(before, [weight.detach(), bias.detach(), opt.state_dict()["state"]])


def test_complex_parameters_are_refused():
    """TestOptimRenewed.test_complex and test_complex_2d need ``supports_complex``; GaLoreAdamW has no
    complex support (README, Errors): a complex weight in a projected group is refused at construction, a
    complex parameter in a plain group at its first step, naming it, with every parameter (the real one
    beside it too) and the state untouched."""
    assert not GALORE_INFO.supports_complex
    g = torch.Generator().manual_seed(0)
    complex_params = [torch.randn(13, 9, dtype=torch.complex64, generator=g).requires_grad_(),
                      torch.randn(13, dtype=torch.complex64, generator=g).requires_grad_(),
                      torch.randn(13, 9, generator=g).requires_grad_()]  # the last is real, as in torch's test
    with pytest.raises(ValueError, match=r"parameter #0 of its group \(shape \(13, 9\)\) is complex"):
        build(complex_params, **PROJECTED)
    for backend in BACKENDS:
        _needs_triton({"backend": backend})
        opt = build(complex_params, backend=backend)
        for p in complex_params:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
        before = [p.detach().clone() for p in complex_params]
        with pytest.raises(RuntimeError, match=r"does not support complex gradients \(parameter #0 \(shape \(13, 9\)\)\)"):
            opt.step()
        assert same(before, [p.detach() for p in complex_params]) and not opt.state


# ---- the update goes the right way -------------------------------------------------------------------------
@pytest.mark.parametrize("with_lrsched", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("optim_input", LIGHT, ids=ids(LIGHT))
def test_forloop_goes_right_direction(optim_input, contiguous, with_lrsched):
    """TestOptimRenewed.test_forloop_goes_right_direction: 20 steps on (W x + b)^2 lower the loss, with
    contiguous and non-contiguous parameters, with and without torch's schedulers (StepLR, ReduceLROnPlateau),
    at each input's lr (AdamW's 1e-3 by default), and every step counted."""
    _needs_triton(optim_input.kwargs)
    for schedulers_c in (GALORE_INFO.scheduler_inputs if with_lrsched else [None]):
        weight, bias, x = weight_bias_input(contiguous)
        assert weight.is_contiguous() == contiguous
        kwargs = copy.deepcopy(optim_input.kwargs)
        optimizer = GALORE_INFO.optim_cls([weight, bias], **kwargs)
        schedulers = [s(optimizer) for s in (schedulers_c or [])]

        def closure():
            optimizer.zero_grad()
            loss = loss_of(weight, bias, x)
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            loss = closure()
            optimizer.step()
            for s in schedulers:
                s.step(loss.item()) if isinstance(s, ReduceLROnPlateau) else s.step()
        assert closure().item() < initial
        assert optimizer.state[weight]["step"] == 20
        assert ("rank" in kwargs) == ("exp_avg" in optimizer.state[weight] and optimizer.state[weight]["exp_avg"].numel() < weight.numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_group_with_lrscheduler_goes_right_direction(backend):
    """TestOptimRenewed.test_param_group_with_lrscheduler_goes_right_direction: two groups (the weight
    projected, the bias at its own lr) under each of torch's scheduler sets."""
    _needs_triton({"backend": backend})
    for schedulers_c in GALORE_INFO.scheduler_inputs:
        weight, bias, x = weight_bias_input()
        optimizer = build([{"params": [weight], **PROJECTED}, {"params": [bias], "lr": 0.05}], lr=0.1, backend=backend)
        schedulers = [s(optimizer) for s in schedulers_c]
        initial = loss_of(weight, bias, x).item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = loss_of(weight, bias, x)
            loss.backward()
            optimizer.step()
            for s in schedulers:
                s.step(loss.item()) if isinstance(s, ReduceLROnPlateau) else s.step()
        assert loss_of(weight, bias, x).item() < 0.5 * initial


@pytest.mark.parametrize("optim_input", INPUTS, ids=ids(INPUTS))
def test_tensor_lr(optim_input):
    """TestOptimRenewed.test_tensor_lr: lr=torch.tensor(1e-3) steps exactly like the same lr as a float
    (bit for bit; torch's test allows roundoff)."""
    _needs_triton(optim_input.kwargs)
    weight, bias, x = weight_bias_input()
    weight_c, bias_c = [p.detach().clone().requires_grad_() for p in (weight, bias)]
    kwargs = copy.deepcopy(optim_input.kwargs)
    kwargs["lr"] = float(torch.tensor(1e-3))  # torch's float32 tensor(1e-3), so that the two are equal
    optimizer_r = GALORE_INFO.optim_cls([weight, bias], **kwargs)
    kwargs["lr"] = torch.tensor(kwargs["lr"])
    optimizer = GALORE_INFO.optim_cls([weight_c, bias_c], **kwargs)
    for _ in range(5):
        for opt, w, b in ((optimizer_r, weight, bias), (optimizer, weight_c, bias_c)):
            opt.zero_grad()
            loss_of(w, b, x).backward()
            opt.step()
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    assert not torch.equal(weight, weight_bias_input()[0])


# ---- whole-model step against the per-parameter loop, dtypes --------------------------------------------
def _pair(backend, make_params, grads_for):
    """Two runs of the same parameters, the whole-model step (grouped / foreach engine) and the pre-engine
    per-parameter loop (``_per_parameter_step``), compared with torch's TensorTracker after every step, as
    torch's _compare_between compares foreach or fused against the for-loop."""
    runs = []
    for per_parameter in (False, True):
        params = make_params()
        opt = build(params if isinstance(params[0], dict) else [{"params": params}], lr=1e-2, weight_decay=0.1,
                    backend=backend, **PROJECTED)
        opt._per_parameter_step = per_parameter
        runs.append((params if not isinstance(params[0], dict) else params[0]["params"], opt))
    tracker = TensorTracker()
    for i in range(7):
        for params, opt in runs:
            grads_for(i, params)
            opt.step()
        (params, opt), (params_c, opt_c) = runs
        for p, q in zip(params, params_c):
            tracker.add(p)
            tracker.pop_check_set(q, _Asserts())
            state, state_c = opt.state.get(p, {}), opt_c.state.get(q, {})
            assert state.keys() == state_c.keys()
            for key, value in state.items():
                if torch.is_tensor(value):
                    tracker.add(value)
                    tracker.pop_check_set(state_c[key], _Asserts())
                else:
                    assert value == state_c[key], key
    assert tracker.all_popped()
    return runs


@pytest.mark.parametrize("backend", BACKENDS)
def test_foreach_matches_forloop(backend):
    """TestOptimRenewed.test_foreach_matches_forloop (_test_derived_optimizers, _compare_between): a
    Linear-Sigmoid-Linear-Sigmoid model plus a 0-D parameter, 7 steps, no gradients at step 2 (no
    backward), the second layer frozen at steps 3-4: the whole-model step equals the per-parameter loop
    bit for bit, parameters and every state entry."""
    _needs_triton({"backend": backend})
    x = torch.linspace(0.1, 2.7, 27).reshape(3, 9)
    models = []

    def make_params():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(9, 13), nn.Sigmoid(), nn.Linear(13, 5), nn.Sigmoid())
        empty = torch.empty((), requires_grad=True)
        with torch.no_grad():
            empty.fill_(0.7)
        empty.grad = torch.full_like(empty, 0.3)
        models.append(model)
        return list(model.parameters()) + [empty]

    def grads_for(i, params):
        model = models[0] if params[0] is next(models[0].parameters()) else models[1]
        for p in params[:-1]:
            p.grad = None
        model[2].requires_grad_(i not in (3, 4))
        if i != 2:
            model(x).sum().backward()

    (params, opt), _ = _pair(backend, make_params, grads_for)
    # the frozen layer and the step without gradients really skipped: 7 - 1 - 2 steps for layer 2
    assert opt.state[params[0]]["step"] == 6 and opt.state[params[2]]["step"] == 4
    assert opt.state[params[-1]]["step"] == 7 and opt.state[params[0]]["rank"] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_device_dtype(backend):
    """TestOptimRenewed.test_mixed_device_dtype, on one device: float64 (backend torch), float32, float16
    and bfloat16 parameters, projected and plain, in one optimizer: the whole-model step equals the per-parameter loop exactly, each parameter's
    state in its own dtype (state_dtype None: the gradient's). An int64 tensor (torch's last, without
    requires_grad) in a group is left alone."""
    _needs_triton({"backend": backend})
    dtypes = ([torch.float64] if backend == "torch" else []) + [torch.float32, torch.float16, torch.bfloat16]

    def make_params():
        g = torch.Generator().manual_seed(3)
        return [torch.rand(shape, generator=g).to(dt).requires_grad_() for dt in dtypes
                for shape in ((13, 9), (9, 13), (7,))]

    def grads_for(i, params):
        g = torch.Generator().manual_seed(100 + i)
        for p in params:
            p.grad = torch.rand(p.shape, generator=g).to(p.dtype)

    (params, opt), _ = _pair(backend, make_params, grads_for)
    for p in params:
        assert opt.state[p]["exp_avg"].dtype == p.dtype and opt.state[p]["step"] == 7
    ints = torch.randint(1024, (13, 9), generator=torch.Generator().manual_seed(0))
    opt.add_param_group({"params": [ints]})  # torch.optim takes it; with no gradient it is never touched
    before = ints.clone()
    grads_for(7, params)
    opt.step()
    assert torch.equal(ints, before) and ints not in opt.state


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_default_dtype_works(backend):
    """TestOptimRenewed.test_set_default_dtype_works_with_foreach: under torch.set_default_dtype(float64)
    a float32 model steps bit for bit as under float32 (no float64 scalar tensor leaks into the step), its
    state stays float32 and ``step`` a Python int (torch would keep a float64 step tensor)."""
    _needs_triton({"backend": backend})
    results = []
    start = weight_bias_input()  # float32, drawn under the float32 default
    old = torch.get_default_dtype()
    for default in (torch.float32, torch.float64):
        torch.set_default_dtype(default)
        try:
            weight, bias = [Parameter(t.detach().clone()) for t in start[:2]]
            x = start[2]
            opt = build([weight, bias], lr=torch.tensor(1e-2, dtype=torch.float32), weight_decay=0.1,
                        backend=backend, **PROJECTED)
            for _ in range(5):
                opt.zero_grad()
                loss_of(weight, bias, x).backward()
                opt.step()
            results.append((weight.detach().clone(), bias.detach().clone(), opt.state[weight]))
        finally:
            torch.set_default_dtype(old)
    (w32, b32, s32), (w64, b64, s64) = results
    assert torch.equal(w32, w64) and torch.equal(b32, b64)
    assert w64.dtype == torch.float32 and type(s64["step"]) is int
    assert all(v.dtype == torch.float32 for v in s64.values() if torch.is_tensor(v) and v.is_floating_point())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_peak_memory_of_an_ordinary_step(backend):
    """TestOptimRenewed.test_peak_memory_foreach (CUDA only, as there): torch lets the foreach step use one
    intermediate the size of all parameters above the for-loop's peak, i.e. two above the memory a step
    starts with. Here an ordinary (not refresh) step of 10 projected 64x48 fp32 weights may allocate at
    most that: 2 x the parameters' bytes over what weights, gradients and state already hold."""
    _needs_triton({"backend": backend})
    g = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.rand(64, 48, device="cuda", generator=g) for _ in range(10)]
    opt = build(params, backend=backend, rank=8, update_proj_gap=100)
    for p in params:
        p.grad = torch.rand(p.shape, device="cuda", generator=g)
    opt.step()  # the refresh: SVDs and state creation
    opt.step()
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    budget = 2 * sum(p.numel() * p.element_size() for p in params)
    assert torch.cuda.max_memory_allocated() - before <= budget


# ---- param groups -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optim_input", TORCH_INPUTS, ids=ids(TORCH_INPUTS))
def test_param_groups_weight_decay(optim_input):
    """TestOptimRenewed.test_param_groups_weight_decay: the weight's group with the input's weight decay,
    the bias's with none: the loss falls, and the bias is exactly what it is in an optimizer of its own."""
    weight, bias, x = weight_bias_input()
    bias_alone = Parameter(bias.detach().clone())
    weight_kwargs = copy.deepcopy(optim_input.kwargs)
    bias_kwargs = {**copy.deepcopy(optim_input.kwargs), "weight_decay": 0.0}
    bias_kwargs.pop("rank", None), bias_kwargs.pop("update_proj_gap", None)
    optimizer = GALORE_INFO.optim_cls([dict(params=[weight], **weight_kwargs), dict(params=[bias], **bias_kwargs)])
    alone = GALORE_INFO.optim_cls([dict(params=[bias_alone], **copy.deepcopy(bias_kwargs))])
    initial = loss_of(weight, bias, x).item()
    for _ in range(20):
        optimizer.zero_grad()
        loss = loss_of(weight, bias, x)
        loss.backward()
        bias_alone.grad = bias.grad.clone()
        optimizer.step()
        alone.step()
    assert loss.item() < initial
    assert torch.equal(bias, bias_alone)


@pytest.mark.parametrize("optim_input", TORCH_INPUTS, ids=ids(TORCH_INPUTS))
def test_param_groups_lr(optim_input):
    """TestOptimRenewed.test_param_groups_lr: the optimizer's lr is 1e-28, the group's its own: the loss
    falls, and a parameter in a group at lr 1e-28 does not move (bit for bit)."""
    kwargs = copy.deepcopy(optim_input.kwargs)
    if "lr" not in kwargs or kwargs["lr"] == 0:
        kwargs["lr"] = 1e-3
    weight, bias, x = weight_bias_input()
    irrelevant = Parameter(torch.randn(2))
    irrelevant_clone = irrelevant.detach().clone()
    optimizer = GALORE_INFO.optim_cls([dict(params=[weight, bias], **kwargs), dict(params=[irrelevant])], lr=1e-28)
    assert optimizer.param_groups[-1]["lr"] == 1e-28
    initial = loss_of(weight, bias, x).item()
    for _ in range(20):
        optimizer.zero_grad()
        loss = loss_of(weight, bias, x)
        loss.backward()
        irrelevant.grad = torch.rand_like(irrelevant)
        optimizer.step()
    assert loss.item() < initial
    assert torch.equal(irrelevant, irrelevant_clone) and optimizer.state[irrelevant]["step"] == 20


# ---- steps without (useful) gradients -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_is_noop_when_params_have_no_grad(backend):
    """TestOptimRenewed.test_step_is_noop_when_params_have_no_grad: parameters with requires_grad=False
    (so no gradient) are unchanged by step(closure), get no state, and the closure's loss is returned."""
    for optim_input in all_inputs(backend=(backend,)):
        _needs_triton(optim_input.kwargs)
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(13, 9, generator=g), torch.randn(9, 13, generator=g), torch.randn(7, generator=g)]
        old = [p.clone() for p in params]
        optimizer = GALORE_INFO.optim_cls(params, **copy.deepcopy(optim_input.kwargs))
        loss = optimizer.step(lambda: torch.tensor([1.0]))
        assert torch.equal(loss, torch.tensor([1.0])) and same(old, params) and not optimizer.state


@pytest.mark.parametrize("optim_input", [i for i in INPUTS if "weight_decay" not in i.kwargs],
                         ids=ids([i for i in INPUTS if "weight_decay" not in i.kwargs]))
def test_step_is_noop_for_zero_grads(optim_input):
    """TestOptimRenewed.test_step_is_noop_for_zero_grads: zero gradients (without weight decay) leave the
    parameters exactly as they were, also at a basis refresh (the SVD of a zero gradient)."""
    _needs_triton(optim_input.kwargs)
    kwargs = copy.deepcopy(optim_input.kwargs)
    kwargs["lr"] = torch.tensor(1e-5) if torch.is_tensor(kwargs.get("lr")) else 1e-5
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(13, 9, generator=g).requires_grad_(), torch.randn(5, 1, generator=g).requires_grad_()]
    old = [p.detach().clone() for p in params]
    optimizer = GALORE_INFO.optim_cls(params, **kwargs)
    for _ in range(3):  # steps 0 and 2 refresh
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step(lambda: torch.tensor([1.0]))
    assert same(old, [p.detach() for p in params]) and optimizer.state[params[0]]["step"] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_0d_parameters(backend):
    """_test_derived_optimizers' zero-size parameter (pytorch issue 100701): parameters with no elements
    ((0,) and (0, 5)) step without error and keep empty state; a 0-D parameter steps like a 1-element one."""
    _needs_triton({"backend": backend})
    empty, empty2 = Parameter(torch.empty(0)), Parameter(torch.empty(0, 5))
    scalar, vector = Parameter(torch.tensor(1.5)), Parameter(torch.tensor([1.5]))
    weight = Parameter(torch.randn(13, 9))
    opt = build([{"params": [empty, empty2, scalar, weight]}], lr=1e-2, backend=backend, **PROJECTED)
    ref = build([vector], lr=1e-2, backend=backend)
    for _ in range(3):
        empty.grad, empty2.grad = torch.empty(0), torch.empty(0, 5)
        scalar.grad, vector.grad, weight.grad = torch.tensor(0.3), torch.tensor([0.3]), torch.ones(13, 9)
        opt.step()
        ref.step()
    assert opt.state[empty]["step"] == 3 and opt.state[empty]["exp_avg"].shape == (0,)
    assert opt.state[empty2]["exp_avg"].shape == (0, 5)
    assert scalar.shape == () and torch.equal(scalar.reshape(1), vector) and scalar.item() != 1.5


def test_optimizer_can_be_printed():
    """TestOptimRenewed.test_optimizer_can_be_printed, for every input; the text lists each group's keys."""
    params = [Parameter(torch.randn(13, 9)) for _ in range(2)]
    for optim_input in INPUTS:
        text = repr(GALORE_INFO.optim_cls(params, **copy.deepcopy(optim_input.kwargs)))
        assert text.startswith("GaLoreAdamW (") and "lr: " in text and "weight_decay: " in text
        assert ("rank: 3" in text) == ("rank" in optim_input.kwargs)


# ---- state_dict ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("optim_input", LIGHT, ids=ids(LIGHT))
def test_state_dict_deterministic(optim_input, is_named_optim0, is_named_optim1):
    """TestOptimRenewed.test_state_dict_deterministic: prime 10 steps, load a deepcopy of the state_dict into
    a new optimizer of cloned (equal, not identical) parameters, named or not, step both 10 more times: the
    parameters stay equal bit for bit and the state_dicts are equal (param_names aside); repeated groups get
    identical representations. Also torch's check in test_state_dict_with_cuda_params that
    load_state_dict does not mutate the dict it is given."""
    _needs_triton(optim_input.kwargs)
    weight, bias, x = weight_bias_input()
    named = lambda ps, yes: [(f"name{i}", p) for i, p in enumerate(ps)] if yes else ps  # noqa: E731

    def without_names(sd):
        sd = copy.deepcopy(sd)
        for group in sd["param_groups"]:
            group.pop("param_names", None)
        return sd

    def fwd_bwd(opt, w, b):
        opt.zero_grad()
        loss_of(w, b, x).backward()

    optimizer = GALORE_INFO.optim_cls(named([weight, bias], is_named_optim0), **copy.deepcopy(optim_input.kwargs))
    for _ in range(10):
        fwd_bwd(optimizer, weight, bias)
        optimizer.step()
    with torch.no_grad():
        weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
    optimizer_c = GALORE_INFO.optim_cls(named([weight_c, bias_c], is_named_optim1), **copy.deepcopy(optim_input.kwargs))
    given = copy.deepcopy(optimizer.state_dict())
    reference = copy.deepcopy(given)
    optimizer_c.load_state_dict(given)
    assert same(given, reference)  # load_state_dict left the dict it was given alone
    for _ in range(10):
        for opt, w, b in ((optimizer, weight, bias), (optimizer_c, weight_c, bias_c)):
            fwd_bwd(opt, w, b)
            opt.step()
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    assert same(without_names(optimizer.state_dict()), without_names(optimizer_c.state_dict()))
    optimizer_c.param_groups.extend(optimizer_c.param_groups)
    assert same(without_names(optimizer.state_dict())["param_groups"][-1],
                without_names(optimizer_c.state_dict())["param_groups"][-1])


def _conv_model():
    """torch's Conv2d + BatchNorm2d model, wide enough for rank 3: the conv weight (7, 5, 3, 3) is
    optimised as 7x45."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(5, 7, 3, stride=2), nn.BatchNorm2d(7, eps=1e-05, momentum=0.1))


def _fwd_bwd(optim, model, x):
    optim.zero_grad()
    loss = model(x).sum()
    loss.backward()
    return loss


@pytest.mark.parametrize("optim_input", TORCH_INPUTS, ids=ids(TORCH_INPUTS))
def test_can_load_older_state_dict(optim_input):
    """TestOptimRenewed.test_can_load_older_state_dict: torch deletes the flags added after the optimizer's
    release (not_og_supported_flags; we have none: GaLoreAdamW's groups hold no torch flag) and loads. Our
    older checkpoints lack the group keys added since (projector, update, the policies, state_dtype): they
    load with those keys' defaults and continue exactly as the newer one."""
    x = torch.rand(1, 5, 16, 16, generator=torch.Generator().manual_seed(2))
    results = []
    for strip in (False, True):
        model = _conv_model()
        optimizer = GALORE_INFO.optim_cls(model.parameters(), **copy.deepcopy(optim_input.kwargs))
        for _ in range(3):
            _fwd_bwd(optimizer, model, x)
            optimizer.step()
        old = copy.deepcopy(optimizer.state_dict())
        for group in old["param_groups"]:
            assert not set(group) & set(TORCH_FLAGS) and not GALORE_INFO.not_og_supported_flags
            if strip:
                for key in ("projector", "rank_policy", "moments_on_refresh", "refresh_policy", "update", "state_dtype"):
                    group.pop(key, None)
        optimizer.load_state_dict(old)
        for _ in range(3):  # across the refresh at step 4
            _fwd_bwd(optimizer, model, x)
            optimizer.step()
        results.append(list(model.parameters()))
        if "rank" in optim_input.kwargs:
            assert optimizer.state[model[0].weight]["exp_avg"].shape == (3, 45)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("optim_input", TORCH_INPUTS, ids=ids(TORCH_INPUTS))
def test_can_load_from_to_named_state_dict(optim_input, is_named_optim0, is_named_optim1):
    """TestOptimRenewed.test_can_load_from_to_named_state_dict: parameters or named_parameters on either
    side; the names survive when one side has them."""
    x = torch.rand(1, 5, 16, 16, generator=torch.Generator().manual_seed(2))
    model = _conv_model()
    optimizer = GALORE_INFO.optim_cls(model.named_parameters() if is_named_optim0 else model.parameters(),
                                      **copy.deepcopy(optim_input.kwargs))
    for _ in range(3):
        _fwd_bwd(optimizer, model, x)
        optimizer.step()
    old = copy.deepcopy(optimizer.state_dict())
    optimizer2 = GALORE_INFO.optim_cls(model.named_parameters() if is_named_optim1 else model.parameters(),
                                       **copy.deepcopy(optim_input.kwargs))
    optimizer2.load_state_dict(old)
    _fwd_bwd(optimizer2, model, x)
    optimizer2.step()
    assert optimizer2.state[model[0].weight]["step"] == 4
    if is_named_optim0 or is_named_optim1:
        names = [n for g in optimizer2.state_dict()["param_groups"] for n in g["param_names"]]
        assert sorted(names) == ["0.bias", "0.weight", "1.bias", "1.weight"]


@pytest.mark.parametrize("optim_input", TORCH_INPUTS, ids=ids(TORCH_INPUTS))
def test_save_load_equality_with_weights_only(optim_input):
    """TestOptimRenewed.test_save_load_equality_with_weights_only: torch.save then torch.load, with and
    without weights_only, gives back an equal state_dict."""
    weight, bias, x = weight_bias_input()
    optimizer = GALORE_INFO.optim_cls([weight, bias], **copy.deepcopy(optim_input.kwargs))
    for _ in range(3):
        optimizer.zero_grad()
        loss_of(weight, bias, x).backward()
        optimizer.step()
    sd = optimizer.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    for weights_only in (False, True):
        buf.seek(0)
        assert same(torch.load(buf, weights_only=weights_only), sd)


def test_load_nontensor_step_and_state_without_step():
    """TestOptimRenewed.test_load_nontensor_step: torch.optim keeps ``step`` as a tensor and must load a
    Python number; GaLoreAdamW writes Python ints, so a checkpoint's int step loads. A tensor step (torch's
    format) or a state entry without ``step`` is refused with the key named, and nothing is loaded
    (README, Checkpoints)."""
    params = [Parameter(torch.randn(13, 9)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    optimizer = build(params, lr=1e-2, **PROJECTED)
    for _ in range(3):
        optimizer.step()
    sd = copy.deepcopy(optimizer.state_dict())
    assert all(type(entry["step"]) is int for entry in sd["state"].values())
    optimizer.load_state_dict(sd)
    optimizer.step()
    assert optimizer.state[params[0]]["step"] == 4
    current = copy.deepcopy(optimizer.state_dict())
    for how, match in (("tensor", "'step' must be an integer >= 0, got tensor"), ("missing", "has no 'step'")):
        bad = copy.deepcopy(sd)
        for entry in bad["state"].values():
            if how == "tensor":
                entry["step"] = torch.tensor(float(entry["step"]))
            else:
                del entry["step"]
        with pytest.raises(ValueError, match=match):
            optimizer.load_state_dict(bad)
        assert same(optimizer.state_dict(), current)


@pytest.mark.gpu
def test_state_dict_with_cuda_params():
    """TestOptimRenewed.test_state_dict_with_cuda_params: a CPU optimizer's state_dict loads into the same
    optimizer over CUDA copies of the parameters without being mutated; both then step alike (across
    devices the SVD and products differ by roundoff: 1e-5 relative, not bit for bit as torch's AdamW)."""
    for optim_input in TORCH_INPUTS:
        g = torch.Generator().manual_seed(0)
        params = [Parameter(torch.randn(13, 9, generator=g)) for _ in range(2)]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        kwargs = copy.deepcopy(optim_input.kwargs)
        kwargs.pop("backend")
        optimizer = build(params, backend="torch", **kwargs)
        for _ in range(3):
            optimizer.step()
        with torch.no_grad():
            params_cuda = [Parameter(p.to("cuda")) for p in params]
        for p, q in zip(params, params_cuda):
            q.grad = p.grad.to("cuda")
        optimizer_cuda = build(params_cuda, backend="auto", **kwargs)
        state_dict_cpu = copy.deepcopy(optimizer.state_dict())
        state_dict_cuda = copy.deepcopy(optimizer.state_dict())
        optimizer_cuda.load_state_dict(state_dict_cuda)
        assert same(state_dict_cpu, state_dict_cuda)
        for _ in range(5):
            optimizer.step()
            optimizer_cuda.step()
            for p, q in zip(params, params_cuda):
                torch.testing.assert_close(q.cpu(), p, rtol=1e-5, atol=1e-6)


# ---- hooks --------------------------------------------------------------------------------------------------
def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_pre_and_post_hooks(backend):
    """TestOptimRenewed.test_state_dict_pre_hook, test_state_dict_post_hook, test_state_dict_pre_post_hook
    (torch's hooks, as there). Then, with the pre-hook's "test" entry left in optimizer.state, the
    optimizer still steps, and its state_dict loads back into a fresh optimizer: torch.optim carries a
    state key that is no parameter index over as it is (we refused it: "optimizer state for parameter index
    'test'")."""
    _needs_triton({"backend": backend})
    for optim_input in all_inputs(backend=(backend,)):
        make = lambda: [torch.rand(13, 9, requires_grad=True)]  # noqa: E731
        optim = GALORE_INFO.optim_cls(make(), **copy.deepcopy(optim_input.kwargs))
        optim.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert optim.state_dict()["state"]["test"] == 1
        optim = GALORE_INFO.optim_cls(make(), **copy.deepcopy(optim_input.kwargs))
        optim.register_state_dict_post_hook(_state_dict_post_hook)
        assert optim.state_dict()["ran_state_dict_pre_hook"] is False
        optim = GALORE_INFO.optim_cls(make(), **copy.deepcopy(optim_input.kwargs))
        optim.register_state_dict_pre_hook(_state_dict_pre_hook)
        optim.register_state_dict_post_hook(_state_dict_post_hook)
        sd = optim.state_dict()
        assert "test" not in sd["state"] and sd["ran_state_dict_pre_hook"] is True
    kwargs = dict(backend=backend, lr=1e-2, **PROJECTED)
    params = make()
    optim = GALORE_INFO.optim_cls(params, **kwargs)
    optim.register_state_dict_pre_hook(_state_dict_pre_hook)
    params[0].grad = torch.ones_like(params[0])
    optim.step()
    sd = optim.state_dict()
    twin_params = [params[0].detach().clone().requires_grad_()]
    twin = GALORE_INFO.optim_cls(twin_params, **kwargs)
    twin.load_state_dict(sd)
    assert twin.state["test"] == 1 and twin.state[twin_params[0]]["step"] == 1
    twin_params[0].grad = torch.ones_like(twin_params[0])
    optim.step()
    twin.step()
    assert torch.equal(params[0], twin_params[0])


def _load_state_dict_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer, state_dict):
    my_state_dict = copy.deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_hooks(backend):
    """TestOptimRenewed.test_load_state_dict_pre_hook_and_prepend, test_load_state_dict_post_hook and
    test_load_state_dict_pre_post_hook (torch's hooks, as there); the lr a pre-hook sets is the lr of the
    next step (a 13x9 weight stepped with it equals one stepped at that lr from the start)."""
    _needs_triton({"backend": backend})
    for optim_input in all_inputs(backend=(backend,)):
        kwargs = copy.deepcopy(optim_input.kwargs)
        param = torch.rand(13, 9, requires_grad=True)
        optim = GALORE_INFO.optim_cls([param], **copy.deepcopy(kwargs))
        state_dict = optim.state_dict()
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
        optim.load_state_dict(state_dict)
        assert optim.param_groups[0]["lr"] == 0.002
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
        optim.load_state_dict(state_dict)
        assert optim.param_groups[0]["lr"] == 0.002  # prepended: hook1 runs last and wins
        reference = param.detach().clone().requires_grad_()
        ref = GALORE_INFO.optim_cls([reference], **{**copy.deepcopy(kwargs), "lr": 0.002})
        param.grad, reference.grad = torch.ones_like(param), torch.ones_like(param)
        optim.step()
        ref.step()
        assert torch.equal(param, reference)

        optim = GALORE_INFO.optim_cls([torch.rand(13, 9, requires_grad=True)], **copy.deepcopy(kwargs))
        optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert not optim.state["ran_load_state_dict_pre_hook2"]  # a tensor(False) for a tensor lr, as in torch
        assert optim.state["ran_load_state_dict_post_hook"]

        optim = GALORE_INFO.optim_cls([torch.rand(13, 9, requires_grad=True)], **copy.deepcopy(kwargs))
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
        optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert optim.state["ran_load_state_dict_pre_hook2"] and optim.state["ran_load_state_dict_post_hook"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_all_hooks(backend):
    """TestOptimRenewed.test_step_pre_hook, test_step_post_hook and test_step_all_hooks: torch's global
    hooks (register_optimizer_step_pre_hook / _post_hook) and the optimizer's own run in torch's order
    (global pre, pre, post, global post) for GaLoreAdamW as for an SGD beside it, and stop after remove()."""
    _needs_triton({"backend": backend})
    for optim_input in all_inputs(backend=(backend,)):
        params = [torch.ones(13, 9, requires_grad=True)]
        params[0].grad = torch.full_like(params[0], 0.5)
        optim = GALORE_INFO.optim_cls(params, **copy.deepcopy(optim_input.kwargs))
        optim2 = SGD(params)
        data = []
        handles = [register_optimizer_step_pre_hook(lambda o, a, k: data.append(0)),
                   register_optimizer_step_post_hook(lambda o, a, k: data.append(5))]
        try:
            handles += [optim.register_step_pre_hook(lambda o, a, k: data.append(1)),
                        optim.register_step_post_hook(lambda o, a, k: data.append(2)),
                        optim2.register_step_pre_hook(lambda o, a, k: data.append(1)),
                        optim2.register_step_post_hook(lambda o, a, k: data.append(2))]
            optim.step()
            assert data == [0, 1, 2, 5]
            optim2.step()
            optim.step()
            assert data == [0, 1, 2, 5] * 3
        finally:
            for h in handles:
                h.remove()
        optim.step()
        optim2.step()
        assert data == [0, 1, 2, 5] * 3 and optim.state[params[0]]["step"] == 3


# ---- gradients and state ------------------------------------------------------------------------------------
EXTRA_OPTIONS = [{}, {"check_finite": True}, {"proj_type": "full"}, {"projector": "rsvd"}, {"update": "fira"},
                 {"state_dtype": "bfloat16"}, {"state_dtype": "int8"}]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", EXTRA_OPTIONS, ids=[str(o) for o in EXTRA_OPTIONS])
def test_grads_are_never_inplaced_into(backend, options):
    """TestOptimRenewed.test_grads_are_never_inplaced_into: a step reads p.grad and never writes it, values
    and version counter, over 3 steps with 2 refreshes, for every input (plain and projected, 2-D and 3-D
    weights, a 1-D and a 0-D parameter), and for the options that take other paths (check_finite, full
    projection, rsvd, Fira's residual, 16-bit and int8 moments)."""
    inputs = all_inputs(backend=(backend,)) if not options else \
        [i for i in all_inputs(backend=(backend,)) if "rank" in i.kwargs and i.desc.startswith("default")]
    for optim_input in inputs:
        _needs_triton(optim_input.kwargs)
        g = torch.Generator().manual_seed(0)
        params = [Parameter(torch.randn(shape, generator=g)) for shape in ((13, 9), (9, 13), (5, 3, 4), (7,), ())]
        kwargs = {**copy.deepcopy(optim_input.kwargs), **(options if "rank" in optim_input.kwargs else {})}
        optimizer = GALORE_INFO.optim_cls(params, **kwargs)
        for p in params:
            p.grad = torch.rand(p.shape, generator=g)
        grads = [p.grad.clone() for p in params]
        versions = [p.grad._version for p in params]
        before = [p.detach().clone() for p in params]
        for _ in range(3):
            optimizer.step()
        assert [p.grad._version for p in params] == versions
        assert same(grads, [p.grad for p in params])
        assert not any(torch.equal(a, b) for a, b in zip(before, params))  # the steps did happen


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_empty_state(backend):
    """TestOptimRenewed.test_non_empty_state: after one step every parameter of a Linear has state, with
    the keys the README lists for its group."""
    for optim_input in all_inputs(backend=(backend,)):
        _needs_triton(optim_input.kwargs)
        torch.manual_seed(0)
        model = nn.Linear(9, 13)
        optim = GALORE_INFO.optim_cls(model.parameters(), **copy.deepcopy(optim_input.kwargs))
        model(torch.rand(2, 9)).sum().backward()
        optim.step()
        assert len(optim.state) == 2
        for p, state in optim.state.items():
            assert {"step", "exp_avg", "exp_avg_sq"} <= state.keys() and state["step"] == 1
        projected = "rank" in optim_input.kwargs
        assert ("proj_right" in optim.state[model.weight]) == projected  # 13x9: std projects the 9 side
