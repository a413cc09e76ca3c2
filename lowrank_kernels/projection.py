"""The projection bases: orientation, where a basis comes from, when it is refreshed, and what a refresh
does to the rest of the state.

Each strategy axis of the design brief is a small registry of plain functions keyed by name, so a new
method (a new basis source, refresh rule, moments rule, rank rule) is one function and one entry:

1. basis source     ``BASIS_SOURCES``      (group key ``projector``): "svd" (exact, galore-torch), "rsvd"
2. refresh policy   ``REFRESH_POLICIES``   "fixed": every ``update_proj_gap`` steps (galore-torch)
3. moments at switch ``MOMENT_RULES``      "keep": moments stay as they are (galore-torch)
4. rank policy      ``RANK_POLICIES``      "fixed": the group's ``rank``
5. output map       the step math in reference.py (``P N``)
6. state precision  ``STATE_DTYPES``       (group key ``state_dtype``): None keeps the gradient's dtype

The basis of a projected parameter lives in its optimizer state as plain tensors: ``proj_left`` (P, m x r)
and/or ``proj_right`` (Q, n x r; galore-torch keeps Q^T), plus the integer ``refreshes``. Nothing in the state is a Python object,
so checkpoints load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Optional

import torch

from .linalg import rsvd

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
BASIS_KEYS = ("proj_left", "proj_right")
STATE_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


# ---- 1. basis sources: fp32 gradient -> (U m x r, V n x r) --------------------------------------------
def _svd_factors(G: torch.Tensor, r: int, seed: int):
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return U[:, :r], Vh[:r].T


def _rsvd_factors(G: torch.Tensor, r: int, seed: int):
    U, _, V = rsvd(G, r, seed=seed)
    return U, V


BASIS_SOURCES: dict[str, Callable] = {"svd": _svd_factors, "rsvd": _rsvd_factors}


# ---- 2. refresh policies: is a new basis due before this step? -----------------------------------------
def _fixed_gap(state: dict, group: dict) -> bool:
    # galore-torch refreshes on the pre-increment step count: steps 0, T, 2T, ...
    return "refreshes" not in state or state["step"] % group["update_proj_gap"] == 0


REFRESH_POLICIES: dict[str, Callable] = {"fixed": _fixed_gap}


# ---- 3. moments at a switch ---------------------------------------------------------------------------
def _keep_moments(state: dict, old_basis: dict, new_basis: dict) -> None:
    """galore-torch: moments accumulated in the old basis carry on unchanged in the new one."""


MOMENT_RULES: dict[str, Callable] = {"keep": _keep_moments}


# ---- 4. rank policies ---------------------------------------------------------------------------------
def _fixed_rank(group: dict, m: int, n: int) -> int:
    return group["rank"]


RANK_POLICIES: dict[str, Callable] = {"fixed": _fixed_rank}


# ---- refresh ------------------------------------------------------------------------------------------
def refresh_seed(base_seed: int, param_index: int, refresh_count: int) -> int:
    """A seed that every data-parallel replica and every resumed run derives identically.

    Hashes (optimizer seed, parameter position, refresh count); Python's ``hash`` is salted per process,
    so a fixed hash is used instead.
    """
    digest = hashlib.blake2b(f"{base_seed}:{param_index}:{refresh_count}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # fits a signed int64 op argument


def refresh_due(state: dict, group: dict) -> bool:
    return REFRESH_POLICIES["fixed"](state, group)


def compute_basis(grad2d: torch.Tensor, side: str, rank: int, source: str, seed: int) -> dict:
    """New basis tensors for ``side`` from the gradient, in the gradient's dtype (as galore-torch keeps it).

    The factorisation runs in fp32 whatever the gradient's dtype.
    """
    U, V = BASIS_SOURCES[source](grad2d.float(), rank, seed)
    # Owned copies: a slice of the full SVD would keep (and checkpoint) the whole factor's storage. P keeps
    # its layout (LAPACK's U is column-major, as galore-torch's P is) and Q is row-major n x r (the layout
    # of galore-torch's Vh[:r].T), so the projection GEMMs round exactly as galore-torch's do.
    basis = {}
    if side in ("left", "full"):
        basis["proj_left"] = U.to(grad2d.dtype).clone()
    if side in ("right", "full"):
        basis["proj_right"] = V.to(grad2d.dtype).clone(memory_format=torch.contiguous_format)
    return basis


def refresh(state: dict, grad2d: torch.Tensor, group: dict, side: str, base_seed: int,
            param_index: int) -> None:
    """Recompute the basis from ``grad2d`` and apply the group's moments rule; mutates ``state``."""
    m, n = grad2d.shape
    count = state.get("refreshes", 0)
    rank = RANK_POLICIES["fixed"](group, m, n)
    seed = refresh_seed(base_seed, param_index, count)
    new_basis = compute_basis(grad2d, side, rank, group["projector"], seed)
    old_basis = {k: state[k] for k in BASIS_KEYS if k in state}
    MOMENT_RULES["keep"](state, old_basis, new_basis)
    state.update(new_basis)
    state["refreshes"] = count + 1


def basis_of(state: dict) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(P, Q) from the state: P is m x r, Q is n x r."""
    return state.get("proj_left"), state.get("proj_right")
