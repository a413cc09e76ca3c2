"""Device-side helpers of the grouped kernels: reading a problem's pointers and strides from its table row.

A grouped kernel gets one int64 row per problem (see _tables.py); a pointer is stored as an integer and
cast to a typed pointer here. Two launch-wide facts the host established for every problem of the launch
turn into compiler knowledge here, since values loaded from memory carry none (a per-parameter launch gets
them from triton's argument specialisation): a unit stride (LAYOUT 1: the second dimension's stride is 1,
LAYOUT 2: the first's), which makes loads contiguous, and ALIGNED (every pointer 16-byte aligned, every
stride a multiple of 8 elements), which lets them be vectorised.
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
