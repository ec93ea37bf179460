// Makes the compiled library importable as `xception_ops._C`. Importing it runs the TORCH_LIBRARY
// registrations; the attributes below tell Python what this build holds (see xception_ops/backend.py).
// Only the setup.py build compiles this file; the CMake build is a plain libtorch library.
#ifdef XCEPTION_OPS_PYTHON_MODULE
#include <Python.h>

#ifndef XCEPTION_OPS_CUDA_ARCHS
#define XCEPTION_OPS_CUDA_ARCHS ""
#endif

#include "cuda_ops_list.h"
#ifdef XCEPTION_OPS_WITH_CUDA
#include "kernels/pointwise_gemm_params.h"
#endif

namespace {
template <size_t N>
PyObject* names_tuple(const std::array<const char*, N>& names) {
  PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(N));
  for (size_t i = 0; t != nullptr && i < N; ++i) PyTuple_SET_ITEM(t, i, PyUnicode_FromString(names[i]));
  return t;
}

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "xception_ops compiled operators", -1, nullptr};
}

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef XCEPTION_OPS_WITH_CUDA
  PyObject* cuda_ops = names_tuple(xception_ops::cuda::kImplementedOps);
  PyObject* auto_ops = names_tuple(xception_ops::cuda::kAutoOps);
  // The builds of Hopper's wgmma GEMM, by the names XCEPTION_OPS_WGMMA_CONFIG takes (the first is the default).
  PyObject* wgmma_configs = PyTuple_New(xception_ops::kPointwiseConfigCount);
  for (int i = 0; wgmma_configs != nullptr && i < xception_ops::kPointwiseConfigCount; ++i) {
    char buf[32];
    const char* name = xception_ops::pointwise_config_name(xception_ops::kPointwiseConfigs[i], buf);
    PyTuple_SET_ITEM(wgmma_configs, i, PyUnicode_FromString(name));
  }
  const int with_cuda = 1;
#else
  PyObject* cuda_ops = PyTuple_New(0);
  PyObject* auto_ops = PyTuple_New(0);
  PyObject* wgmma_configs = PyTuple_New(0);
  const int with_cuda = 0;
#endif
  // PyModule_AddObjectRef leaves the references with us: dropped below whether or not it succeeded.
  const bool ok = PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) == 0 &&
                  PyModule_AddStringConstant(m, "CUDA_ARCHS", XCEPTION_OPS_CUDA_ARCHS) == 0 &&
                  PyModule_AddObjectRef(m, "CUDA_OPS", cuda_ops) == 0 &&
                  PyModule_AddObjectRef(m, "CUDA_AUTO_OPS", auto_ops) == 0 &&
                  PyModule_AddObjectRef(m, "WGMMA_CONFIGS", wgmma_configs) == 0;
  Py_XDECREF(cuda_ops);
  Py_XDECREF(auto_ops);
  Py_XDECREF(wgmma_configs);
  if (!ok) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
#endif  // XCEPTION_OPS_PYTHON_MODULE
