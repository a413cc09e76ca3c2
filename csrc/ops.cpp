// Python module init of lowrank_kernels._C. The module is empty: `from . import _C` in
// lowrank_kernels/linalg.py only needs the shared library loaded, so that the static initializer of
// TORCH_LIBRARY_IMPL in rsvd.cu registers the CUDA kernel of lowrank_kernels::rsvd.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
