"""Device-side helpers shared by the kernels: the tiled GEMM main loop, the per-tile epilogues (Adam moments,
the weight update), the elementwise AdamW step, and rounding to a storage dtype.

Every kernel, per-parameter or grouped, builds its math from these, so there is one copy of each formula.
"""
import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """``x`` (fp32) rounded to nearest-even in ``dtype``.

    Compiled triton rounds fp32 -> bf16 to nearest; the interpreter (triton 3.9) truncates, which would
    pull every bf16 value it stores toward zero by up to an ulp and make interpreter tests of bf16 measure
    the interpreter. Under it, the fp32 bits are rounded first so that the truncating cast is exact.
    """
    if INTERPRETER:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def tile_coords(pid, I, J, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, GROUP_I: tl.constexpr):
    """Tile ``pid``'s (row, column) in the I x J tile grid: row-major, swizzled so that GROUP_I row-blocks
    share each column panel of B while it is in L2."""
    tiles_i = tl.cdiv(I, BLOCK_I)
    tiles_j = tl.cdiv(J, BLOCK_J)
    per_group = GROUP_I * tiles_j
    first_i = (pid // per_group) * GROUP_I
    group_rows = tl.minimum(tiles_i - first_i, GROUP_I)
    pid_i = first_i + (pid % per_group) % group_rows
    pid_j = (pid % per_group) // group_rows
    return pid_i, pid_j


@triton.jit
def tile_matmul(pid, a_ptr, b_ptr, I, J, K, stride_ai, stride_ak, stride_bk, stride_bj,
                BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_I: tl.constexpr,
                PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """Tile ``pid`` (row-major over the I x J tile grid, swizzled) of C = A B (A is I x K, B is K x J, any
    strides), accumulated in fp32.

    Returns (acc, offs_i, offs_j) so the caller's epilogue addresses the same tile. The whole reduction
    runs here: the kernels' epilogues are nonlinear, so K is never split across programs. A per-parameter
    kernel passes its program id; a grouped kernel passes the tile's index within its problem.
    """
    acc, _, _, offs_i, offs_j = tile_matmul_ext(pid, a_ptr, b_ptr, a_ptr, I, J, K, stride_ai, stride_ak,
                                                stride_bk, stride_bj, BLOCK_I, BLOCK_J, BLOCK_K, GROUP_I,
                                                PRECISION, INTERPRETER, 0, 0)
    return acc, offs_i, offs_j


@triton.jit
def tile_matmul_ext(pid, a_ptr, b_ptr, x_ptr, I, J, K, stride_ai, stride_ak, stride_bk, stride_bj,
                    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_I: tl.constexpr,
                    PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, SECOND: tl.constexpr,
                    SQUARES: tl.constexpr):
    """tile_matmul with two optional extras, for the update rules (both 0: exactly tile_matmul's loop).

    SECOND: a second accumulator sharing one operand's loads: 1: X B (X replaces A, with A's strides),
    2: A X (X replaces B, with B's strides); Fira's P N and P R (left) or N Q^T and R Q^T (right).
    SQUARES: fp32 sums of squares over K of A's rows (1: a BLOCK_I vector) or of B's columns (2: a BLOCK_J
    vector), from the loads the dot already makes (the gradient's channel norms, no extra pass over G).
    Returns (acc, acc2, squares, offs_i, offs_j); the unused extras are 0.
    """
    pid_i, pid_j = tile_coords(pid, I, J, BLOCK_I, BLOCK_J, GROUP_I)
    # int64 offsets: a large weight (an embedding) has more than 2^31 elements.
    offs_i = (pid_i * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
    offs_j = (pid_j * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_i = offs_i < I
    mask_j = offs_j < J
    a_ptrs = a_ptr + offs_i[:, None] * stride_ai + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_j[None, :] * stride_bj
    if SECOND == 1:
        x_ptrs = x_ptr + offs_i[:, None] * stride_ai + offs_k[None, :] * stride_ak
    elif SECOND == 2:
        x_ptrs = x_ptr + offs_k[:, None] * stride_bk + offs_j[None, :] * stride_bj
    else:
        x_ptrs = x_ptr

    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    if SECOND != 0:
        acc2 = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    else:
        acc2 = 0.0
    if SQUARES == 1:
        squares = tl.zeros((BLOCK_I,), dtype=tl.float32)
    elif SQUARES == 2:
        squares = tl.zeros((BLOCK_J,), dtype=tl.float32)
    else:
        squares = 0.0
    # The full K blocks load without a K mask (only the I / J masks, constant along K, so an operand contiguous
    # along K keeps its vector loads and the loop stays pipelinable whatever K's divisibility); one masked
    # block takes the remainder. Same products in the same order as one masked loop: identical results.
    a_mask = mask_i[:, None]
    b_mask = mask_j[None, :]
    for k in range(0, K // BLOCK_K):
        acc, acc2, squares = _k_block(a_ptrs, b_ptrs, x_ptrs, a_mask, b_mask, offs_k, 0, acc, acc2, squares,
                                      PRECISION, INTERPRETER, SECOND, SQUARES, False)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        if SECOND == 1:
            x_ptrs += BLOCK_K * stride_ak
        elif SECOND == 2:
            x_ptrs += BLOCK_K * stride_bk
    # K - k_full keeps K's known divisibility (K % BLOCK_K would lose it under triton 3.6): the tail's mask
    # then still allows vector loads where K is a multiple of 8.
    k_full = (K // BLOCK_K) * BLOCK_K
    if k_full < K:
        acc, acc2, squares = _k_block(a_ptrs, b_ptrs, x_ptrs, a_mask, b_mask, offs_k, K - k_full, acc, acc2,
                                      squares, PRECISION, INTERPRETER, SECOND, SQUARES, True)
    return acc, acc2, squares, offs_i, offs_j


@triton.jit
def _k_block(a_ptrs, b_ptrs, x_ptrs, a_mask, b_mask, offs_k, k_left, acc, acc2, squares,
             PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, SECOND: tl.constexpr, SQUARES: tl.constexpr,
             MASK_K: tl.constexpr):
    """One BLOCK_K step of tile_matmul_ext's loop (its only copy): the products of one K block added to the
    accumulators. ``a_mask`` / ``b_mask``: the I / J bounds; MASK_K: also mask K at ``k_left`` (the tail)."""
    if MASK_K:
        a_mask = a_mask & (offs_k[None, :] < k_left)
        b_mask = (offs_k[:, None] < k_left) & b_mask
    a = tl.load(a_ptrs, mask=a_mask, other=0.0)
    b = tl.load(b_ptrs, mask=b_mask, other=0.0)
    if INTERPRETER:  # its bf16 dot is wrong; fp32 products of 16-bit values are exact
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    acc += tl.dot(a, b, input_precision=PRECISION)
    if SECOND == 1:
        x = tl.load(x_ptrs, mask=a_mask, other=0.0)
        if INTERPRETER:
            x = x.to(tl.float32)
        acc2 += tl.dot(x, b, input_precision=PRECISION)
    elif SECOND == 2:
        x = tl.load(x_ptrs, mask=b_mask, other=0.0)
        if INTERPRETER:
            x = x.to(tl.float32)
        acc2 += tl.dot(a, x, input_precision=PRECISION)
    if SQUARES == 1:
        a32 = a.to(tl.float32)
        squares += tl.sum(a32 * a32, axis=1)
    elif SQUARES == 2:
        b32 = b.to(tl.float32)
        squares += tl.sum(b32 * b32, axis=0)
    return acc, acc2, squares


@triton.jit
def adam_moments(r, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                 M_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
    """Adam's moment update on fp32 ``r``, ``m``, ``v``: returns (m, v) rounded to their storage dtypes and
    N = m / (sqrt(v) + eps) in fp32.

    N comes from the moments as stored, like galore-torch's: with fp16 moments a small r^2 underflows V to
    0 and N = M / eps, and a step computed from the unrounded V would be a different step. The 1 - beta
    arguments are computed in double by the host and rounded once: 1 - fp32(0.999) would be 1.3e-5 off.
    The fmas are torch's own rounding (``m.mul_(b1).add_(r, alpha=1-b1)`` is fma(1-b1, r, b1*m),
    ``v.mul_(b2).addcmul_(r, r, value=1-b2)`` is fma((1-b2)*r, r, b2*v), measured on CPU): fp32 moments
    come out bit-identical to the reference's, which 8-bit moments need (a code flips on one ulp at a
    midpoint), and compiled triton could otherwise contract either product into the add.
    """
    m = round_to(tl.fma(one_minus_beta1, r, beta1 * m), M_DTYPE, INTERPRETER)
    v = round_to(tl.fma(one_minus_beta2 * r, r, beta2 * v), V_DTYPE, INTERPRETER)
    n = m.to(tl.float32) / (tl.sqrt(v.to(tl.float32)) + eps)
    return m, v, n


@triton.jit
def decoupled_update(w, u, alpha, decay, HAS_DECAY: tl.constexpr):
    """galore-torch's order in fp32: w - alpha * u, then w + w * decay (decay = -lr * wd).

    A zero decay leaves w untouched, as the reference skips the decay at wd == 0 (w + w * 0 would turn an
    infinite w into nan); grouped kernels, whose problems' decays are only known on the device, rely on it.
    """
    w = w - alpha * u
    if HAS_DECAY:
        w = tl.where(decay != 0.0, w + w * decay, w)
    return w


@triton.jit
def adam_tile_epilogue(acc, offs_i, offs_j, I, J, m_ptr, v_ptr, n_ptr,
                       stride_mi, stride_mj, stride_vi, stride_vj, stride_ni, stride_nj,
                       beta1, one_minus_beta1, beta2, one_minus_beta2, eps, INTERPRETER: tl.constexpr):
    """Kernel (a)'s epilogue on one finished tile ``acc`` of R: update the moments in place, write N.
    Returns (R, N) in fp32, each rounded to the gradient's dtype exactly as used/stored."""
    mask = (offs_i < I)[:, None] & (offs_j < J)[None, :]
    # R is defined in the gradient's dtype (galore-torch's P^T G returns it so): round once, then do the
    # moment math in fp32 whatever dtype the moments are stored in.
    r = round_to(acc, n_ptr.dtype.element_ty, INTERPRETER).to(tl.float32)
    m_ptrs = m_ptr + offs_i[:, None] * stride_mi + offs_j[None, :] * stride_mj
    v_ptrs = v_ptr + offs_i[:, None] * stride_vi + offs_j[None, :] * stride_vj
    m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
    m, v, n = adam_moments(r, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                           m_ptr.dtype.element_ty, v_ptr.dtype.element_ty, INTERPRETER)
    tl.store(m_ptrs, m, mask=mask)
    tl.store(v_ptrs, v, mask=mask)
    n_ptrs = n_ptr + offs_i[:, None] * stride_ni + offs_j[None, :] * stride_nj
    n = round_to(n, n_ptr.dtype.element_ty, INTERPRETER)
    tl.store(n_ptrs, n, mask=mask)
    return r, n.to(tl.float32)  # R and N as stored (the update rules' norms read these values)


@triton.jit
def update_tile_epilogue(acc, offs_i, offs_j, I, J, w_ptr, stride_wi, stride_wj, alpha, decay,
                         HAS_DECAY: tl.constexpr, INTERPRETER: tl.constexpr):
    """Kernel (b)'s epilogue on one finished tile ``acc`` of the back-projection: update W in place, in
    fp32, rounded once to W's dtype at the store."""
    mask = (offs_i < I)[:, None] & (offs_j < J)[None, :]
    w_ptrs = w_ptr + offs_i[:, None] * stride_wi + offs_j[None, :] * stride_wj
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    w = decoupled_update(w, acc, alpha, decay, HAS_DECAY)
    tl.store(w_ptrs, round_to(w, w_ptr.dtype.element_ty, INTERPRETER), mask=mask)


@triton.jit
def adamw_elements(w_ptrs, g_ptrs, m_ptrs, v_ptrs, mask, beta1, one_minus_beta1, beta2, one_minus_beta2,
                   eps, alpha, decay, HAS_DECAY: tl.constexpr, INTERPRETER: tl.constexpr):
    """The unprojected AdamW step on a block of elements (pointer blocks of w, g, m, v), in place.

    As in the projected step, N is rounded to the gradient's dtype (the step contract defines it so)
    before the update.
    """
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
    m, v, n = adam_moments(g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                           m_ptrs.dtype.element_ty, v_ptrs.dtype.element_ty, INTERPRETER)
    tl.store(m_ptrs, m, mask=mask)
    tl.store(v_ptrs, v, mask=mask)
    n = round_to(n, g_ptrs.dtype.element_ty, INTERPRETER).to(tl.float32)
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    w = decoupled_update(w, n, alpha, decay, HAS_DECAY)
    tl.store(w_ptrs, round_to(w, w_ptrs.dtype.element_ty, INTERPRETER), mask=mask)
