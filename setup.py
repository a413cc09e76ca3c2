"""Build script.

Pure Python by default. The CUDA extension (csrc/: the cuSOLVER/cuBLAS randomized SVD) is built
only when the torch found at build time has CUDA and a CUDA toolkit is found (cuSOLVER and cuBLAS
from the toolkit or from the nvidia-* wheels of a pip CUDA torch), which needs
``pip install --no-build-isolation .`` so the build sees the installed torch.

LOWRANK_KERNELS_BUILD_CUDA=1 forces the CUDA build (and fails loudly if it cannot happen);
LOWRANK_KERNELS_BUILD_CUDA=0 skips it.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"  # A100, H100/H200; used when no GPU is visible at build time


def _cuda_extensions():
    mode = os.environ.get("LOWRANK_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if mode in ("1", "true", "yes", "on"):
            raise RuntimeError(
                "LOWRANK_KERNELS_BUILD_CUDA=1 but torch is not importable at build time; "
                "install torch first and use `pip install --no-build-isolation .`"
            )
        return [], {}
    can_build = torch.version.cuda is not None and CUDA_HOME is not None
    if mode in ("1", "true", "yes", "on"):
        if not can_build:
            raise RuntimeError(
                f"LOWRANK_KERNELS_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and "
                f"CUDA_HOME={CUDA_HOME!r}: a CUDA build of torch and a CUDA toolkit are both needed"
            )
    elif not can_build:
        return [], {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        # cpp_extension indexes an empty arch list when no GPU is visible; give it one.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    try:
        libs = _cusolver_cublas(CUDA_HOME)
    except RuntimeError as exc:
        if mode in ("1", "true", "yes", "on"):
            raise
        print(f"lowrank_kernels: skipping the CUDA extension: {exc}")
        return [], {}
    sources = sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.c*"))
    )
    ext = CUDAExtension(
        name="lowrank_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        **libs,
    )
    return [ext], {"build_ext": BuildExtension}


def _cusolver_cublas(cuda_home):
    """Compile and link arguments for cuSOLVER and cuBLAS (CUDAExtension adds neither).

    A full toolkit has them under CUDA_HOME. A toolkit with only nvcc next to a pip CUDA torch has
    them in the nvidia-* wheels (nvidia/cu13/... for CUDA 13, nvidia/<lib>/... for CUDA 12), which
    ship headers and only versioned .so names: those are linked by file name
    (-l:libcusolver.so.12), and torch preloads the same files at import.
    """
    wheel_roots = [os.path.join(p, "nvidia") for p in sys.path]

    def in_wheels(*parts):
        return sorted(f for root in wheel_roots for f in glob.glob(os.path.join(root, "*", *parts)))

    include_dirs, library_dirs, libraries, link_args = [], [], [], []
    # ATen's CUDA context header includes cuSPARSE's header too.
    for header in ("cusolverDn.h", "cublas_v2.h", "cusparse.h"):
        if not os.path.exists(os.path.join(cuda_home, "include", header)):
            found = in_wheels("include", header)
            if not found:
                raise RuntimeError(f"{header} is in neither {cuda_home}/include nor a wheel")
            include_dirs.append(os.path.dirname(found[0]))
    for lib in ("cusolver", "cublas"):
        if glob.glob(os.path.join(cuda_home, "lib*", f"lib{lib}.so")):
            libraries.append(lib)
            continue
        found = in_wheels("lib", f"lib{lib}.so.*[0-9]")
        if not found:
            raise RuntimeError(f"lib{lib}.so is in neither {cuda_home}/lib* nor a nvidia-* wheel")
        library_dirs.append(os.path.dirname(found[0]))
        link_args.append(f"-l:{os.path.basename(found[0])}")
    library_dirs = sorted(set(library_dirs))
    return {
        "include_dirs": sorted(set(include_dirs)),
        "library_dirs": library_dirs,
        "libraries": libraries,
        "extra_link_args": link_args + [f"-Wl,-rpath,{d}" for d in library_dirs],
    }


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="lowrank_kernels",
    version="0.1.0",
    description="Fused low-rank projected optimizers (GaLore family) for PyTorch",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lowrank_kernels", "lowrank_kernels.*"]),
    python_requires=">=3.9",
    # Any torch >= 2.4 the user already has is kept; pip installs nothing more for it.
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "numpy"],
        # galore-torch needs transformers and bitsandbytes to import; the HF Trainer needs accelerate.
        "peers": ["galore-torch", "transformers", "bitsandbytes", "accelerate"],
        "demo": ["tqdm", "matplotlib"],
        "bench": ["tqdm", "matplotlib"],
    },
    package_data={"lowrank_kernels.demo": ["data/*.txt", "data/README.md"]},
    entry_points={"console_scripts": ["lowrank-demo = lowrank_kernels.demo.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
