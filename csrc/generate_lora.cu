// CUDA kernel for hyperlora.ops.generate_lora (contract in generate_lora.h).
//
// Both halves are a small-K GEMM of the latents against the head, with output columns enumerated in the
// pool's own memory order, so a thread block writes contiguous runs of slot rows:
//   A: column n = r * d_in + i (N_A = R_max * d_in),   weight column = w_a[r*K + k, i]
//   B: column n = o * R_max + r (N_B = d_out * R_max), weight column = w_b[o, r*K + k]
// blockIdx.x enumerates column tiles (A tiles first, then B tiles), blockIdx.y tiles of kRowsPerBlock rows.
// Each thread owns one column: it reads its K head weights once and keeps kRowsPerBlock float accumulators;
// the block's latents sit in shared memory (broadcast reads). The work is bound by the pool writes.
#include "generate_lora.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "convert.cuh"

namespace hyperlora {
namespace {

constexpr int kThreads = 128;       // columns per block
constexpr int kRowsPerBlock = 16;   // (policy, layer) rows per block
constexpr int64_t kMaxK = 512;


template <typename T>
__global__ void generate_lora_kernel(T* __restrict__ pool_a, T* __restrict__ pool_b, const float* __restrict__ z,
                                     const float* __restrict__ w_a, const float* __restrict__ w_b,
                                     const int64_t* __restrict__ slots, const float* __restrict__ scales, int64_t M,
                                     int64_t L, int64_t S, int K, int R, int R_max, int64_t d_in, int64_t d_out,
                                     int64_t tiles_a) {
  extern __shared__ float zs[];  // [kRowsPerBlock][K]
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock;
  for (int idx = threadIdx.x; idx < kRowsPerBlock * K; idx += blockDim.x) {
    const int64_t m = m0 + idx / K;
    zs[idx] = m < M ? z[m * K + idx % K] : 0.f;
  }
  __syncthreads();

  const int64_t tile = blockIdx.x;
  const bool is_b = tile >= tiles_a;
  const int64_t N = is_b ? d_out * R_max : static_cast<int64_t>(R_max) * d_in;
  const int64_t n = (is_b ? tile - tiles_a : tile) * kThreads + threadIdx.x;
  if (n >= N) return;

  int r;
  const float* wcol;
  int64_t wstride;
  if (is_b) {
    const int64_t o = n / R_max;
    r = static_cast<int>(n % R_max);
    wcol = w_b + (o * R + r) * K;
    wstride = 1;
  } else {
    r = static_cast<int>(n / d_in);
    wcol = w_a + static_cast<int64_t>(r) * K * d_in + n % d_in;
    wstride = d_in;
  }
  float acc[kRowsPerBlock];
#pragma unroll
  for (int j = 0; j < kRowsPerBlock; ++j) acc[j] = 0.f;
  if (r < R) {  // ranks R..R_max stay zero
    for (int k = 0; k < K; ++k) {
      const float w = __ldg(wcol + k * wstride);
#pragma unroll
      for (int j = 0; j < kRowsPerBlock; ++j) acc[j] = fmaf(zs[j * K + k], w, acc[j]);
    }
  }
  T* out = is_b ? pool_b : pool_a;
#pragma unroll
  for (int j = 0; j < kRowsPerBlock; ++j) {
    const int64_t m = m0 + j;
    if (m >= M) break;
    const int64_t p = m / L, l = m % L;
    const float v = is_b ? acc[j] * scales[p] : acc[j];
    out[(l * S + slots[p]) * N + n] = from_f<T>(v);
  }
}

template <typename T>
cudaError_t launch(void* pool_a, void* pool_b, const float* z, const float* w_a, const float* w_b,
                   const int64_t* slots, const float* scales, int64_t M, int64_t L, int64_t S, int64_t K, int64_t R,
                   int64_t R_max, int64_t d_in, int64_t d_out, cudaStream_t stream) {
  const int64_t tiles_a = (R_max * d_in + kThreads - 1) / kThreads;
  const int64_t tiles_b = (d_out * R_max + kThreads - 1) / kThreads;
  const int64_t row_tiles = (M + kRowsPerBlock - 1) / kRowsPerBlock;
  if (row_tiles > 65535 || tiles_a + tiles_b > 2147483647LL) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles_a + tiles_b), static_cast<unsigned>(row_tiles));
  const size_t smem = sizeof(float) * kRowsPerBlock * K;
  generate_lora_kernel<T><<<grid, kThreads, smem, stream>>>(
      static_cast<T*>(pool_a), static_cast<T*>(pool_b), z, w_a, w_b, slots, scales, M, L, S, static_cast<int>(K),
      static_cast<int>(R), static_cast<int>(R_max), d_in, d_out, tiles_a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t generate_lora_launch(void* pool_a, void* pool_b, const float* z, const float* w_a, const float* w_b,
                                 const int64_t* slots, const float* scales, int64_t P, int64_t L, int64_t S,
                                 int64_t K, int64_t R, int64_t R_max, int64_t d_in, int64_t d_out, DType dtype,
                                 cudaStream_t stream) {
  if (P == 0 || L == 0) return cudaSuccess;
  if (K <= 0 || K > kMaxK || R <= 0 || R > R_max) return cudaErrorInvalidValue;
  const int64_t M = P * L;
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(pool_a, pool_b, z, w_a, w_b, slots, scales, M, L, S, K, R, R_max, d_in, d_out, stream);
    case DType::kFloat16:
      return launch<__half>(pool_a, pool_b, z, w_a, w_b, slots, scales, M, L, S, K, R, R_max, d_in, d_out, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(pool_a, pool_b, z, w_a, w_b, slots, scales, M, L, S, K, R, R_max, d_in, d_out,
                                   stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hyperlora
