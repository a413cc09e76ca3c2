"""Compile the Triton kernels for real GPUs on a machine without one (run by test_kernels_compile.py).

triton's ahead-of-time compiler lowers a kernel to PTX and cubin for a target architecture with no
device present. The interpreter tests check the kernels' math; this checks that the compiled path
builds: tl.dot on tensor cores for every operand dtype, input_precision, the masks and casts, and the
tile configs the launchers pick. Run without TRITON_INTERPRET (it would make triton.jit interpret).

    python tests/aot_compile.py        # prints one line per compiled kernel; exits 1 on any failure
    python tests/aot_compile.py rule   # only the cases whose label contains "rule"
"""
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET") != "1", "unset TRITON_INTERPRET: the interpreter cannot compile"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lowrank_kernels.kernels import _launch  # noqa: E402
from lowrank_kernels.kernels.adamw import BLOCK, _adamw_kernel  # noqa: E402
from lowrank_kernels.kernels.backproject_update import _backproject_update_kernel  # noqa: E402
from lowrank_kernels.kernels.grouped_backproject_update import _grouped_backproject_update_kernel  # noqa: E402
from lowrank_kernels.kernels.grouped_int8_adam import BLOCKS_PER_PROGRAM, _grouped_int8_adam_kernel  # noqa: E402
from lowrank_kernels.kernels.grouped_project_adam import _grouped_project_adam_kernel  # noqa: E402
from lowrank_kernels.kernels.grouped_rule_scales import BLOCK_C, GAMMA, _grouped_rule_scales_kernel  # noqa: E402
from lowrank_kernels.kernels.multi_tensor_adamw import BLOCK as MT_BLOCK  # noqa: E402
from lowrank_kernels.kernels.multi_tensor_adamw import _multi_tensor_adamw_kernel  # noqa: E402
from lowrank_kernels.kernels._tables import TL_DTYPE  # noqa: E402
from lowrank_kernels.kernels.project_adam import _project_adam_kernel  # noqa: E402
from lowrank_kernels.kernels.step_scalars import BLOCK as STEP_BLOCK  # noqa: E402
from lowrank_kernels.kernels.step_scalars import _advance_step_scalars_kernel  # noqa: E402

TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
               torch.int32: "i32", torch.float64: "fp64"}
# the grouped kernels' tables: per-problem rows (int64), the tile -> problem map (int32), fp32 scalars
TABLES = dict(table_ptr=torch.int64, tile_problem_ptr=torch.int32, hyper_ptr=torch.float32,
              scalars_ptr=torch.float32)
SCALARS = {"beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "alpha", "decay"}
M, N, R = 4096, 11008, 512  # a LLaMA-7B MLP weight at rank 512: the launchers' largest tiles


def compile_kernel(kernel, pointers: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    # constexprs with defaults (the update rules' flags) compile at their defaults unless a case sets them
    constexprs = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}, **constexprs}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + TRITON_TYPE[pointers[name]]
        else:
            signature[name] = "fp32" if name in SCALARS else "i32"
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def gemm_constexprs(I, J, K, dtype, **extra):
    cfg = _launch.gemm_config(I, J, K, dtype, torch.device("cpu"))
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    return {**cfg, "PRECISION": _launch.dot_precision(dtype), "INTERPRETER": False, **extra}, warps, stages


