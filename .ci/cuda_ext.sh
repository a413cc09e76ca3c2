#!/usr/bin/env bash
# CI proof, without a GPU, that the CUDA extension builds the way README says against a CUDA torch and
# then loads: torch 2.11.0 from PyPI (its Linux wheel is 2.11.0+cu130, the GPU machine's torch) goes
# into a separate venv, .ci-cache/venv-cuda; the package is built there with
#   LOWRANK_KERNELS_BUILD_CUDA=1 python -m pip install --no-deps --no-build-isolation .
# then a fresh interpreter outside the repository imports lowrank_kernels._C and checks that
# lowrank_kernels::rsvd has a CUDA kernel registered, and tests/test_cuda_ext.py runs against that
# install (the compiled kernel's argument checks and input preparation run on CPU tensors).
#
# torch 2.11.0 is installed with all its dependencies (2.6 GB of wheels): libtorch_cuda.so itself needs
# nearly every nvidia-* library (cudnn, nccl, cusparselt, nvshmem, cufft, curand, cufile, cublas,
# cusparse), so a trimmed set would save only triton, nvrtc, cupti and nvtx (~0.3 GB). Wheels are cached
# in .ci-cache/wheels (git-ignored): a warm run installs with --no-index. Measured on a 2-core machine:
# download 28 s, install 49 s, build 1-4 min (nvcc on one .cu file), checks and tests under 1 min.
# nvcc comes from the machine (cudart from its toolkit, or the nvidia-cuda-runtime wheel when the
# toolkit has none); the wheels' headers never shadow nvcc's own (setup.py links only the library
# headers). Run from the repository root: bash .ci/cuda_ext.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
TORCH_SPEC=${CI_CUDA_TORCH:-torch==2.11.0}
VENV=.ci-cache/venv-cuda
WHEELS=.ci-cache/wheels
# The CPU venv's constraint pins torch==2.13.0: not for this venv.
unset PIP_CONSTRAINT
step() { echo "cuda_ext: $1 ($((SECONDS - T0)) s so far)"; }
T0=$SECONDS

command -v nvcc >/dev/null || { echo "cuda_ext: nvcc not found; the CUDA build needs a toolkit" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY=$REPO/$VENV/bin/python
REQS=("$TORCH_SPEC" "setuptools>=70.1,<82" wheel ninja pytest)
step "installing ${REQS[*]} into $VENV"
if ! "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${REQS[@]}" 2>/dev/null; then
  "$PY" -m pip download -q -d "$WHEELS" "${REQS[@]}"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${REQS[@]}"
fi
"$PY" -c 'import torch; assert torch.version.cuda, torch.__version__; print("cuda_ext: torch", torch.__version__, "CUDA", torch.version.cuda)'

# Build from a copy of the source tree, so that the build/ directory and its _C.so never leak into the
# CPU venv's `pip install .` (setuptools would pack a stale build/lib/_C*.so into that wheel).
SRC=$(mktemp -d /tmp/lowrank_cuda_build.XXXXXX)
trap 'rm -rf "$SRC"' EXIT
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$SRC"
step "building the extension (README's command) in $SRC"
(cd "$SRC" && LOWRANK_KERNELS_BUILD_CUDA=1 "$PY" -m pip install --no-deps --no-build-isolation .)

step "importing lowrank_kernels._C in a fresh interpreter outside the repository"
(cd "$SRC/.." && "$PY" -W ignore - <<'EOF'
import os, torch
import lowrank_kernels, lowrank_kernels._C
ok, why = lowrank_kernels.cuda_ext_available()
registered = torch._C._dispatch_has_kernel_for_dispatch_key("lowrank_kernels::rsvd", "CUDA")
print(f"cuda_ext: {lowrank_kernels._C.__file__}: cuda_ext_available() = {(ok, why)}, "
      f"CUDA kernel registered: {registered}")
assert "site-packages" in lowrank_kernels.__file__, lowrank_kernels.__file__
assert ok and registered, why
EOF
)

step "tests/test_cuda_ext.py against the installed build"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_ext.py
step "done"
