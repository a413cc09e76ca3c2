"""The projection bases: orientation, where a basis comes from, when it is refreshed, and what a refresh
does to the rest of the state.

Each strategy axis of the design brief is a small registry of plain functions keyed by a group key, so
a new method is one function and one entry (defaults are galore-torch's):

1. basis source      ``BASIS_SOURCES``    ``projector``: "svd" (exact), "rsvd" (randomized), "warm"
                                          (subspace iteration started from the previous basis),
                                          "random" (APOLLO's seeded Gaussian), "dct" (DCT-II columns)
2. refresh policy    ``REFRESH_POLICIES`` ``refresh_policy``: "fixed" (every ``update_proj_gap`` steps),
                                          "lazy" (stretch the gap while bases agree), "converged"
                                          (when the projected gradient stops changing)
3. moments at switch ``MOMENT_RULES``     ``moments_on_refresh``: "keep", "zero", "rotate"
4. rank policy       ``RANK_POLICIES``    ``rank_policy``: "fixed" (``rank``), "energy" (smallest rank
                                          leaving at most ``energy_threshold`` of ||G||_F unexplained)
5. update rule       ``update_rules.UPDATE_RULES`` ``update``: "galore" (``P N``), "fira", "frugal",
                                          "apollo", "apollo-mini" (math in reference.py)
6. state precision   ``STATE_DTYPES``     ``state_dtype``: None keeps the gradient's dtype; "int8" is
                                          bitsandbytes' blockwise 8-bit (lowrank_kernels.quant)

A projected parameter's state holds plain tensors and numbers only: ``proj_left`` (P, m x r) and/or
``proj_right`` (Q, n x r; galore-torch keeps Q^T), ``rank`` (the current r), ``refreshes``,
``last_refresh`` (the step of the latest refresh) and the few counters a policy keeps. Regenerated
sources store what regenerates the basis instead of the basis: ``proj_left_seed`` / ``proj_right_seed``
(an int, "random") or ``proj_left_index`` / ``proj_right_index`` (r int64 DCT column numbers, "dct");
:func:`basis_of` rebuilds the matrices from them, given the gradient. Checkpoints therefore load with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional

import torch

from . import quant
from .linalg import gaussian_test_matrix, rsvd, svd_from_range
from .reference import project

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
BASIS_KEYS = ("proj_left", "proj_right")
# "int8": uint8 codes plus fp32 per-block scales (lowrank_kernels.quant); the others are plain moments.
STATE_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "int8": torch.uint8}
OVERSAMPLE = 10  # extra sketch columns of the randomized sources (Halko et al.'s p)

# Keys of projected groups, with galore-torch's / HF Trainer's defaults and ours for the additions.
PROJECTED_DEFAULTS = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "projector": "svd",
    "rank_policy": "fixed",
    "moments_on_refresh": "keep",
    "refresh_policy": "fixed",
    "update": "galore",
}
# Keys a policy reads, with defaults; added to a group only when that policy is chosen.
POLICY_DEFAULTS = {
    ("rank_policy", "energy"): {"energy_threshold": 0.2, "min_rank": 1, "max_rank": None},
    ("refresh_policy", "lazy"): {"similarity_threshold": 0.4, "patience": 2, "gap_growth": 2},
    ("refresh_policy", "converged"): {"convergence_tol": 0.05},
    # FRUGAL's name and default: the residual's signSGD lr is lr * scale * inactive_lr_scale (its
    # proj_params_lr_scale is our scale), so it follows lr schedules.
    ("update", "frugal"): {"inactive_lr_scale": 1.0},
    # apollo-torch's constructor flags, per group here.
    ("update", "apollo"): {"scale_front": False, "disable_nl": False},
    ("update", "apollo-mini"): {"scale_front": False, "disable_nl": False},
}
# Sources whose bases the fused kernels take: every one. random and dct states hold a seed or column
# numbers (compact checkpoints); the whole-model step keeps their matrices in a cache of its own
# (engine.StepEngine.basis), the per-parameter path rebuilds them each step (basis_of).
FUSED_PROJECTORS = ("svd", "rsvd", "warm", "random", "dct")


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """The 2-D view a projected parameter is optimised as: (shape[0], prod(shape[1:])).

    A conv weight (C_out, C_in, kh, kw) becomes (C_out, C_in*kh*kw): each output channel's filter is one
    row, the usual matrix form of a convolution.
    """
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return int(shape[0]), n


def orientation(proj_type: str, m: int, n: int) -> str:
    """Which side(s) are projected: "left" (R = P^T G), "right" (R = G Q) or "full" (R = P^T G Q).

    "std" projects the smaller dimension away, so the basis is the small matrix; "reverse_std" the other.
    """
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def lowrank_shape(side: str, m: int, n: int, r: int) -> tuple[int, int]:
    return {"left": (r, n), "right": (m, r), "full": (r, r)}[side]


def max_rank(group: dict) -> int:
    """The largest rank a group's policy can choose (what the constructor checks against min(m, n))."""
    if group["rank_policy"] == "energy":
        return group["max_rank"] if group["max_rank"] is not None else group["rank"]
    return group["rank"]


