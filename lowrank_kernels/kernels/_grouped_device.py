"""Device-side helpers of the grouped kernels: reading a problem's pointers, sizes and strides from its
table row.

A grouped kernel gets one int64 row per problem (see _tables.py); a pointer is stored as an integer and
cast to a typed pointer here. Three launch-wide facts the host established for every problem of the launch
turn into compiler knowledge here, since values loaded from memory carry none (a per-parameter launch gets
them from triton's argument specialisation): a unit stride (LAYOUT 1: the second dimension's stride is 1,
LAYOUT 2: the first's), which makes loads contiguous; ALIGNED (every pointer 16-byte aligned, every
stride a multiple of 8 elements), which lets them be vectorised; and DIMS8 (which of I, J, K are
multiples of 8 elements), which lets the bounds masks keep them vectorised.

The last one decides whether the GEMM is pipelined at all. A load's vector width is capped by the
constancy of its mask along the contiguous axis, and a mask ``offs < I`` with an I of unknown
divisibility is constant over 1 element: every load and store of the tile becomes a 2-byte access, and
triton's pipeliner skips loads narrower than the 4 bytes cp.async needs, so the K loop ran unpipelined
(compiled for sm_90: 32 KB of shared memory at 3 requested stages, against 96 KB for the per-parameter
kernels, whose int arguments triton marks divisible by 16 at launch).
"""
import triton
import triton.language as tl


@triton.jit
def row_pointer(row_ptr, col: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(row_ptr + col).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def row_dims(row_ptr, col: tl.constexpr, DIMS8: tl.constexpr):
    """(I, J, K) stored at ``col``..``col + 2``, as int32 (dims fit 32 bits; an int64 loop bound defeats
    pipelining). Bits 1, 2, 4 of DIMS8: I, J, K is a multiple of 8 in every problem of the launch (8
    elements: a 16-byte vector of 16-bit data, 32 bytes of fp32)."""
    I = tl.load(row_ptr + col).to(tl.int32)
    J = tl.load(row_ptr + col + 1).to(tl.int32)
    K = tl.load(row_ptr + col + 2).to(tl.int32)
    if DIMS8 & 1:
        I = tl.multiple_of(I, 8)
    if DIMS8 & 2:
        J = tl.multiple_of(J, 8)
    if DIMS8 & 4:
        K = tl.multiple_of(K, 8)
    return I, J, K


@triton.jit
def row_strides(row_ptr, col: tl.constexpr, LAYOUT: tl.constexpr, ALIGNED: tl.constexpr):
    """The (first, second) strides stored at ``col`` and ``col + 1``; the unit one as a constant."""
    if LAYOUT == 1:
        s0 = tl.load(row_ptr + col)
        if ALIGNED:
            s0 = tl.multiple_of(s0, 8)
        return s0, 1
    elif LAYOUT == 2:
        s1 = tl.load(row_ptr + col + 1)
        if ALIGNED:
            s1 = tl.multiple_of(s1, 8)
        return 1, s1
    else:
        s0 = tl.load(row_ptr + col)
        s1 = tl.load(row_ptr + col + 1)
        if ALIGNED:
            s0 = tl.multiple_of(s0, 8)
            s1 = tl.multiple_of(s1, 8)
        return s0, s1


@triton.jit
def problem_row(table_ptr, tile_problem_ptr, COLS: tl.constexpr):
    """This program's problem: its table row (pointer to COLS int64s) from the tile -> problem map."""
    problem = tl.load(tile_problem_ptr + tl.program_id(0)).to(tl.int64)
    return table_ptr + problem * COLS
