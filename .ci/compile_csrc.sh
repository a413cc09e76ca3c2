#!/usr/bin/env bash
# Compile-only check of csrc/ with the machine's nvcc, for CI machines without a GPU or a CUDA torch.
# Nothing is linked or run; it catches C++/CUDA errors in the extension with the flags that
# torch.utils.cpp_extension would pass. Run from the repository root with the venv active:
#   bash .ci/compile_csrc.sh
# The cuSOLVER/cuBLAS/cuSPARSE headers (ATen's CUDA context includes all three) come from the nvidia-*
# wheels, installed once into .ci-cache/ (git-ignored; NVIDIA's license: never commit them). The
# nvidia-cuda-runtime wheel is deliberately not used: its headers are newer than nvcc 13.0 and fail.
set -euo pipefail

NVCC=${NVCC:-nvcc}
CXX=${CXX:-c++}
ARCH=${CSRC_ARCH:-90}
CACHE=${CSRC_HEADER_CACHE:-.ci-cache/nvidia-headers}
OUT=$(mktemp -d /tmp/compile_csrc.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

command -v "$NVCC" >/dev/null || { echo "compile_csrc: $NVCC not found (set NVCC=...)" >&2; exit 1; }

# Any wheel layout: nvidia/cu13/include (CUDA 13) or nvidia/<lib>/include (CUDA 12).
header_dirs() { find "$CACHE/nvidia" -name "$1" -path '*/include/*' -printf '%h\n' 2>/dev/null | sort -u; }
if [ -z "$(header_dirs cusolverDn.h)" ] || [ -z "$(header_dirs cublas_v2.h)" ] || [ -z "$(header_dirs cusparse.h)" ]; then
  echo "compile_csrc: installing cuSOLVER/cuBLAS/cuSPARSE headers into $CACHE"
  python -m pip install -q --no-deps --target "$CACHE" nvidia-cusolver nvidia-cublas nvidia-cusparse
fi
NV_INCLUDES=()
for h in cusolverDn.h cublas_v2.h cusparse.h; do
  d=$(header_dirs "$h" | head -n1)
  [ -n "$d" ] || { echo "compile_csrc: $h not found under $CACHE" >&2; exit 1; }
  NV_INCLUDES+=("-I$d")
done

TORCH=$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')
PY_INCLUDE=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
# C10_CUDA_NO_CMAKE_CONFIGURE_FILE: a CPU torch lacks the generated c10/cuda/impl/cuda_cmake_macros.h.
COMMON=(-std=c++20 -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCH_API_INCLUDE_EXTENSION_H
        -DTORCH_EXTENSION_NAME=_C -I"$TORCH/include" -I"$TORCH/include/torch/csrc/api/include"
        -I"$PY_INCLUDE" "${NV_INCLUDES[@]}")
NVCC_FLAGS=(-c -Xcompiler -fPIC --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__
            -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
            -D__CUDA_NO_HALF2_OPERATORS__ "-gencode=arch=compute_$ARCH,code=sm_$ARCH")

shopt -s nullglob
sources=(csrc/*.cu csrc/*.cpp)
[ ${#sources[@]} -gt 0 ] || { echo "compile_csrc: no sources in csrc/" >&2; exit 1; }
failed=0
for src in "${sources[@]}"; do
  obj="$OUT/$(basename "$src").o"
  start=$SECONDS
  case "$src" in
    *.cu) cmd=("$NVCC" "${NVCC_FLAGS[@]}" "${COMMON[@]}" "$src" -o "$obj") ;;
    *) cmd=("$CXX" -c -fPIC -O0 "${COMMON[@]}" "$src" -o "$obj") ;;
  esac
  if "${cmd[@]}"; then
    echo "compile_csrc: ok     $src ($((SECONDS - start)) s)"
  else
    echo "compile_csrc: FAILED $src" >&2
    failed=1
  fi
done
exit $failed
