"""Static resources of the Triton kernels compiled for sm_90 (H100) at the goal shapes; no GPU needed.

Each kernel is compiled ahead of time (triton.compile with GPUTarget("cuda", 90, 32), as tests/aot_compile.py
does) with the tile config its launcher would pick on a 132-SM H100 for a 4096 x 11008 bf16 weight at ranks
128, 512 and 1024 (and its 11008 x 4096 transpose for the right orientation). From the cubin (cuobjdump
--dump-resource-usage): registers per thread and local memory (spills); from triton's metadata: shared
memory. CTAs per SM follow from H100's limits: 64K registers, 228 KB shared memory (1 KB reserved per
CTA), 2048 threads, 32 CTAs.

    python bench/kernel_resources.py      # writes bench/results/kernel_resources_sm90_triton<version>_<date>.md

Register counts and pipelining decisions change between triton versions (each bundles its own ptxas): run it
with the triton the GPU machine has too (a second venv is enough: nothing here needs a GPU).
"""
from __future__ import annotations

import datetime
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
spec = importlib.util.spec_from_file_location("aot_compile", os.path.join(HERE, "..", "tests", "aot_compile.py"))
aot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aot)

from lowrank_kernels.kernels import _launch  # noqa: E402
from lowrank_kernels.kernels._tables import TL_DTYPE  # noqa: E402

SMS, REGS_PER_SM, SMEM_PER_SM, SMEM_RESERVED, THREADS_PER_SM, CTAS_PER_SM = 132, 65536, 228 * 1024, 1024, 2048, 32
M, N = 4096, 11008
RANKS = (128, 512, 1024)
BF16 = torch.bfloat16


def cuobjdump() -> str:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else "cuobjdump"