# ---- 1. basis sources: fp32 G, k, seed, previous basis -> (U m x k, S k, V n x k) ----------------------
def _svd_source(G, k, seed, side, previous):
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k].T


def _rsvd_source(G, k, seed, side, previous):
    return rsvd(G, k, oversample=OVERSAMPLE, seed=seed)


def _warm_source(G, k, seed, side, previous, niter: int = 1):
    """One subspace iteration started from the previous basis instead of a fresh Gaussian sketch.

    The previous basis already spans most of the new dominant subspace when gradients drift slowly, so
    one power iteration (versus rsvd's two on a random start) refines it. Seeded Gaussian columns pad
    the start up to k + OVERSAMPLE, so the rank may grow. Without a previous basis this is rsvd.
    """
    start = previous.get("proj_left") if side != "right" else previous.get("proj_right")
    if start is None:
        return _rsvd_source(G, k, seed, side, previous)
    A = G if side != "right" else G.T  # the side whose basis we refine is A's range
    width = min(k + OVERSAMPLE, *A.shape)
    Y = start.float()[:, :width]
    if Y.shape[1] < width:
        extra = A @ gaussian_test_matrix(A.shape[1], width - Y.shape[1], seed, A.device)
        Y = torch.cat([Y, extra], dim=1)
    U, S, V = svd_from_range(A, Y, k, niter)
    return (U, S, V) if side != "right" else (V, S, U)


