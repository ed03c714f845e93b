// The latent path (hyperlora.ops.latent_lora) on CUDA: generated adapters applied without materializing them.
// Raw device pointers + a stream, so the extension never depends on torch's C++ ABI.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"

namespace hyperlora {

// y[t] += scale[s] * w_b @ vec(s_t ⊗ z[s]) with s_t[r] = sum_k (w_a @ x[t])[r*K+k] z[s, k], s = slots[t] >= 0.
//   y [T, d_out], x [T, d_in], w_a [R*K, d_in], w_b [d_out, R*K]: contiguous, all of `dtype`;
//   z [S, K] float32; slots [T] int32 (-1 = none, rows left untouched); scales [S] float32 or nullptr (= 1);
//   s_buf [T, R] float32 scratch. Returns the launch error (cudaSuccess when both kernels were queued).
cudaError_t latent_lora_launch(void* y, const void* x, const void* w_a, const void* w_b, const float* z,
                               const int32_t* slots, const float* scales, float* s_buf, int64_t T, int64_t d_in,
                               int64_t d_out, int64_t R, int64_t K, DType dtype, cudaStream_t stream);

}  // namespace hyperlora
