// Hypernetwork head -> adapter-pool slots (hyperlora.ops.generate_lora) on CUDA.
// Raw device pointers + a stream, so the extension never depends on torch's C++ ABI.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.h"

namespace hyperlora {

// For m = p * L + l (P policies x L layers of one module type), K = latent size (incl. the bias coordinate):
//   pool_a[l, slots[p], r, i] = sum_k z[m, k] * w_a[(r*K + k), i]                 (r < R; 0 for R <= r < R_max)
//   pool_b[l, slots[p], o, r] = scales[p] * sum_k z[m, k] * w_b[o, r*K + k]        (r < R; 0 for R <= r < R_max)
//   pool_a [L, S, R_max, d_in], pool_b [L, S, d_out, R_max]: contiguous, of `dtype` (written, cast from float32);
//   z [P, L, K], w_a [R*K, d_in], w_b [d_out, R*K], scales [P]: float32 contiguous; slots [P] int64, distinct.
// One launch for both halves. Returns the launch error (cudaSuccess when queued); K must be <= 512.
cudaError_t generate_lora_launch(void* pool_a, void* pool_b, const float* z, const float* w_a, const float* w_b,
                                 const int64_t* slots, const float* scales, int64_t P, int64_t L, int64_t S,
                                 int64_t K, int64_t R, int64_t R_max, int64_t d_in, int64_t d_out, DType dtype,
                                 cudaStream_t stream);

}  // namespace hyperlora