def next_seed(seed: int) -> int:
    """apollo-torch's ``next_seed``: the last of 15 int64 draws of a CPU generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=g).tolist()[-1]


def gaussian_basis(seed: int, dim: int, r: int, side: str, like: torch.Tensor) -> torch.Tensor:
    """APOLLO's projection (``random_projector.py``): N(0, 1/r) entries, drawn in fp32 on ``like``'s device
    from a generator seeded with ``seed``, cast to ``like``'s dtype. Left: the m x r P itself; right: APOLLO
    draws r x n and projects with its transpose, so Q is that draw transposed (n x r).

    Not orthonormalised, as APOLLO. The draw depends on the device type (CPU and CUDA generators differ),
    as in APOLLO: a checkpoint resumes bit-exactly on the same device type.
    """
    shape = (dim, r) if side == "proj_left" else (r, dim)
    if like.device.type == "meta":
        P = torch.empty(shape, device="meta")
    else:
        g = torch.Generator(device=like.device).manual_seed(seed)
        P = torch.randn(shape, generator=g, device=like.device, dtype=torch.float32) / math.sqrt(r)
    P = P.to(like.dtype)
    return P if side == "proj_left" else P.T


def _random_source(G, k, seed, side, previous):
    """APOLLO's seeded Gaussian basis, no SVD. Seeds: the first refresh uses ``seed`` (derived from the
    optimizer seed and the parameter's position, like rsvd's); each later one apollo-torch's next_seed of
    the last seed used ("full" draws P, then Q from the next seed). No spectrum, so rank_policy "fixed"."""
    last = previous.get("proj_right_seed", previous.get("proj_left_seed"))
    start = seed if last is None else next_seed(last)
    seeds = {}
    if side in ("left", "full"):
        seeds["proj_left_seed"] = start
    if side in ("right", "full"):
        seeds["proj_right_seed"] = next_seed(start) if side == "full" else start
    U, V = (gaussian_basis(seeds[f"{key}_seed"], dim, k, key, G) if f"{key}_seed" in seeds else None
            for key, dim in (("proj_left", G.shape[0]), ("proj_right", G.shape[1])))
    return U, None, V, seeds


def dct_basis(index: torch.Tensor, dim: int, like: torch.Tensor) -> torch.Tensor:
    """Columns ``index`` of the orthonormal DCT-II basis of R^dim (dim x len(index)), in ``like``'s dtype.

    Column k is sqrt(2/dim) c_k cos(pi (2j+1) k / (2 dim)), j = 0..dim-1, c_0 = 1/sqrt(2), else 1; so
    G @ basis holds the DCT-II of G's rows. Computed in fp64 from exact integer phases ((2j+1) k mod
    4 dim), elementwise, so a column is the same bits whether built alone or in the full matrix.
    """
    j = torch.arange(dim, dtype=torch.float64, device=like.device)
    k = index.to(device=like.device, dtype=torch.float64)
    phase = torch.remainder(torch.outer(2.0 * j + 1.0, k), 4.0 * dim)
    B = torch.cos(phase * (math.pi / (2.0 * dim))) * math.sqrt(2.0 / dim)
    B = torch.where(k == 0, B * math.sqrt(0.5), B)
    return B.to(like.dtype)


def _dct_source(G, k, seed, side, previous):
    """The SVD-free basis of DCT-AdamW (IST-DASLab ``fft_low_rank``): the k columns of the DCT-II basis on
    which G has the largest l1 norm (its default ``ell_norm=1``), scored from one product with the full
    basis, G D (right) or D^T G (left). S holds the l2 norms of the chosen columns in that order, so the
    energy rank policy measures the energy they keep. The state stores only the column numbers."""
    U = V = S = None
    index = {}
    if side in ("left", "full"):
        scores = dct_basis(torch.arange(G.shape[0], device=G.device), G.shape[0], G).T @ G
        index["proj_left_index"] = torch.topk(scores.abs().sum(dim=1), k).indices
        U = dct_basis(index["proj_left_index"], G.shape[0], G)
        S = torch.linalg.vector_norm(scores[index["proj_left_index"]], dim=1)
    if side in ("right", "full"):
        scores = G @ dct_basis(torch.arange(G.shape[1], device=G.device), G.shape[1], G)
        index["proj_right_index"] = torch.topk(scores.abs().sum(dim=0), k).indices
        V = dct_basis(index["proj_right_index"], G.shape[1], G)
        S = torch.linalg.vector_norm(scores[:, index["proj_right_index"]], dim=0)
    return U, S, V, index


BASIS_SOURCES: dict[str, Callable] = {"svd": _svd_source, "rsvd": _rsvd_source, "warm": _warm_source,
                                      "random": _random_source, "dct": _dct_source}
# Sources that store what regenerates a basis, by state-key suffix: (proj_left|proj_right)_<suffix>.
REGENERATED: dict[str, Callable] = {
    "seed": lambda seed, dim, r, key, like: gaussian_basis(seed, dim, r, key, like),
    "index": lambda index, dim, r, key, like: dct_basis(index, dim, like),
}
COMPACT_KEYS = tuple(f"{key}_{suffix}" for key in BASIS_KEYS for suffix in REGENERATED)


# ---- 2. refresh policies ------------------------------------------------------------------------------
# ``due(state, group, grad, P, Q) -> (refresh?, state updates for this step)`` decides before the step and
# changes nothing; ``after(state, group, old, new)`` runs after a refresh has installed the new basis.
def _fixed_due(state, group, grad, P, Q):
    # galore-torch refreshes on the pre-increment step count: steps 0, T, 2T, ...
    return "refreshes" not in state or state["step"] % group["update_proj_gap"] == 0, {}


def _lazy_due(state, group, grad, P, Q):
    if "refreshes" not in state:
        return True, {}
    return state["step"] - state["last_refresh"] >= state.get("gap", group["update_proj_gap"]), {}


def subspace_similarity(old: torch.Tensor, new: torch.Tensor) -> float:
    """||old^T new||_F^2 / r in [0, 1]: the mean squared cosine of the principal angles.

    Q-GaLore compares only the first singular vector with a signed cosine, which an SVD sign flip hides;
    this measure sees the whole subspace and is sign-free.
    """
    r = min(old.shape[1], new.shape[1])
    return float((old.float().T @ new.float()).square().sum() / r)


def _lazy_after(state, group, old, new):
    key = "proj_left" if "proj_left" in new else "proj_right"
    if key not in old:
        return
    similar = subspace_similarity(old[key], new[key]) >= group["similarity_threshold"]
    streak = state.get("streak", 0) + 1 if similar else 0
    gap = state.get("gap", group["update_proj_gap"])
    if streak >= group["patience"]:
        gap, streak = gap * group["gap_growth"], 0
    state["gap"], state["streak"] = gap, streak


def _converged_due(state, group, grad, P, Q):
    """Refresh when ||R|| changed by less than ``convergence_tol`` (relative) since the previous step, or
    after ``update_proj_gap`` steps at most. Costs one extra projection and a host sync per step."""
    if "refreshes" not in state:
        return True, {}
    if state["step"] - state["last_refresh"] >= group["update_proj_gap"]:
        return True, {}
    norm = float(torch.linalg.norm(project(grad, P, Q).float()))
    previous = state.get("proj_norm")
    if previous is not None and abs(norm - previous) <= group["convergence_tol"] * previous:
        return True, {}
    return False, {"proj_norm": norm}


def _no_after(state, group, old, new):
    pass


REFRESH_POLICIES: dict[str, tuple[Callable, Callable]] = {
    "fixed": (_fixed_due, _no_after),
    "lazy": (_lazy_due, _lazy_after),
    "converged": (_converged_due, _no_after),
}


# ---- 3. moments at a switch: (state, old basis, new basis) -> None, in place on state ------------------
def _resize(t: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The leading block of ``t`` in a zero tensor of ``shape`` (rank changed, coordinates kept)."""
    if tuple(t.shape) == tuple(shape):
        return t
    out = t.new_zeros(shape)
    rows, cols = min(t.shape[0], shape[0]), min(t.shape[1], shape[1])
    out[:rows, :cols] = t[:rows, :cols]
    return out


