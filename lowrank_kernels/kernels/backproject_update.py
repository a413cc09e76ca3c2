"""Kernel (b): the back-projection GEMM with the weight update in its epilogue, in place on W.

U = P N (left) or N Q^T (right) is accumulated in fp32 tile by tile; the W tile is then updated in fp32
in galore-torch's order and rounded once to W's dtype at the store:

    w <- w - (step_size * scale) * u;   then, if weight decay is on, w <- w + w * (-lr * wd)

The full-size update U is never written to memory: W is read once and written once, which (with the
gradient read once by kernel (a)) is the three-pass bandwidth floor of a projected step. As in kernel (a),
the product is a generic C = A B through strides: left A = P, B = N; right A = N, B = Q^T (Q's strides
swapped).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _launch
from ._device import tile_matmul, update_tile_epilogue


@triton.jit
def _backproject_update_kernel(
    w_ptr, a_ptr, b_ptr,
    I, J, K,
    stride_wi, stride_wj, stride_ai, stride_ak, stride_bk, stride_bj,
    alpha, decay,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_I: tl.constexpr,
    HAS_DECAY: tl.constexpr, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    acc, offs_i, offs_j = tile_matmul(tl.program_id(0), a_ptr, b_ptr, I, J, K,
                                      stride_ai, stride_ak, stride_bk, stride_bj,
                                      BLOCK_I, BLOCK_J, BLOCK_K, GROUP_I, PRECISION, INTERPRETER)
    update_tile_epilogue(acc, offs_i, offs_j, I, J, w_ptr, stride_wi, stride_wj, alpha, decay,
                         HAS_DECAY, INTERPRETER)


def backproject_update(param: torch.Tensor, N: torch.Tensor, P: Optional[torch.Tensor],
                       Q: Optional[torch.Tensor], *, step_size: float, scale: float, lr: float,
                       weight_decay: float) -> None:
    """W <- W - step_size * scale * (P N | N Q^T), then galore's decoupled decay; in place on ``param``.

    Exactly one of P (left, N is r x n) or Q (right, N is m x r). ``param`` may have any strides and may
    differ in dtype from N and the basis (which share one dtype).
    """
    basis = _launch.one_sided_basis("backproject_update", P, Q, "N", param=param, N=N)
    m, n = param.shape
    r = basis.shape[1]
    if P is not None:
        _launch.check_shape("P", P, (m, r))
        _launch.check_shape("N", N, (r, n))
        a, sa_i, sa_k = P, P.stride(0), P.stride(1)
        b, sb_k, sb_j = N, N.stride(0), N.stride(1)
    else:
        _launch.check_shape("Q", Q, (n, r))
        _launch.check_shape("N", N, (m, r))
        a, sa_i, sa_k = N, N.stride(0), N.stride(1)
        b, sb_k, sb_j = Q, Q.stride(1), Q.stride(0)  # B = Q^T, read through swapped strides
    if param.numel() == 0:
        return
    cfg = _launch.gemm_config(m, n, r, N.dtype, param.device)
    grid = (triton.cdiv(m, cfg["BLOCK_I"]) * triton.cdiv(n, cfg["BLOCK_J"]),)
    with _launch.on_device(param.device):
        _backproject_update_kernel[grid](
            param, a, b,
            m, n, r,
            param.stride(0), param.stride(1), sa_i, sa_k, sb_k, sb_j,
            step_size * scale, -lr * weight_decay,
            # whether decay applies is structural (galore skips it at wd == 0); its value stays runtime
            HAS_DECAY=weight_decay > 0.0,
            PRECISION=_launch.dot_precision(N.dtype),
            INTERPRETER=_launch.interpreted(_backproject_update_kernel),
            **cfg,
        )
