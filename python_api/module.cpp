// The pybind11 module `mtkernels._C`: build information only. The ops themselves are registered
// with the dispatcher (schemas.cpp and the TORCH_LIBRARY_IMPL blocks in csrc/), and are reached
// from Python as torch.ops.mtkernels.<op>. This is the one file that includes torch/extension.h.
#include <torch/extension.h>

#ifndef MTKERNELS_VERSION
#define MTKERNELS_VERSION "unknown"
#endif

namespace {

bool built_with_cuda() {
#ifdef MTKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mtkernels native extension (build information; ops live in torch.ops.mtkernels)";
  m.attr("__version__") = MTKERNELS_VERSION;
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in.");
  m.def("built_with_openmp", &built_with_openmp, "True when compiled with -fopenmp.");
  m.def("num_threads", []() { return at::get_num_threads(); },
        "Threads at::parallel_for uses in this process.");
  m.def("torch_version_built_against", []() { return std::string(TORCH_VERSION); },
        "The torch version the extension was compiled against.");
}