def usage(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    field = lambda name: int(re.search(rf"{name}:(\d+)", out).group(1))  # noqa: E731
    return dict(regs=field("REG"), local=field("LOCAL"), stack=field("STACK"), smem=compiled.metadata.shared,
                pipelined=aot.pipelined(compiled),
                narrow=len(re.findall(r"(?:ld|st)\.global\.b16", compiled.asm["ptx"])))


def ctas_per_sm(regs: int, smem: int, warps: int) -> tuple:
    """(CTAs per SM, the limiting resource). Registers are allocated per warp in 256-register units."""
    per_warp = -(-regs * 32 // 256) * 256
    limits = {"registers": REGS_PER_SM // (per_warp * warps), "threads": THREADS_PER_SM // (32 * warps),
              "shared memory": SMEM_PER_SM // (smem + SMEM_RESERVED), "CTA slots": CTAS_PER_SM}
    limit = min(limits, key=limits.get)
    return limits[limit], limit


def gemm(I, J, K, extra=None, dtype=BF16):
    cfg = _launch.gemm_config(I, J, K, dtype, torch.device("cpu"), sms=SMS)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    cx = {**cfg, "PRECISION": _launch.dot_precision(dtype), "INTERPRETER": False, **(extra or {})}
    return cx, warps, stages


def cases():
    """(kernel label, shape label, kernel, pointer dtypes, constexprs, warps, stages[, int arguments of a
    per-parameter kernel, for triton's launch-time specialisation])."""
    b = TL_DTYPE[BF16]
    for r in RANKS:
        shape = f"{M}x{N} r={r}"
        cx, w, s = gemm(r, N, M)  # kernel (a), left: I = r, J = n, K = m
        ints = dict(I=r, J=N, K=M, stride_ai=1, stride_ak=r, stride_bk=N, stride_bj=1, stride_mi=N, stride_mj=1,
                    stride_vi=N, stride_vj=1, stride_ni=N, stride_nj=1)
        yield ("project_adam (left)", shape, aot._project_adam_kernel,
               dict(a_ptr=BF16, b_ptr=BF16, m_ptr=BF16, v_ptr=BF16, n_ptr=BF16), cx, w, s, ints)
        layouts = dict(A_LAYOUT=2, B_LAYOUT=1, M_LAYOUT=1, V_LAYOUT=1, N_LAYOUT=1, ALIGNED=True, DIMS8=7)
        cx, w, s = gemm(r, N, M, dict(DTYPE=b, M_DTYPE=b, V_DTYPE=b, **layouts))
        yield "grouped_project_adam (left)", shape, aot._grouped_project_adam_kernel, aot.TABLES, cx, w, s
        cx, w, s = gemm(M, N, r, dict(HAS_DECAY=True))  # kernel (b): I = m, J = n, K = r
        ints = dict(I=M, J=N, K=r, stride_wi=N, stride_wj=1, stride_ai=r, stride_ak=1, stride_bk=N, stride_bj=1)
        yield ("backproject_update (left)", shape, aot._backproject_update_kernel,
               dict(w_ptr=BF16, a_ptr=BF16, b_ptr=BF16), cx, w, s, ints)
        cx, w, s = gemm(M, N, r, dict(DTYPE=b, W_DTYPE=b, W_LAYOUT=1, A_LAYOUT=1, B_LAYOUT=1, ALIGNED=True, DIMS8=7))
        yield ("grouped_backproject_update (left)", shape, aot._grouped_backproject_update_kernel, aot.TABLES,
               cx, w, s)
    shape = f"{N}x{M} r=512"  # the transposed weight: right orientation, R = G Q (I = m, J = r, K = n)
    layouts = dict(A_LAYOUT=1, B_LAYOUT=1, M_LAYOUT=1, V_LAYOUT=1, N_LAYOUT=1, ALIGNED=True, DIMS8=7)
    cx, w, s = gemm(N, 512, M, dict(DTYPE=b, M_DTYPE=b, V_DTYPE=b, **layouts))
    yield "grouped_project_adam (right)", shape, aot._grouped_project_adam_kernel, aot.TABLES, cx, w, s
    cx, w, s = gemm(N, M, 512, dict(DTYPE=b, W_DTYPE=b, W_LAYOUT=1, A_LAYOUT=1, B_LAYOUT=2, ALIGNED=True, DIMS8=7))
    yield "grouped_backproject_update (right)", shape, aot._grouped_backproject_update_kernel, aot.TABLES, cx, w, s
    # one problem of the launch with an odd extent on every axis: no DIMS8 hint (kernels/_grouped_device.py);
    # then as the host built the tables before the _tables.aligned() fix (it tested the unit stride instead
    # of the loaded one, so ALIGNED was False for every launch of contiguous operands: the ANALYSIS's first point)
    for label, aligned, dims8 in (("DIMS8=0", True, 0), ("ALIGNED=0 (as launched before the fix)", False, 7)):
        shape = f"{M}x{N} r=512, {label}"
        layouts = dict(A_LAYOUT=2, B_LAYOUT=1, M_LAYOUT=1, V_LAYOUT=1, N_LAYOUT=1, ALIGNED=aligned, DIMS8=dims8)
        cx, w, s = gemm(512, N, M, dict(DTYPE=b, M_DTYPE=b, V_DTYPE=b, **layouts))
        yield "grouped_project_adam (left)", shape, aot._grouped_project_adam_kernel, aot.TABLES, cx, w, s
        layouts = dict(W_LAYOUT=1, A_LAYOUT=1, B_LAYOUT=1, ALIGNED=aligned, DIMS8=dims8)
        cx, w, s = gemm(M, N, 512, dict(DTYPE=b, W_DTYPE=b, **layouts))
        yield "grouped_backproject_update (left)", shape, aot._grouped_backproject_update_kernel, aot.TABLES, cx, w, s
    # K = 5461 (LLaMA-1B's MLP size) on the contiguous axis of G, rank 512 (R = G Q, I = m, J = r, K = n), and
    # J = 5461 for kernel (b)'s W. Grouped: rows padded to a multiple of 8 elements (ALIGNED), so only the odd
    # extent's DIMS8 bit is missing. Per parameter: a contiguous G (row stride 5461: its rows are misaligned,
    # no load along K can be vectorised, with or without a K mask) and a padded one (row stride 5504).
    shape = "2048x5461 r=512, padded rows, DIMS8=3 / 5"
    layouts = dict(A_LAYOUT=1, B_LAYOUT=1, M_LAYOUT=1, V_LAYOUT=1, N_LAYOUT=1, ALIGNED=True, DIMS8=3)
    cx, w, s = gemm(2048, 512, 5461, dict(DTYPE=b, M_DTYPE=b, V_DTYPE=b, **layouts))
    yield "grouped_project_adam (right)", shape, aot._grouped_project_adam_kernel, aot.TABLES, cx, w, s
    layouts = dict(W_LAYOUT=1, A_LAYOUT=1, B_LAYOUT=2, ALIGNED=True, DIMS8=5)
    cx, w, s = gemm(2048, 5461, 512, dict(DTYPE=b, W_DTYPE=b, **layouts))
    yield "grouped_backproject_update (right)", shape, aot._grouped_backproject_update_kernel, aot.TABLES, cx, w, s
    cx, w, s = gemm(2048, 512, 5461)
    for stride in (5461, 5504):
        ints = dict(I=2048, J=512, K=5461, stride_ai=stride, stride_ak=1, stride_bk=512, stride_bj=1, stride_mi=512,
                    stride_mj=1, stride_vi=512, stride_vj=1, stride_ni=512, stride_nj=1)
        yield ("project_adam (right)", f"2048x5461 r=512, G row stride {stride}", aot._project_adam_kernel,
               dict(a_ptr=BF16, b_ptr=BF16, m_ptr=BF16, v_ptr=BF16, n_ptr=BF16), cx, w, s, ints)
    yield ("adamw", "any (1024-element blocks)", aot._adamw_kernel,
           dict(w_ptr=BF16, g_ptr=BF16, m_ptr=BF16, v_ptr=BF16),
           dict(BLOCK=aot.BLOCK, HAS_DECAY=True, INTERPRETER=False), 4, 1, dict(numel=M * N))
    cx = dict(W_DTYPE=b, G_DTYPE=b, M_DTYPE=b, V_DTYPE=b, ALIGNED=True, BLOCK=aot.MT_BLOCK, INTERPRETER=False)
    yield "multi_tensor_adamw", "any (1024-element blocks)", aot._multi_tensor_adamw_kernel, aot.TABLES, cx, 4, 1


def specialised(kernel, ptrs: dict, cx: dict, ints: dict):
    """Compile a per-parameter kernel as triton's launcher would for these tensors: an int argument equal to 1
    becomes a constant, one divisible by 16 and every (aligned) pointer is marked so (tt.divisibility)."""
    from triton.compiler import ASTSource
    cx = {**cx, **{k: 1 for k, v in ints.items() if v == 1}}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in cx:
            signature[name] = "constexpr"
        elif name in ptrs:
            signature[name] = "*" + aot.TRITON_TYPE[ptrs[name]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in aot.SCALARS else "i32"
            if ints.get(name, 0) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs={(kernel.arg_names.index(k),): v for k, v in cx.items()},
                    attrs=attrs)
    return src


def tiles(cx) -> str:
    return f"{cx['BLOCK_I']}x{cx['BLOCK_J']}x{cx['BLOCK_K']}" if "BLOCK_I" in cx else f"{cx['BLOCK']}"


def main() -> int:
    rows, cache = [], {}
    from triton.backends.compiler import GPUTarget
    for label, shape, kernel, ptrs, cx, warps, stages, *ints in cases():
        key = (kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in cx.items())), warps, stages, str(ints))
        if key not in cache:
            if ints:
                compiled = triton.compile(specialised(kernel, ptrs, cx, ints[0]), target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": warps, "num_stages": stages})
            else:
                compiled = aot.compile_kernel(kernel, ptrs, cx, 90, warps, stages)
            cache[key] = usage(compiled)
        u = cache[key]
        ctas, limit = ctas_per_sm(u["regs"], u["smem"], warps)
        loop = ("cp.async" if u["pipelined"] else "**not pipelined**") if "BLOCK_K" in cx else "(no K loop)"
        if "BLOCK_K" in cx and u["narrow"]:  # PTX ld/st.global.b16: unvectorised (see ANALYSIS)
            loop += f", {u['narrow']} 2-byte ld/st"
        rows.append((label, shape, tiles(cx), warps, stages, loop, u["regs"], u["local"] + u["stack"],
                     f"{u['smem'] / 1024:.1f}", ctas, limit))
        print(" | ".join(map(str, rows[-1])), flush=True)
    header = ("kernel", "shape (bf16)", "tile I x J x K", "warps", "stages", "K loop", "regs/thread", "spill+stack B",
              "smem KB", "CTAs/SM", "limited by")
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    date = datetime.date.today().isoformat()
    path = os.path.join(HERE, "results", f"kernel_resources_sm90_triton{triton.__version__}_{date}.md")
    with open(path, "w") as f:
        f.write(f"# Kernel resources, compiled for sm_90 ({date}, triton {triton.__version__})\n\n"
                f"triton {triton.__version__}, torch {torch.__version__}; compiled ahead of time without a GPU "
                f"(`python bench/kernel_resources.py`), tile configs as the launchers pick them on a {SMS}-SM "
                f"H100. CTAs/SM from H100 limits: 64K registers, 228 KB shared memory (+1 KB reserved per "
                f"CTA), 2048 threads, 32 CTAs per SM.\n\n" + "\n".join(table) + "\n\n" + ANALYSIS)
    print(f"wrote {path}")
    return 0


ANALYSIS = """## What limits each kernel, and what would lift it

Static analysis only, from compiled metadata and PTX (no GPU this session, **no timing was taken**; nothing
here claims a speedup). Tile configs are the launchers' fixed ones. The same table exists for triton 3.9.0
(this machine's) and 3.6.0 (the H100 machine's, torch 2.11.0+cu130): register counts differ between them
(each bundles its own ptxas), pipelining decisions do not.

- **Alignment hints: a host bug, fixed after these tables were generated (the rows stand).**
  `_tables.aligned()` checked the stride the kernel does *not* load (`d != unit - 1` where it meant
  `d != 2 - unit`): for a unit-stride layout it tested the unit stride, 1 % 8 != 0, so no grouped launch of
  contiguous or transposed operands ever got ALIGNED, and every one compiled like the rows "ALIGNED=0 (as
  launched before the fix)": K loop **not pipelined**, 2-byte loads and stores, kernel (a) spilling 1.7 KB
  (3.9) / 2.3 KB (3.6.0) per thread, whatever DIMS8 said. The H100 timings of 2026-11-23 ran that code.
  Fixed: the check reads `d != 2 - unit`, and the R buffers kernels (a) and (b) address with N's strides
  join it (tests/test_grouped_kernels.py::test_aligned_hint_checks_the_loaded_strides_not_the_unit_one), so
  dense, 16-byte-aligned launches now compile like the hinted rows above. Not yet run or timed on a GPU
  (`pytest -m gpu tests/test_grouped_kernels.py`, then bench/bench_model_step.py).
- **Why the grouped GEMMs were not pipelined (the DIMS8 hint).** Every grouped kernel reads I, J, K from its
  table row, so the compiler knew nothing about their divisibility, and the bounds masks (`offs < I`,
  `offs < J`, the K mask) were constant over only one element along the contiguous axis. A load's vector
  width is capped by its mask's constancy: every load and store of the tile became a 2-byte access (PTX
  `ld.global.b16` / `st.global.b16`), and triton's pipeliner only turns loads of at least 4 bytes into
  `cp.async`, so the K loop ran with one buffer (32 KB of shared memory at 3 requested stages) and no latency
  hiding. The per-parameter kernels escape this because triton's launcher marks int arguments divisible by 16
  (`tt.divisibility`). The fix: a launch-wide constexpr DIMS8 (bits for I, J, K: a multiple of 8 in every
  problem of the launch, `_tables.dims_multiple_of_8`), turned into `tl.multiple_of` in
  `_grouped_device.row_dims`; with it (and ALIGNED) the grouped kernels compile like the per-parameter ones:
  `cp.async` K loops, 96 KB of shared memory at 128x128x64 (72 KB at 64x128), 16-byte `ld/st.global.v4` in
  the epilogues. Rows "DIMS8=0": no extent hinted ("K loop" counts the PTX's `ld/st.global.b16`).
  tests/aot_compile.py fails if a fully hinted grouped GEMM compiles unpipelined.
- **K loop: full blocks without a K mask, one masked tail (new).** `_device.tile_matmul_ext` runs
  `K // BLOCK_K` blocks masked only by the I / J bounds (constant along K) and, when K % BLOCK_K != 0, one
  block masked at K (one copy of the block's code, `_device._k_block`, with a constexpr MASK_K). Same products
  in the same order: under the interpreter every output of tests/test_kernels, test_grouped_kernels,
  test_grouped_rules, test_engine_triton and test_int8_kernel is bit-identical to the masked loop's. The
  tail's mask is written `offs_k < K - k_full` (k_full = (K // BLOCK_K) * BLOCK_K): it keeps K's known
  divisibility, which `K % BLOCK_K` loses under triton 3.6.0 (2-byte tail loads, and kernel (b) went from 127
  to 182 registers). Before -> after, 3.9 / 3.6.0:
  - K = 5461 on G's contiguous axis with rows padded to a multiple of 8 (grouped kernel (a), DIMS8 without K;
    per parameter, row stride 5504): G is now staged by `cp.async` too, **48 KB of shared memory instead of
    32 KB** (all 3 stages of both operands); 2-byte loads only in the tail block. Registers: grouped 128 -> 125
    (3.9, 4 CTAs/SM) but **143 -> 177 under 3.6.0 (3 -> 2 CTAs/SM)**; per parameter 96 -> 101 (3.9, 5 -> 4
    CTAs/SM: shared memory and registers) and 128 -> 163 (3.6.0, 4 -> 3). Whether the pipelined G loads
    beat the lost occupancy is for a GPU run to say.
  - A *contiguous* 2048 x 5461 G (row stride 5461) gains nothing and cannot: its rows start at odd element
    offsets, so no vector load along K is aligned, with or without a K mask (32 KB, 164 -> 167 / 166 -> 167
    registers; the tail adds code, not executed accesses). Note also that at the 1B layout the 2048 x 5461
    down projections are projected on the *left* under proj_type "std" (m < n: R = P^T G, K = m = 2048, J =
    n = 5461); K = 5461 on G's contiguous axis needs a right projection of such a weight ("reverse_std" or
    "right"). The rows formerly labelled "1B layout" assumed aligned rows; they are relabelled "padded rows".
  - Every hinted row at the goal shapes keeps its registers within 2 and its shared memory (3.9 and 3.6.0);
    the unhinted rows change: DIMS8=0 kernel (b) is now pipelined (64 KB; 3.6.0: 255 registers, spill 56 ->
    96 B), "as launched before the fix" kernel (b) spills more (3.9: 0 -> 56 B, 3.6.0: 8 -> 152 B), which the ALIGNED fix
    would remove from the hinted launches. "Before" numbers: the same script on the previous commit.
- **Odd J in kernel (b)'s epilogue (not changed).** W is read and written with 2-byte accesses when J (W's
  contiguous axis) is odd (rows "padded rows": 128 `ld/st.global.b16`, 178 / 255 registers). Interior tiles
  (`(pid_j + 1) * BLOCK_J <= J`) need no J mask, but a mask built from a run-time choice of bound has the
  constancy of its least divisible operand, so the only exact way is a run-time branch between two
  instantiations of the epilogue (J-masked and not): two compiled copies of the W read-modify-write, more
  code and likely more registers in a kernel already at 255 under 3.6.0, and again no help for a contiguous
  W with an odd row stride (misaligned rows, as G above). Not done; a problem with an odd extent also removes
  the hint from the other problems of its launch (splitting a bucket by DIMS8 would cost up to two more
  launches).
- **project_adam / grouped_project_adam** (kernel (a)): at 128x128x64, 8 warps, 3 stages: per parameter
  235 (3.9) / 228 (3.6) registers, grouped 255 / 237, both 96 KB: **one CTA per SM**, limited by registers.
  The Adam epilogue (R, M, V, N tiles in fp32 live together) sets the peak; with one CTA per SM nothing
  overlaps the M/V loads after the K loop or the stores of M, V, N with another tile's main loop. At 64x128
  (rank 128, or whenever the launcher shrinks tiles to fill the SMs) the per-parameter kernel needs ~100
  registers (2 CTAs/SM) and the grouped one 124 (3.9: 2 CTAs/SM) but **145 under 3.6.0: 1 CTA/SM**. The
  extra registers come from the per-problem beta1, beta2, eps loaded from the device table: compiled with
  them as constants, the 3.6.0 kernel needs 100 (with the betas alone constant, 112); loading them at the
  top of the kernel instead of in the epilogue gives 101 under 3.9 but 148 under 3.6.0, so no reordering is
  committed. Lead (3) of the last session (64-wide I tiles for grouped kernel (a)) is therefore **not
  adopted**: under the GPU machine's triton it still leaves one CTA per SM while halving the reuse of each
  G panel. Leads: pass beta1, beta2, eps as kernel arguments when one row serves the whole launch (kernel
  arguments live in the constant bank; but a CUDA graph bakes arguments in at capture, so a change of betas
  would need a re-capture); a persistent kernel that prefetches the next tile's operands during the epilogue;
  splitting the epilogue over the tile's columns to shorten live ranges.
- **backproject_update / grouped_backproject_update** (kernel (b)): 126-128 registers, 96 KB shared memory
  in both versions, grouped and per parameter alike: **2 CTAs per SM** (registers and shared memory both
  allow 2). K = r is short (2-16 iterations), so the 3-stage pipeline's prologue and the W read/write
  epilogue dominate; 2 CTAs let one CTA's epilogue overlap the other's loads. Lifts: fewer stages at small r
  (shared memory), or a persistent kernel.
- **adamw / multi_tensor_adamw**: bandwidth kernels; 32-48 registers, no shared memory, 10-16 CTAs/SM of
  128 threads (the 2048-thread limit is 16): occupancy is not the limit, bytes are.

**To measure on the next GPU run** (none was taken this session): `python bench/bench_model_step.py` (60M
and 1B layouts: ours with and without a CUDA graph, per-parameter, AdamW(fused); the last run had the
grouped 1B step at 57.5 ms, 50.2 ms with a graph, against 29.5 ms per parameter, before this fix) and
`python -m bench --gpu`; and the GPU tests (`pytest -m gpu tests/test_grouped_kernels.py`) for the hinted
kernels' results at aligned shapes.
"""


if __name__ == "__main__":
    sys.exit(main())
