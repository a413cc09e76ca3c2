"""Test-wide setup.

* Without a GPU the Triton kernels run under the interpreter; TRITON_INTERPRET must be set before
  triton decorates any kernel, so it is set here, before any test module imports
  lowrank_kernels.kernels. With a GPU it stays unset (the kernels compile for the device), so tests of
  the fused path put their tensors on the GPU there.
* Which lowrank_kernels is tested: ``python -m pytest`` from the repository root imports
  ./lowrank_kernels, which a ``pip install`` never builds the compiled extension into. When an
  installed copy has the extension (``lowrank_kernels/_C*.so``) and the same Python sources as this
  checkout, that copy is imported instead, so the extension's tests run rather than skip. The header
  of every run says which package and which rsvd CUDA kernel the tests use.
* LOWRANK_KERNELS_REQUIRE_CUDA_EXT=1 (set by ``python -m bench --gpu``) makes a run without the
  compiled kernel fail instead of falling back silently.
"""
import filecmp
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent


def _has_extension(package_dir: Path) -> bool:
    return any(package_dir.glob("_C*.so")) or any(package_dir.glob("_C*.pyd"))


def _sources(package_dir: Path) -> set:
    return {p.relative_to(package_dir) for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts}


def _same_sources(a: Path, b: Path) -> bool:
    files = _sources(a)
    return files == _sources(b) and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def _prefer_installed_build() -> str:
    """Import an installed lowrank_kernels that has the compiled extension, if it matches this checkout."""
    local = REPO / "lowrank_kernels"
    if "lowrank_kernels" in sys.modules:
        return f"{sys.modules['lowrank_kernels'].__file__} (imported before the tests' conftest)"
    if _has_extension(local):
        return "the checkout (./lowrank_kernels, with an in-place build of the extension)"
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != REPO]
    try:
        spec = importlib.util.find_spec("lowrank_kernels")
    finally:
        sys.path[:] = saved
    if spec is None or not spec.submodule_search_locations:
        return "the checkout (./lowrank_kernels); no installed copy"
    installed = Path(list(spec.submodule_search_locations)[0]).resolve()
    if installed == local.resolve() or not _has_extension(installed):
        return "the checkout (./lowrank_kernels); the installed copy has no compiled extension"
    if not _same_sources(local, installed):
        return (f"the checkout (./lowrank_kernels): the installed copy at {installed} has the extension but "
                "other sources (reinstall: LOWRANK_KERNELS_BUILD_CUDA=1 python -m pip install --no-deps "
                "--no-build-isolation .)")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lowrank_kernels"] = module
    spec.loader.exec_module(module)
    return f"the installed build at {installed} (same sources as the checkout, with the extension)"


_CHOICE = _prefer_installed_build()


def pytest_report_header(config):
    import lowrank_kernels

    ok, why = lowrank_kernels.cuda_ext_available()
    kernel = "compiled (csrc/rsvd.cu)" if ok else f"PyTorch fallback ({why})"
    return [f"lowrank_kernels: {_CHOICE}",
            f"rsvd on CUDA tensors: {kernel}; CUDA device: "
            f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}"]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def pytest_sessionstart(session):
    if os.environ.get("LOWRANK_KERNELS_REQUIRE_CUDA_EXT") == "1":
        import lowrank_kernels

        ok, why = lowrank_kernels.cuda_ext_available()
        if not ok:
            raise pytest.UsageError(f"LOWRANK_KERNELS_REQUIRE_CUDA_EXT=1 but the compiled rsvd is not in use: "
                                    f"{why}; tests would use {_CHOICE}")
