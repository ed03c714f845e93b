// The pybind11 module hyperlora._C. Each op registers its own functions from csrc/<op>_binding.cpp.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

namespace py = pybind11;

namespace hyperlora {
void register_add_lora(py::module_& m);
void register_generate_lora(py::module_& m);
void register_latent_lora(py::module_& m);
}  // namespace hyperlora

#ifndef HYPERLORA_CUDA_ARCHS
#define HYPERLORA_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "hyperlora CUDA kernels (raw device pointers + stream; no torch C++ ABI)";
  m.attr("cuda_archs") = HYPERLORA_CUDA_ARCHS;
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.def("device_count", []() -> py::tuple {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) { cudaGetLastError(); return py::make_tuple(0, std::string(cudaGetErrorString(err))); }
    return py::make_tuple(n, std::string(""));
  }, "(count, error message) of CUDA devices visible to the extension's runtime");
  hyperlora::register_add_lora(m);
  hyperlora::register_generate_lora(m);
  hyperlora::register_latent_lora(m);
}
