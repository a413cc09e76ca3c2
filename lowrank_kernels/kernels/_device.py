"""Device-side helpers shared by the kernels: the tiled GEMM main loop, and rounding to a storage dtype."""
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
def tile_matmul(a_ptr, b_ptr, I, J, K, stride_ai, stride_ak, stride_bk, stride_bj,
                BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_I: tl.constexpr,
                PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """This program's tile of C = A B (A is I x K, B is K x J, any strides), accumulated in fp32.

    Returns (acc, offs_i, offs_j) so the caller's epilogue addresses the same tile. The whole reduction
    runs here: the kernels' epilogues are nonlinear, so K is never split across programs.
    """
    # Grouped tile order: GROUP_I row-blocks share each column panel of B while it is in L2.
    pid = tl.program_id(0)
    tiles_i = tl.cdiv(I, BLOCK_I)
    tiles_j = tl.cdiv(J, BLOCK_J)
    per_group = GROUP_I * tiles_j
    first_i = (pid // per_group) * GROUP_I
    group_rows = tl.minimum(tiles_i - first_i, GROUP_I)
    pid_i = first_i + (pid % per_group) % group_rows
    pid_j = (pid % per_group) // group_rows

    # int64 offsets: a large weight (an embedding) has more than 2^31 elements.
    offs_i = (pid_i * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
    offs_j = (pid_j * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_i = offs_i < I
    mask_j = offs_j < J
    a_ptrs = a_ptr + offs_i[:, None] * stride_ai + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_j[None, :] * stride_bj

    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_i[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_j[None, :], other=0.0)
        if INTERPRETER:  # its bf16 dot is wrong; fp32 products of 16-bit values are exact
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc, offs_i, offs_j