def cases():
    """(label, kernel, pointer dtypes, constexprs, arch, warps, stages)."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    for arch in (90, 80):
        # kernel (a), left orientation (I = r, J = n, K = m): gradient/basis dtype, moments dtype
        for grad, moments in ((bf16, bf16), (bf16, fp32), (fp16, fp16), (fp32, fp32)):
            if arch == 80 and grad != bf16:
                continue
            cx, w, s = gemm_constexprs(R, N, M, grad)
            ptrs = dict(a_ptr=grad, b_ptr=grad, m_ptr=moments, v_ptr=moments, n_ptr=grad)
            yield f"project_adam grad={grad} moments={moments}", _project_adam_kernel, ptrs, cx, arch, w, s
        # kernel (b), left orientation (I = m, J = n, K = r): weight dtype, basis/N dtype
        for weight, basis in ((bf16, bf16), (fp32, bf16), (fp16, fp16), (fp32, fp32)):
            if arch == 80 and weight != bf16:
                continue
            cx, w, s = gemm_constexprs(M, N, R, basis, HAS_DECAY=True)
            ptrs = dict(w_ptr=weight, a_ptr=basis, b_ptr=basis)
            yield f"backproject_update weight={weight} basis={basis}", _backproject_update_kernel, ptrs, cx, arch, w, s
    for dtype in (bf16, fp16, fp32):
        ptrs = dict(w_ptr=dtype, g_ptr=dtype, m_ptr=dtype, v_ptr=dtype)
        yield f"adamw {dtype}", _adamw_kernel, ptrs, dict(BLOCK=BLOCK, HAS_DECAY=True, INTERPRETER=False), 90, 4, 1
    yield from grouped_cases()


def grouped_project_case(side, dtype, moments, aligned=True, K_ODD=False):
    """Kernel (a) grouped, LLaMA shapes, contiguous tensors: left reads A = P^T (unit stride along I).
    K_ODD: K = 5461 (LLaMA-1B's MLP size) with rows padded to a multiple of 8, so DIMS8 lacks only K."""
    I, J, K = (R, N, M) if side == "left" else (M, R, N)
    K = 5461 if K_ODD else K
    unit = 1 if aligned else 0
    layouts = dict(A_LAYOUT=(2 if side == "left" else 1) * unit, B_LAYOUT=unit, M_LAYOUT=unit, V_LAYOUT=unit,
                   N_LAYOUT=unit)
    cx, w, s = gemm_constexprs(I, J, K, dtype, DTYPE=TL_DTYPE[dtype], M_DTYPE=TL_DTYPE[moments],
                               V_DTYPE=TL_DTYPE[moments], ALIGNED=aligned,
                               DIMS8=(3 if K_ODD else 7) if aligned else 0,
                               **layouts)
    return _grouped_project_adam_kernel, TABLES, cx, w, s


def grouped_update_case(side, weight, basis, aligned=True):
    """Kernel (b) grouped, LLaMA shapes: right reads B = Q^T (unit stride along K)."""
    unit = 1 if aligned else 0
    layouts = dict(W_LAYOUT=unit, A_LAYOUT=unit, B_LAYOUT=(1 if side == "left" else 2) * unit)
    cx, w, s = gemm_constexprs(M, N, R, basis, DTYPE=TL_DTYPE[basis], W_DTYPE=TL_DTYPE[weight], ALIGNED=aligned,
                               DIMS8=7 if aligned else 0, **layouts)
    return _grouped_backproject_update_kernel, TABLES, cx, w, s


def multi_tensor_adamw_case(dtype, aligned=True):
    cx = dict(W_DTYPE=TL_DTYPE[dtype], G_DTYPE=TL_DTYPE[dtype], M_DTYPE=TL_DTYPE[dtype], V_DTYPE=TL_DTYPE[dtype],
              ALIGNED=aligned, BLOCK=MT_BLOCK, INTERPRETER=False)
    return _multi_tensor_adamw_kernel, TABLES, cx, 4, 1


def int8_adam_case(projected, dtype, aligned=True):
    cx = dict(X_DTYPE=TL_DTYPE[dtype], Y_DTYPE=TL_DTYPE[dtype], PROJECTED=projected, ALIGNED=aligned,
              BLOCKS=BLOCKS_PER_PROGRAM, INTERPRETER=False)
    return _grouped_int8_adam_kernel, dict(TABLES, maps_ptr=torch.float32), cx, 4, 1


def grouped_cases():
    bf16, fp32 = torch.bfloat16, torch.float32
    for arch in (90, 80):
        for side in ("left", "right"):
            k, p, cx, w, s = grouped_project_case(side, bf16, bf16)
            yield f"grouped_project_adam {side} bf16", k, p, cx, arch, w, s
            k, p, cx, w, s = grouped_update_case(side, bf16, bf16)
            yield f"grouped_backproject_update {side} bf16", k, p, cx, arch, w, s
    k, p, cx, w, s = grouped_project_case("left", fp32, fp32)
    yield "grouped_project_adam left fp32", k, p, cx, 90, w, s
    k, p, cx, w, s = grouped_project_case("right", bf16, bf16, K_ODD=True)
    yield "grouped_project_adam right bf16 odd K", k, p, cx, 90, w, s
    k, p, cx, w, s = grouped_project_case("right", bf16, bf16, aligned=False)
    yield "grouped_project_adam right bf16 unaligned generic strides", k, p, cx, 90, w, s
    for dtype in (bf16, fp32):
        k, p, cx, w, s = multi_tensor_adamw_case(dtype)
        yield f"multi_tensor_adamw {dtype}", k, p, cx, 90, w, s
    for projected in (True, False):
        k, p, cx, w, s = int8_adam_case(projected, bf16)
        yield f"grouped_int8_adam {'projected' if projected else 'unprojected'} bf16", k, p, cx, 90, w, s
    yield from rule_cases()
    # the device step scalars (float64 counts and hyperparameters, the fp32 scalar table)
    yield ("advance_step_scalars", _advance_step_scalars_kernel,
           dict(steps_ptr=torch.float64, hyper_ptr=torch.float64, table_ptr=torch.float32),
           dict(TABLE_STRIDE=4, BLOCK=STEP_BLOCK), 90, 4, 1)


def must_pipeline(label: str, cx: dict) -> bool:
    """The grouped GEMMs with every launch-wide hint (aligned operands, all dims multiples of 8) must compile
    to a software-pipelined K loop; without DIMS8 their 2-byte bounds-masked loads were not (see
    kernels/_grouped_device.py). (The per-parameter kernels are compiled here without triton's launch-time
    divisibility specialisation, so they are not held to it.)"""
    return label.startswith("grouped_") and bool(cx.get("ALIGNED")) and cx.get("DIMS8") == 7


def both_operands_staged(label: str, compiled, cx: dict, stages: int) -> bool:
    """An odd K (no DIMS8 bit for K) must still stage both operands of every full K block in shared memory
    (cp.async, all stages): the K loop's full blocks load without a K mask (_device.tile_matmul_ext), so G,
    contiguous along K, keeps its vector loads; only the tail block is masked. (With a K mask on every
    block, G's loads were 2-byte and only B was staged: 32 of 48 KB at the 1B shape.)"""
    if not label.endswith("odd K"):
        return True
    per_stage = (cx["BLOCK_I"] + cx["BLOCK_J"]) * cx["BLOCK_K"] * 2  # bf16
    return pipelined(compiled) and compiled.metadata.shared >= stages * per_stage


def pipelined(compiled) -> bool:
    """Operands copied into shared memory asynchronously (cp.async groups): the K loop is pipelined."""
    return "cp.async.commit_group" in compiled.asm["ptx"]


def rule_cases():
    """The update rules' variants (kernels/grouped.py rule=...): kernel (a)'s flags, kernel (s), kernel (b)'s
    RULE constexpr, at LLaMA shapes in bf16 (and one fp32)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    flags = {"fira": dict(STORE_R=True, NORMS=True, GNORM=True), "frugal": dict(STORE_R=True),
             "apollo": dict(NORMS=True, GNORM=True), "project-only": dict(ADAM=False)}
    for arch, side, rule, dtype in ((90, "left", "fira", bf16), (90, "right", "fira", bf16),
                                    (90, "right", "apollo", bf16), (90, "left", "frugal", bf16),
                                    (90, "left", "project-only", bf16), (80, "left", "fira", bf16),
                                    (90, "right", "fira", fp32)):
        k, p, cx, w, s = grouped_project_case(side, dtype, dtype)
        cx.update(flags[rule], RANK_AXIS=0 if side == "left" else 1)
        yield f"rule grouped_project_adam {side} {rule} {dtype}", k, p, cx, arch, w, s
    for arch, rule, tensorwise, limit, front, dtype in ((90, 1, False, True, False, bf16),
                                                         (90, 2, False, True, True, bf16),
                                                         (90, 2, True, False, False, bf16),
                                                         (80, 1, False, True, False, bf16),
                                                         (90, 1, False, True, False, fp32)):
        cx = dict(DTYPE=TL_DTYPE[dtype], RULE=rule, TENSORWISE=tensorwise, LIMIT=limit, SCALE_FRONT=front,
                  GAMMA_=GAMMA, BLOCK=BLOCK_C, INTERPRETER=False)
        yield (f"rule grouped_rule_scales rule={rule} tensorwise={tensorwise} limit={limit} {dtype}",
               _grouped_rule_scales_kernel, TABLES, cx, arch, 4, 1)
    for arch, side, rule, dtype in ((90, "left", 1, bf16), (90, "right", 1, bf16), (90, "left", 2, bf16),
                                    (90, "right", 2, bf16), (90, "left", 3, bf16), (90, "right", 3, bf16),
                                    (80, "right", 1, bf16), (90, "left", 1, fp32)):
        k, p, cx, w, s = grouped_update_case(side, dtype, dtype)
        cx.update(RULE=rule, G_LAYOUT=1, SECOND=2 if side == "left" else 1, CHANNEL_AXIS=1 if side == "left" else 0,
                  TENSORWISE=False)
        yield f"rule grouped_backproject_update {side} rule={rule} {dtype}", k, p, cx, arch, w, s


def main(only: str = "") -> int:
    failures = total = 0
    for label, kernel, ptrs, cx, arch, warps, stages in cases():
        if only not in label:
            continue
        start = time.perf_counter()
        total += 1
        try:
            compiled = compile_kernel(kernel, ptrs, cx, arch, warps, stages)
            assert compiled.asm.get("cubin"), "no cubin produced"
            assert pipelined(compiled) or not must_pipeline(label, cx), "the K loop is not software-pipelined"
            assert both_operands_staged(label, compiled, cx, stages), (
                f"odd K: {compiled.metadata.shared} bytes of shared memory, not every operand pipelined")
            print(f"ok     sm_{arch} {label} ({time.perf_counter() - start:.1f} s)", flush=True)
        except Exception as exc:  # report every failure, then fail
            failures += 1
            print(f"FAILED sm_{arch} {label}: {type(exc).__name__}: {exc}", flush=True)
    print(f"compiled {total - failures} of {total}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