def _keep_moments(state, old, new, shape):
    """galore-torch: moments carry on unchanged in the new basis (their shape follows a new rank)."""
    for key in MOMENT_KEYS:
        state[key] = _resize(state[key], shape)


def _zero_moments(state, old, new, shape):
    """FRUGAL: restart the moments, and their bias correction, at every switch."""
    for key in MOMENT_KEYS:
        state[key] = state[key].new_zeros(shape)
    state["moment_start"] = state["step"]


def _rotate_moments(state, old, new, shape):
    """AdaRankGrad: express the moments in the new basis.

    With T = P_new^T P_old (left; r_new x r_old), M <- T M. The second moment is a per-coordinate
    variance, so it is carried as the variance of the rotated coordinates under independence:
    V <- (T * T) V, which stays non-negative (rotating V like M could make it negative). Right-side
    bases act from the right (M <- M T^T with T = Q_new^T Q_old); "full" applies both.
    """
    m = state["exp_avg"].float()
    v = state["exp_avg_sq"].float()
    if "proj_left" in new:
        T = new["proj_left"].float().T @ old["proj_left"].float()
        m, v = T @ m, T.square() @ v
    if "proj_right" in new:
        T = new["proj_right"].float().T @ old["proj_right"].float()
        m, v = m @ T.T, v @ T.square().T
    state["exp_avg"] = m.to(state["exp_avg"].dtype)
    state["exp_avg_sq"] = v.to(state["exp_avg_sq"].dtype)


