"""Build script.

Pure Python by default. The CUDA extension (csrc/: the cuSOLVER/cuBLAS randomized SVD) is built
only when the torch found at build time has CUDA and a CUDA toolkit (nvcc) is found, which needs
``python -m pip install --no-build-isolation .`` so the build sees the installed torch. cuSOLVER,
cuBLAS and cudart come from the toolkit or from the nvidia-* wheels of a pip CUDA torch.

LOWRANK_KERNELS_BUILD_CUDA=1 forces the CUDA build (and fails loudly if it cannot happen);
LOWRANK_KERNELS_BUILD_CUDA=0 skips it.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"  # A100, H100/H200; used when no GPU is visible at build time
# Where the build puts links to the nvidia-* wheels' library headers and .so files (see _nvidia_libs).
SHIM = os.path.join(ROOT, "build", "nvidia-shim")
FORCED = ("1", "true", "yes", "on")


def _set_cuda_home() -> None:
    """Point CUDA_HOME at nvcc's real toolkit when torch's guess would be wrong.

    Without CUDA_HOME, torch takes the grandparent of the first nvcc on PATH; a wrapper script such
    as /usr/local/bin/nvcc then gives /usr/local, with no CUDA headers or libcudart there. nvcc's
    dry run names its own directory (_HERE_), which is the toolkit's bin/.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    guess = os.path.dirname(os.path.dirname(nvcc))
    if os.path.exists(os.path.join(guess, "include", "cuda_runtime.h")):
        return
    try:
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60)
        here = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
    except (OSError, subprocess.SubprocessError):
        return
    if here:
        home = os.path.dirname(here.group(1).strip())
        if os.path.exists(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home


def _cuda_extensions():
    mode = os.environ.get("LOWRANK_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return [], {}
    _set_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if mode in FORCED:
            raise RuntimeError(
                f"LOWRANK_KERNELS_BUILD_CUDA=1 but torch is not importable by {sys.executable}; install "
                "torch first and build with that interpreter: `python -m pip install --no-build-isolation .` "
                "(a bare `pip` may belong to another Python)"
            )
        return [], {}
    can_build = torch.version.cuda is not None and CUDA_HOME is not None
    if mode in FORCED:
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
        libs = _nvidia_libs(CUDA_HOME)
    except RuntimeError as exc:
        if mode in FORCED:
            raise
        print(f"lowrank_kernels: skipping the CUDA extension: {exc}")
        return [], {}
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if os.path.exists(os.path.join(torch_lib, "libtorch_cuda_linalg.so")):
        # at::cuda::getCurrentCUDASolverDnHandle lives here, and torch loads this library lazily (at
        # its first CUDA linalg call): link it so that importing _C loads it (rpath: torch/lib).
        libs["libraries"].append("torch_cuda_linalg")
        libs["extra_link_args"].append(f"-Wl,-rpath,{torch_lib}")
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


def _toolkit_lib(cuda_home, lib):
    return sorted(glob.glob(os.path.join(cuda_home, "lib*", f"lib{lib}.so")))


def _nvidia_libs(cuda_home):
    """Compile and link arguments for cuSOLVER, cuBLAS (CUDAExtension adds neither) and cudart.

    A full toolkit has them under CUDA_HOME. A toolkit with only nvcc next to a pip CUDA torch has
    them in the nvidia-* wheels (nvidia/cu13/... for CUDA 13, nvidia/<lib>/... for CUDA 12), which
    ship only versioned .so names: build/nvidia-shim/lib gets an unversioned link to each, so that
    -lcusolver, -lcublas and CUDAExtension's own -lcudart resolve (the linked name is the soname, the
    file torch preloads at import). The wheels' include directory also holds cuda_runtime.h & co.,
    which must never shadow nvcc's own (a newer runtime wheel fails with "CUDA compiler and CUDA
    toolkit headers are incompatible"): build/nvidia-shim/include links only the library headers.
    """
    wheel_roots = [os.path.join(p, "nvidia") for p in sys.path if p]

    def in_wheels(*parts):
        return sorted(f for root in wheel_roots for f in glob.glob(os.path.join(root, "*", *parts)))

    shim_include, shim_lib = os.path.join(SHIM, "include"), os.path.join(SHIM, "lib")
    shutil.rmtree(SHIM, ignore_errors=True)
    include_dirs, library_dirs, libraries, rpaths = [], [], [], []

    def link(target, directory, name):
        os.makedirs(directory, exist_ok=True)
        os.symlink(target, os.path.join(directory, name))

    # ATen's CUDA context header includes cuSPARSE's and cuBLASLt's headers too.
    for header, family in (("cusolverDn.h", "cusolver"), ("cublas_v2.h", "cublas"), ("cusparse.h", "cusparse")):
        if os.path.exists(os.path.join(cuda_home, "include", header)):
            continue
        found = in_wheels("include", header)
        if not found:
            raise RuntimeError(f"{header} is in neither {cuda_home}/include nor an nvidia-* wheel")
        for path in glob.glob(os.path.join(os.path.dirname(found[0]), f"{family}*.h")):
            if not os.path.exists(os.path.join(shim_include, os.path.basename(path))):
                link(path, shim_include, os.path.basename(path))
        include_dirs = [shim_include]
    for lib, required in (("cusolver", True), ("cublas", True), ("cudart", False)):
        if _toolkit_lib(cuda_home, lib):
            if required:
                libraries.append(lib)  # -L CUDA_HOME/lib64 comes with CUDAExtension
            continue
        found = in_wheels("lib", f"lib{lib}.so.*[0-9]")
        if not found:
            raise RuntimeError(f"lib{lib}.so is in neither {cuda_home}/lib* nor an nvidia-* wheel")
        link(found[0], shim_lib, f"lib{lib}.so")
        library_dirs = [shim_lib]
        rpaths.append(os.path.dirname(found[0]))
        if required:
            libraries.append(lib)  # cudart is already in CUDAExtension's list
    return {
        "include_dirs": include_dirs,
        "library_dirs": library_dirs,
        "libraries": libraries,
        "extra_link_args": [f"-Wl,-rpath,{d}" for d in sorted(set(rpaths))],
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
        # expecttest: torch.testing._internal (tests/test_torch_optim_suite.py) imports it
        "test": ["pytest", "numpy", "expecttest"],
        # galore-torch needs transformers and bitsandbytes to import; the HF Trainer needs accelerate.
        # fira, apollo-torch and peft at the versions the parity tests (and README) name.
        "peers": ["galore-torch", "transformers", "bitsandbytes", "accelerate", "fira==1.0.2",
                  "apollo-torch==1.0.3", "peft==0.21.2"],
        "demo": ["tqdm", "matplotlib"],
        "bench": ["tqdm", "matplotlib"],
    },
    package_data={"lowrank_kernels.demo": ["data/*.txt", "data/README.md"]},
    entry_points={"console_scripts": ["lowrank-demo = lowrank_kernels.demo.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
