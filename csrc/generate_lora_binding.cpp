// pybind11 registration of the generate_lora CUDA op (kernels in csrc/generate_lora.cu).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "generate_lora.h"

namespace py = pybind11;

namespace hyperlora {

void register_generate_lora(py::module_& m) {
  m.def(
      "generate_lora",
      [](uintptr_t pool_a, uintptr_t pool_b, uintptr_t z, uintptr_t w_a, uintptr_t w_b, uintptr_t slots,
         uintptr_t scales, int64_t P, int64_t L, int64_t S, int64_t K, int64_t R, int64_t R_max, int64_t d_in,
         int64_t d_out, int dtype, uintptr_t stream) {
        const DType dt = dtype_from_code(dtype);
        if (K > 512) throw std::invalid_argument("hyperlora._C.generate_lora: K = latent_dim + 1 must be <= 512");
        cudaError_t err;
        {
          py::gil_scoped_release release;
          err = generate_lora_launch(reinterpret_cast<void*>(pool_a), reinterpret_cast<void*>(pool_b),
                                     reinterpret_cast<const float*>(z), reinterpret_cast<const float*>(w_a),
                                     reinterpret_cast<const float*>(w_b), reinterpret_cast<const int64_t*>(slots),
                                     reinterpret_cast<const float*>(scales), P, L, S, K, R, R_max, d_in, d_out, dt,
                                     reinterpret_cast<cudaStream_t>(stream));
        }
        if (err != cudaSuccess) {
          cudaGetLastError();
          throw std::runtime_error(std::string("hyperlora._C.generate_lora: ") + cudaGetErrorString(err));
        }
      },
      py::arg("pool_a"), py::arg("pool_b"), py::arg("z"), py::arg("w_a"), py::arg("w_b"), py::arg("slots"),
      py::arg("scales"), py::arg("P"), py::arg("L"), py::arg("S"), py::arg("K"), py::arg("R"), py::arg("R_max"),
      py::arg("d_in"), py::arg("d_out"), py::arg("dtype"), py::arg("stream"),
      "generate_lora on raw device pointers (pools of `dtype`; z, w_a, w_b, scales float32; slots int64): "
      "writes P x L generated adapters of one module type into their pool slots, scale folded into B");
}

}  // namespace hyperlora
