// pybind11 registration for the latent_lora CUDA op (placeholder until the op's kernels land).
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace hyperlora {
void register_latent_lora(py::module_& m) { (void)m; }
}  // namespace hyperlora
