// pybind11 registration of the latent_lora CUDA op (kernels in csrc/latent_lora.cu).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "latent_lora.h"

namespace py = pybind11;

namespace hyperlora {

void register_latent_lora(py::module_& m) {
  m.def(
      "latent_lora",
      [](uintptr_t y, uintptr_t x, uintptr_t w_a, uintptr_t w_b, uintptr_t z, uintptr_t slots, uintptr_t scales,
         uintptr_t s_buf, int64_t T, int64_t d_in, int64_t d_out, int64_t R, int64_t K, int dtype, uintptr_t stream) {
        const DType dt = dtype_from_code(dtype);
        cudaError_t err;
        {
          py::gil_scoped_release release;
          err = latent_lora_launch(reinterpret_cast<void*>(y), reinterpret_cast<const void*>(x),
                                   reinterpret_cast<const void*>(w_a), reinterpret_cast<const void*>(w_b),
                                   reinterpret_cast<const float*>(z), reinterpret_cast<const int32_t*>(slots),
                                   reinterpret_cast<const float*>(scales), reinterpret_cast<float*>(s_buf), T, d_in,
                                   d_out, R, K, dt, reinterpret_cast<cudaStream_t>(stream));
        }
        if (err != cudaSuccess) {
          cudaGetLastError();
          throw std::runtime_error(std::string("hyperlora._C.latent_lora: ") + cudaGetErrorString(err));
        }
      },
      py::arg("y"), py::arg("x"), py::arg("w_a"), py::arg("w_b"), py::arg("z"), py::arg("slots"), py::arg("scales"),
      py::arg("s_buf"), py::arg("T"), py::arg("d_in"), py::arg("d_out"), py::arg("R"), py::arg("K"), py::arg("dtype"),
      py::arg("stream"),
      "latent_lora on raw device pointers (y/x/w_a/w_b of `dtype`, z/scales/s_buf float32, slots int32; "
      "scales may be 0 = none): y[t] += scale * w_b @ vec(s_t (x) z[slot_t]) for slot_t >= 0");
}

}  // namespace hyperlora
