// Makes the compiled library importable as `xception_ops._C`. Importing it runs the TORCH_LIBRARY
// registrations; the attributes below tell Python what this build holds (see xception_ops/backend.py).
// Only the setup.py build compiles this file; the CMake build is a plain libtorch library.
#ifdef XCEPTION_OPS_PYTHON_MODULE
#include <Python.h>

#ifndef XCEPTION_OPS_CUDA_ARCHS
#define XCEPTION_OPS_CUDA_ARCHS ""
#endif

#ifdef XCEPTION_OPS_WITH_CUDA
#include "cuda_ops_list.h"
#endif

namespace {
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "xception_ops compiled operators", -1, nullptr};
}

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef XCEPTION_OPS_WITH_CUDA
  PyObject* cuda_ops = PyTuple_New(static_cast<Py_ssize_t>(xception_ops::cuda::kImplementedOps.size()));
  for (size_t i = 0; i < xception_ops::cuda::kImplementedOps.size(); ++i) {
    PyTuple_SET_ITEM(cuda_ops, i, PyUnicode_FromString(xception_ops::cuda::kImplementedOps[i]));
  }
  const int with_cuda = 1;
#else
  PyObject* cuda_ops = PyTuple_New(0);
  const int with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) < 0 ||
      PyModule_AddStringConstant(m, "CUDA_ARCHS", XCEPTION_OPS_CUDA_ARCHS) < 0 ||
      PyModule_AddObject(m, "CUDA_OPS", cuda_ops) < 0) {
    Py_XDECREF(cuda_ops);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
#endif  // XCEPTION_OPS_PYTHON_MODULE
