"""The unprojected step (no basis): galore-torch's plain AdamW as one fused elementwise kernel.

Per element, in fp32, with the same rules as the projected path (reference.galore_step with P = Q = None):

    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2;   n = m / (sqrt(v) + eps) rounded to g's dtype
    w <- w - (step_size * scale) * n;   then, if weight decay is on, w <- w + w * (-lr * wd)

so backend="triton" covers every parameter (biases, norms, embeddings kept out of projection) with one
pass over w, g, m, v instead of the reference's chain of full-size element-wise ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._device import adamw_elements

BLOCK = 1024


@triton.jit
def _adamw_kernel(
    w_ptr, g_ptr, m_ptr, v_ptr,
    numel,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, alpha, decay,
    BLOCK: tl.constexpr, HAS_DECAY: tl.constexpr, INTERPRETER: tl.constexpr,
):
    # int64 offsets: an embedding can have more than 2^31 elements.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    adamw_elements(w_ptr + offs, g_ptr + offs, m_ptr + offs, v_ptr + offs, offs < numel,
                   beta1, one_minus_beta1, beta2, one_minus_beta2, eps, alpha, decay, HAS_DECAY, INTERPRETER)


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 *, beta1: float, beta2: float, eps: float, step_size: float, scale: float, lr: float,
                 weight_decay: float) -> None:
    """One AdamW step in place on ``param``, ``exp_avg`` and ``exp_avg_sq`` (all of ``grad``'s shape).

    The kernel walks memory linearly, so it needs contiguous tensors. The gradient is copied if it is not
    (a read-only extra pass); a non-contiguous param or moment (a channels_last weight) is updated in a
    contiguous copy that is written back: correct, at the cost of the extra passes, for a layout that
    is rare outside projected groups.
    """
    tensors = dict(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    _launch.check_operands(**tensors)
    for name, t in tensors.items():
        _launch.check_shape(name, t, param.shape)
    if param.numel() == 0:
        return
    g = grad.contiguous()
    w, m, v = (t.contiguous() for t in (param, exp_avg, exp_avg_sq))
    grid = (triton.cdiv(param.numel(), BLOCK),)
    with _launch.on_device(param.device):
        _adamw_kernel[grid](
            w, g, m, v,
            param.numel(),
            # 1 - beta in double, then rounded: 1 - fp32(0.999) in the kernel would be 1.3e-5 off
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, step_size * scale, -lr * weight_decay,
            BLOCK=BLOCK, HAS_DECAY=weight_decay > 0.0, INTERPRETER=_launch.interpreted(_adamw_kernel),
            num_warps=4,
        )
    for updated, target in ((w, param), (m, exp_avg), (v, exp_avg_sq)):
        if updated is not target:
            target.copy_(updated)