MOMENT_RULES: dict[str, Callable] = {"keep": _keep_moments, "zero": _zero_moments, "rotate": _rotate_moments}


# ---- 4. rank policies: (group, singular values, ||G||_F^2) -> rank -------------------------------------
def _fixed_rank(group, S, total_sq):
    return group["rank"]


def _energy_rank(group, S, total_sq):
    """Smallest r with ||G - G_r||_F <= xi ||G||_F, i.e. total - sum_{i<=r} s_i^2 <= xi^2 total.

    ``S`` holds the top max_rank singular values (randomized ones may slightly underestimate, which can
    only make the chosen rank larger); clamped to [min_rank, max_rank].
    """
    residual = total_sq - torch.cumsum(S.double().square(), 0)
    within = (residual <= group["energy_threshold"] ** 2 * total_sq).nonzero()
    r = int(within[0]) + 1 if len(within) else len(S)
    return min(max(r, group["min_rank"]), max_rank(group))


RANK_POLICIES: dict[str, Callable] = {"fixed": _fixed_rank, "energy": _energy_rank}


# ---- refresh ------------------------------------------------------------------------------------------
def refresh_seed(base_seed: int, param_index: int, refresh_count: int) -> int:
    """A seed that every data-parallel replica and every resumed run derives identically.

    Hashes (optimizer seed, parameter position, refresh count); Python's ``hash`` is salted per process,
    so a fixed hash is used instead.
    """
    digest = hashlib.blake2b(f"{base_seed}:{param_index}:{refresh_count}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # fits a signed int64 op argument


def refresh_due(state: dict, group: dict, grad2d: torch.Tensor) -> tuple[bool, dict]:
    """Is a new basis due before this step? Returns (due, state updates to apply if the step runs)."""
    # Only "converged" looks at the basis; rebuilding a seeded or DCT basis for the others would be waste.
    P, Q = basis_of(state, grad2d) if group["refresh_policy"] == "converged" else (None, None)
    return REFRESH_POLICIES[group["refresh_policy"]][0](state, group, grad2d, P, Q)


def compute_basis(grad2d: torch.Tensor, side: str, group: dict, seed: int, previous: dict,
                  factors: Optional[tuple] = None, sources: Optional[dict] = None) -> dict:
    """New basis tensors for ``side`` in the gradient's dtype (as galore-torch keeps it), and the rank.

    The factorisation runs in fp32 whatever the gradient's dtype. ``factors``: (U, S, V) the group's
    basis source already computed for this gradient and seed (the whole-model step batches the rsvd
    refreshes of same-shaped weights into one call); None computes it here. ``sources`` replaces
    BASIS_SOURCES (the FSDP2 path passes its sharded ones, with ``grad2d`` a distributed.fsdp.ShardedRows).
    """
    G = grad2d.float()
    U, S, V, *compact = factors if factors is not None else (sources or BASIS_SOURCES)[group["projector"]](
        G, max_rank(group), seed, side, previous)
    total_sq = float(G.double().square().sum()) if group["rank_policy"] == "energy" else 0.0
    r = RANK_POLICIES[group["rank_policy"]](group, S, total_sq)
    # Owned copies: a slice of the full SVD would keep (and checkpoint) the whole factor's storage. P keeps
    # its layout (LAPACK's U is column-major, as galore-torch's P is) and Q is row-major n x r (the layout
    # of galore-torch's Vh[:r].T), so the projection GEMMs round exactly as galore-torch's do.
    basis = {"rank": r}
    if side in ("left", "full"):
        basis["proj_left"] = U[:, :r].to(grad2d.dtype).clone()
    if side in ("right", "full"):
        basis["proj_right"] = V[:, :r].to(grad2d.dtype).clone(memory_format=torch.contiguous_format)
    for key, value in (compact[0] if compact else {}).items():  # seeds, or column numbers cut to rank r
        basis[key] = value[:r].clone() if isinstance(value, torch.Tensor) else value
    return basis


def refresh(state: dict, grad2d: torch.Tensor, group: dict, side: str, base_seed: int,
            param_index: int, factors: Optional[tuple] = None) -> None:
    """Recompute the basis from ``grad2d``, then apply the group's moments rule; mutates ``state``.

    ``factors``: see :func:`compute_basis` (they must come from ``refresh_seed(base_seed, param_index,
    state.get("refreshes", 0))``).
    """
    m, n = grad2d.shape
    count = state.get("refreshes", 0)
    old = basis_tensors(state, grad2d)
    new = compute_basis(grad2d, side, group, refresh_seed(base_seed, param_index, count), old, factors)
    if old and "exp_avg" in state:
        # quant.moment_rule: int8 moments are dequantised for the rule and requantised after it
        quant.moment_rule(MOMENT_RULES[group["moments_on_refresh"]], state, old, new,
                          lowrank_shape(side, m, n, new["rank"]))
    for key in BASIS_KEYS + COMPACT_KEYS:  # a projector changed between refreshes leaves nothing stale
        state.pop(key, None)
    # A regenerated source's basis is stored as its seed or column numbers only.
    state.update({k: v for k, v in new.items() if not any(f"{k}_{s}" in new for s in REGENERATED)})
    state["refreshes"] = count + 1
    state["last_refresh"] = state["step"]
    state.pop("proj_norm", None)  # the converged policy measures afresh in the new basis
    REFRESH_POLICIES[group["refresh_policy"]][1](state, group, old, new)


def basis_tensors(state: dict, grad2d: Optional[torch.Tensor] = None) -> dict:
    """The state's basis entries, with the matrices of regenerated sources rebuilt (needs ``grad2d``, the
    m x n gradient, for their sizes, device and dtype)."""
    out = {}
    for key in BASIS_KEYS:
        if key in state:
            out[key] = state[key]
        for suffix, regenerate in REGENERATED.items():
            compact = state.get(f"{key}_{suffix}")
            if compact is None:
                continue
            if grad2d is None:
                raise ValueError(f"the basis is stored as {key}_{suffix}: pass the gradient to rebuild it")
            out[f"{key}_{suffix}"] = compact
            out[key] = regenerate(compact, grad2d.shape[0 if key == "proj_left" else 1], state["rank"], key,
                                  grad2d)
    return out


def basis_of(state: dict, grad2d: Optional[torch.Tensor] = None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(P, Q) from the state: P is m x r, Q is n x r. Seeded and DCT bases are rebuilt from ``grad2d``."""
    basis = basis_tensors(state, grad2d)
    return basis.get("proj_left"), basis.get("proj_right")


def new_moments(shape: tuple, state_dtype: Optional[str], like: torch.Tensor) -> dict:
    """Zero moments of ``shape`` for a group's ``state_dtype`` (None: ``like``'s dtype), as state entries."""
    if state_dtype == "int8":
        return quant.zeros(shape, like.device)
    dtype = STATE_DTYPES[state_dtype] or like.dtype
    return {key: torch.zeros(shape, dtype=dtype, device=like.device) for key in MOMENT_KEYS}


def fused_supported(group: dict) -> bool:
    """Can the fused kernels run this group's step? Only the GaLore rule on float moments: the other update
    rules and int8 moments run the reference math on every backend (lowrank_kernels.update_rules)."""
    if group.get("state_dtype") == "int8":
        return False
    return "rank" not in group or (group.get("update", "galore") == "galore"
                                   and group.get("projector", "svd") in FUSED_PROJECTORS)
