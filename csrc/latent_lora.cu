// CUDA kernels of the latent path (see csrc/latent_lora.h and hyperlora/ops/latent_lora.py).
//
// Two launches, the per-token contraction with z fused into both GEMMs so u = x @ w_a^T ([T, R*K]) never
// reaches memory:
//   1. latent_shrink_kernel, grid (token tiles, R): a block computes u for 16 tokens over the K columns of
//      rank r (in chunks of 16), multiplies by z[slot_t, k] and reduces into s[t, r] (scale folded in).
//   2. latent_expand_kernel, grid (token tiles, d_out tiles): builds the operand tile
//      p[t, j] = s[t, j / K] * z[slot_t, j % K] in shared memory and multiplies it by w_b ([d_out, R*K]);
//      adds into y only for rows with slot >= 0 (slot -1 rows are never written).
// Accumulation is float32 on CUDA cores; inputs float32, float16 or bfloat16.
#include "latent_lora.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "convert.cuh"

namespace hyperlora {
namespace {

constexpr int kTileT = 16;      // tokens per block (both kernels)
constexpr int kChunkN = 16;     // columns of u per shrink chunk
constexpr int kTileD = 64;      // d_in per shrink step
constexpr int kTileO = 64;      // outputs per expand block
constexpr int kTileJ = 32;      // R*K per expand step
constexpr int kThreads = 256;


// Loads this block's slots; returns whether any of its tokens has an adapter (block-uniform).
__device__ __forceinline__ bool load_slots(const int32_t* slots, int64_t T, int64_t t0, int* s_slot) {
  if (threadIdx.x < kTileT) {
    int64_t t = t0 + threadIdx.x;
    s_slot[threadIdx.x] = t < T ? slots[t] : -1;
  }
  __syncthreads();
  int any = 0;
  for (int i = 0; i < kTileT; ++i) any |= (s_slot[i] >= 0);
  return any != 0;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) latent_shrink_kernel(
    const T* __restrict__ x, const T* __restrict__ w_a, const float* __restrict__ z,
    const int32_t* __restrict__ slots, const float* __restrict__ scales, float* __restrict__ s_out,
    int64_t T_, int64_t d_in, int64_t R, int64_t K) {
  __shared__ int s_slot[kTileT];
  __shared__ float xs[kTileT][kTileD + 1];
  __shared__ float ws[kChunkN][kTileD + 1];
  __shared__ float red[kTileT][kChunkN + 1];
  const int64_t t0 = int64_t(blockIdx.x) * kTileT;
  const int64_t r = blockIdx.y;
  const bool any = load_slots(slots, T_, t0, s_slot);
  const int tt = threadIdx.x / kChunkN;  // token in tile
  const int cc = threadIdx.x % kChunkN;  // column in chunk
  if (!any) {
    if (threadIdx.x < kTileT && t0 + threadIdx.x < T_) s_out[(t0 + threadIdx.x) * R + r] = 0.f;
    return;
  }
  const int slot = s_slot[tt];
  float s_acc = 0.f;  // partial s[t, r] of this thread's column(s)
  for (int64_t k0 = 0; k0 < K; k0 += kChunkN) {
    float acc = 0.f;
    for (int64_t d0 = 0; d0 < d_in; d0 += kTileD) {
      for (int i = threadIdx.x; i < kTileT * kTileD; i += kThreads) {
        int a = i / kTileD, d = i % kTileD;
        int64_t t = t0 + a, dd = d0 + d;
        xs[a][d] = (s_slot[a] >= 0 && dd < d_in) ? to_f(x[t * d_in + dd]) : 0.f;
      }
      for (int i = threadIdx.x; i < kChunkN * kTileD; i += kThreads) {
        int c = i / kTileD, d = i % kTileD;
        int64_t k = k0 + c, dd = d0 + d;
        ws[c][d] = (k < K && dd < d_in) ? to_f(w_a[(r * K + k) * d_in + dd]) : 0.f;
      }
      __syncthreads();
#pragma unroll 16
      for (int d = 0; d < kTileD; ++d) acc += xs[tt][d] * ws[cc][d];
      __syncthreads();
    }
    const int64_t k = k0 + cc;
    if (slot >= 0 && k < K) s_acc += acc * z[int64_t(slot) * K + k];
  }
  red[tt][cc] = s_acc;
  __syncthreads();
  if (threadIdx.x < kTileT) {
    const int a = threadIdx.x;
    const int64_t t = t0 + a;
    if (t < T_) {
      float v = 0.f;
      for (int c = 0; c < kChunkN; ++c) v += red[a][c];
      const int sl = s_slot[a];
      if (sl >= 0 && scales != nullptr) v *= scales[sl];
      s_out[t * R + r] = sl >= 0 ? v : 0.f;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) latent_expand_kernel(
    T* __restrict__ y, const float* __restrict__ s_in, const float* __restrict__ z, const int32_t* __restrict__ slots,
    const T* __restrict__ w_b, int64_t T_, int64_t d_out, int64_t R, int64_t K) {
  __shared__ int s_slot[kTileT];
  __shared__ float ps[kTileT][kTileJ + 1];
  __shared__ float ws[kTileO][kTileJ + 1];
  const int64_t t0 = int64_t(blockIdx.x) * kTileT;
  const int64_t o0 = int64_t(blockIdx.y) * kTileO;
  if (!load_slots(slots, T_, t0, s_slot)) return;
  const int64_t RK = R * K;
  // thread -> (token, 4 outputs): 16 tokens x 16 output groups of 4
  const int tt = threadIdx.x / (kTileO / 4);
  const int og = threadIdx.x % (kTileO / 4);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t j0 = 0; j0 < RK; j0 += kTileJ) {
    for (int i = threadIdx.x; i < kTileT * kTileJ; i += kThreads) {
      int a = i / kTileJ, jj = i % kTileJ;
      int64_t j = j0 + jj;
      int sl = s_slot[a];
      float v = 0.f;
      if (sl >= 0 && j < RK) {
        // the operand is rounded to the weights' dtype, as a tensor-core GEMM would take it
        v = to_f(from_f<T>(s_in[(t0 + a) * R + j / K] * z[int64_t(sl) * K + j % K]));
      }
      ps[a][jj] = v;
    }
    for (int i = threadIdx.x; i < kTileO * kTileJ; i += kThreads) {
      int o = i / kTileJ, jj = i % kTileJ;
      int64_t oo = o0 + o, j = j0 + jj;
      ws[o][jj] = (oo < d_out && j < RK) ? to_f(w_b[oo * RK + j]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int jj = 0; jj < kTileJ; ++jj) {
      const float p = ps[tt][jj];
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[q] += p * ws[og + q * (kTileO / 4)][jj];
    }
    __syncthreads();
  }
  const int64_t t = t0 + tt;
  if (t < T_ && s_slot[tt] >= 0) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t o = o0 + og + q * (kTileO / 4);
      if (o < d_out) {
        T* p = y + t * d_out + o;
        *p = from_f<T>(to_f(*p) + acc[q]);
      }
    }
  }
}

template <typename T>
cudaError_t launch_typed(void* y, const void* x, const void* w_a, const void* w_b, const float* z,
                         const int32_t* slots, const float* scales, float* s_buf, int64_t T_, int64_t d_in,
                         int64_t d_out, int64_t R, int64_t K, cudaStream_t stream) {
  const unsigned tiles = unsigned((T_ + kTileT - 1) / kTileT);
  latent_shrink_kernel<T><<<dim3(tiles, unsigned(R)), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(w_a), z, slots, scales, s_buf, T_, d_in, R, K);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  latent_expand_kernel<T><<<dim3(tiles, unsigned((d_out + kTileO - 1) / kTileO)), kThreads, 0, stream>>>(
      static_cast<T*>(y), s_buf, z, slots, static_cast<const T*>(w_b), T_, d_out, R, K);
  return cudaGetLastError();
}

}  // namespace

cudaError_t latent_lora_launch(void* y, const void* x, const void* w_a, const void* w_b, const float* z,
                               const int32_t* slots, const float* scales, float* s_buf, int64_t T, int64_t d_in,
                               int64_t d_out, int64_t R, int64_t K, DType dtype, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (R <= 0 || K <= 0 || d_in <= 0 || d_out <= 0 || R > 65535) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<float>(y, x, w_a, w_b, z, slots, scales, s_buf, T, d_in, d_out, R, K, stream);
    case DType::kFloat16:
      return launch_typed<__half>(y, x, w_a, w_b, z, slots, scales, s_buf, T, d_in, d_out, R, K, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(y, x, w_a, w_b, z, slots, scales, s_buf, T, d_in, d_out, R, K, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hyperlora
