"""Device-side helper shared by the kernels: rounding fp32 results to their storage dtype."""
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
