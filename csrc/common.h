// Shared helpers for hyperlora's CUDA ops: dtype codes, error type, pointer/stream casts.
// Kernels take raw device pointers and a cudaStream_t, so nothing here depends on torch's C++ ABI.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace hyperlora {

// Element type codes shared with Python (hyperlora/_cuda.py: DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline DType dtype_from_code(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("hyperlora._C: unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

}  // namespace hyperlora
