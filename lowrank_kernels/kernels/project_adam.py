"""Kernel (a): the projection GEMM with the Adam moment update in its epilogue.

R = P^T G (left, P m x r) or R = G Q (right, Q n x r) is computed tile by tile with fp32 accumulation;
each finished R tile updates its tile of the moments in place and writes N = M / (sqrt(V) + eps):

    M <- b1 M + (1 - b1) R;   V <- b2 V + (1 - b2) R^2;   N = M / (sqrt(V) + eps)

The kernel sees one generic product C = A B with A (I x K) and B (K x J) given by pointer and strides:
left is A = P^T (P's strides swapped, no transpose materialised), B = G; right is A = G, B = Q. The whole
reduction runs in one program per output tile: split-K would apply the nonlinear epilogue to partial sums.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _launch
from ._device import adam_tile_epilogue, tile_matmul


@triton.jit
def _project_adam_kernel(
    a_ptr, b_ptr, m_ptr, v_ptr, n_ptr,
    I, J, K,
    stride_ai, stride_ak, stride_bk, stride_bj,
    stride_mi, stride_mj, stride_vi, stride_vj, stride_ni, stride_nj,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_I: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    acc, offs_i, offs_j = tile_matmul(tl.program_id(0), a_ptr, b_ptr, I, J, K,
                                      stride_ai, stride_ak, stride_bk, stride_bj,
                                      BLOCK_I, BLOCK_J, BLOCK_K, GROUP_I, PRECISION, INTERPRETER)
    adam_tile_epilogue(acc, offs_i, offs_j, I, J, m_ptr, v_ptr, n_ptr,
                       stride_mi, stride_mj, stride_vi, stride_vj, stride_ni, stride_nj,
                       beta1, one_minus_beta1, beta2, one_minus_beta2, eps, INTERPRETER)


def project_adam(grad: torch.Tensor, P: Optional[torch.Tensor], Q: Optional[torch.Tensor],
                 exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, beta1: float, beta2: float,
                 eps: float) -> torch.Tensor:
    """Project ``grad`` with exactly one of P (left) or Q (right), update the moments in place, return N.

    N has the low-rank shape (r x n left, m x r right) and the gradient's dtype; the moments may have any
    float dtype and strides. ``grad``, P and Q are read through their strides: a non-contiguous gradient
    (a transposed or sliced view) costs nothing extra, and copying it would add a full-size pass.
    """
    basis = _launch.one_sided_basis("project_adam", P, Q, "grad", grad=grad, exp_avg=exp_avg,
                                    exp_avg_sq=exp_avg_sq)
    m, n = grad.shape
    r = basis.shape[1]
    if P is not None:
        _launch.check_shape("P", P, (m, r))
        I, J, K = r, n, m
        a, sa_i, sa_k = P, P.stride(1), P.stride(0)  # A = P^T, read through swapped strides
        b, sb_k, sb_j = grad, grad.stride(0), grad.stride(1)
    else:
        _launch.check_shape("Q", Q, (n, r))
        I, J, K = m, r, n
        a, sa_i, sa_k = grad, grad.stride(0), grad.stride(1)
        b, sb_k, sb_j = Q, Q.stride(0), Q.stride(1)
    _launch.check_shape("exp_avg", exp_avg, (I, J))
    _launch.check_shape("exp_avg_sq", exp_avg_sq, (I, J))
    N = torch.empty((I, J), dtype=grad.dtype, device=grad.device)
    if N.numel() == 0:
        return N
    cfg = _launch.gemm_config(I, J, K, grad.dtype, grad.device)
    grid = (triton.cdiv(I, cfg["BLOCK_I"]) * triton.cdiv(J, cfg["BLOCK_J"]),)
    with _launch.on_device(grad.device):
        _project_adam_kernel[grid](
            a, b, exp_avg, exp_avg_sq, N,
            I, J, K,
            sa_i, sa_k, sb_k, sb_j,
            exp_avg.stride(0), exp_avg.stride(1), exp_avg_sq.stride(0), exp_avg_sq.stride(1),
            N.stride(0), N.stride(1),
            # 1 - beta in double, then rounded: 1 - fp32(0.999) in the kernel would be 1.3e-5 off
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
            PRECISION=_launch.dot_precision(grad.dtype),
            INTERPRETER=_launch.interpreted(_project_adam_kernel),
            **cfg,
        )
    return N
