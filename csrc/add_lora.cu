// CUDA kernels of hyperlora.ops.add_lora: shrink and expand over segments of tokens sharing a slot.
//
// Metadata (hyperlora/ops/metadata.py) sorts tokens by slot; segment i covers sorted positions
// [seg_starts[i], seg_starts[i] + seg_counts[i]) with adapter seg_slots[i], for i < num_active[0].
// Block (i, m, .) handles up to BM tokens of segment i, so an adapter row is read once per token block.
//
//  shrink: h[p, r] = scale[s] * sum_k x[tok[p], k] * A[s, r, k]   (float32 h in sorted order, r < rank)
//          one warp per adapter row r; the block's BM token rows of x are staged in shared memory
//  expand: y[tok[p], o] += sum_r h[p, r] * B[s, o, r]              (float32 accumulate, one rounding)
//          one thread per output column o; B tiles staged through shared memory with coalesced loads
//
// Rows with slot -1 are never read or written. Segment bounds are read on the device, so with
// fixed-size metadata the launches can be captured in a CUDA graph (grid over all S slots then).
// Raw device pointers and a cudaStream_t only: nothing here depends on torch's C++ ABI.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "convert.cuh"
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "add_lora.h"
#include "common.h"

namespace hyperlora {
namespace {

constexpr int kWarps = 8;             // warps per shrink block
constexpr int kShrinkChunk = 256;     // d_in elements of x staged per step
constexpr int kExpandCols = 128;      // output columns per expand block (one per thread)
constexpr int kExpandRanks = 32;      // rank columns of B staged per step


struct SegmentView {
  int count, start, slot, rank;
};

// Loads segment `seg`'s bounds; returns false when the block has nothing to do.
__device__ __forceinline__ bool load_segment(const AddLoraArgs& a, int seg, int m0, SegmentView& v) {
  if (seg >= a.num_active[0]) return false;
  v.count = a.seg_counts[seg];
  if (m0 >= v.count) return false;
  v.slot = a.seg_slots[seg];
  v.start = a.seg_starts[seg];
  v.rank = a.ranks ? min(a.ranks[v.slot], a.R) : a.R;
  return v.rank > 0;
}

template <typename T, int BM>
__global__ void __launch_bounds__(kWarps * 32) shrink_kernel(AddLoraArgs a) {
  __shared__ float xs[BM][kShrinkChunk];
  __shared__ int tok[BM];
  SegmentView v;
  const int m0 = blockIdx.y * BM;
  if (!load_segment(a, blockIdx.x, m0, v)) return;
  const int rows = min(BM, v.count - m0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x < BM) tok[threadIdx.x] = threadIdx.x < rows ? a.token_ids[v.start + m0 + threadIdx.x] : 0;
  const T* x = static_cast<const T*>(a.x);
  const T* A = static_cast<const T*>(a.a) + static_cast<int64_t>(v.slot) * a.sa_s;
  const int r_per_block = kWarps * a.rows_per_warp;
  const int r_begin = (blockIdx.z % a.num_r_blocks) * r_per_block;
  const int k_begin = (blockIdx.z / a.num_r_blocks) * a.k_per_split;
  const int k_end = min(k_begin + a.k_per_split, a.d_in);

  float acc[4][BM];  // up to 4 adapter rows per warp
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int m = 0; m < BM; ++m) acc[j][m] = 0.f;

  for (int k0 = k_begin; k0 < k_end; k0 += kShrinkChunk) {
    const int kn = min(kShrinkChunk, k_end - k0);
    __syncthreads();
    for (int e = threadIdx.x; e < BM * kShrinkChunk; e += blockDim.x) {
      const int m = e / kShrinkChunk, k = e % kShrinkChunk;
      xs[m][k] = (m < rows && k < kn) ? to_f(x[static_cast<int64_t>(tok[m]) * a.sx_t + static_cast<int64_t>(k0 + k) * a.sx_d]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j >= a.rows_per_warp) break;
      const int r = r_begin + warp + j * kWarps;
      if (r >= v.rank) continue;
      const T* arow = A + static_cast<int64_t>(r) * a.sa_r + static_cast<int64_t>(k0) * a.sa_d;
      for (int k = lane; k < kn; k += 32) {
        const float w = to_f(arow[static_cast<int64_t>(k) * a.sa_d]);
#pragma unroll
        for (int m = 0; m < BM; ++m) acc[j][m] += w * xs[m][k];
      }
    }
  }
  const float scale = a.scales ? a.scales[v.slot] : 1.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (j >= a.rows_per_warp) break;
    const int r = r_begin + warp + j * kWarps;
    if (r >= v.rank) continue;
#pragma unroll
    for (int m = 0; m < BM; ++m) {
      float s = acc[j][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      // h is zeroed by the caller; partial sums over slices of d_in add up atomically
      if (lane == 0 && m < rows) atomicAdd(&a.h[static_cast<int64_t>(v.start + m0 + m) * a.sh_t + r], s * scale);
    }
  }
}

template <typename T, int BM>
__global__ void __launch_bounds__(kExpandCols) expand_kernel(AddLoraArgs a) {
  __shared__ float hs[BM][kExpandRanks];
  __shared__ float bs[kExpandCols][kExpandRanks + 1];
  __shared__ int tok[BM];
  SegmentView v;
  const int m0 = blockIdx.y * BM;
  if (!load_segment(a, blockIdx.x, m0, v)) return;
  const int rows = min(BM, v.count - m0);
  const int o0 = blockIdx.z * kExpandCols;
  const int o = o0 + threadIdx.x;
  if (threadIdx.x < BM) tok[threadIdx.x] = threadIdx.x < rows ? a.token_ids[v.start + m0 + threadIdx.x] : 0;
  const T* B = static_cast<const T*>(a.b) + static_cast<int64_t>(v.slot) * a.sb_s;
  float acc[BM];
#pragma unroll
  for (int m = 0; m < BM; ++m) acc[m] = 0.f;
  for (int r0 = 0; r0 < v.rank; r0 += kExpandRanks) {
    const int rn = min(kExpandRanks, v.rank - r0);
    __syncthreads();
    for (int e = threadIdx.x; e < BM * kExpandRanks; e += blockDim.x) {
      const int m = e / kExpandRanks, r = e % kExpandRanks;
      hs[m][r] = (m < rows && r < rn) ? a.h[static_cast<int64_t>(v.start + m0 + m) * a.sh_t + r0 + r] : 0.f;
    }
    for (int e = threadIdx.x; e < kExpandCols * kExpandRanks; e += blockDim.x) {
      const int oo = e / kExpandRanks, r = e % kExpandRanks;
      bs[oo][r] = (o0 + oo < a.d_out && r < rn)
                      ? to_f(B[static_cast<int64_t>(o0 + oo) * a.sb_o + static_cast<int64_t>(r0 + r) * a.sb_r])
                      : 0.f;
    }
    __syncthreads();
    for (int r = 0; r < rn; ++r) {
      const float w = bs[threadIdx.x][r];
#pragma unroll
      for (int m = 0; m < BM; ++m) acc[m] += hs[m][r] * w;
    }
  }
  if (o >= a.d_out) return;
  T* y = static_cast<T*>(a.y);
#pragma unroll
  for (int m = 0; m < BM; ++m) {
    if (m < rows) {
      T* p = y + static_cast<int64_t>(tok[m]) * a.sy_t + static_cast<int64_t>(o) * a.sy_o;
      *p = from_f<T>(to_f(*p) + acc[m]);
    }
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("hyperlora._C.add_lora: ") + what + ": " + cudaGetErrorString(err));
  }
}

int num_sms() {
  int dev = 0, sms = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return sms > 0 ? sms : 1;
}

template <typename T, int BM>
void launch_bm(AddLoraArgs args, int grid_seg, int grid_m, cudaStream_t stream) {
  args.rows_per_warp = (args.R + kWarps - 1) / kWarps > 4 ? 4 : (args.R + kWarps - 1) / kWarps;
  const int r_per_block = kWarps * args.rows_per_warp;
  args.num_r_blocks = (args.R + r_per_block - 1) / r_per_block;
  // Decode has one block per adapter: split d_in so that ~2 blocks per SM run, each >= 2 chunks of x.
  const long long blocks = static_cast<long long>(grid_seg) * grid_m * args.num_r_blocks;
  const int chunks = (args.d_in + kShrinkChunk - 1) / kShrinkChunk;
  long long split = (2LL * num_sms() + blocks - 1) / blocks;
  split = split < 1 ? 1 : split;
  if (split > chunks / 2) split = chunks / 2 > 0 ? chunks / 2 : 1;
  if (split > 16) split = 16;
  args.k_per_split = static_cast<int>(((chunks + split - 1) / split) * kShrinkChunk);
  if (args.k_per_split < kShrinkChunk) args.k_per_split = kShrinkChunk;  // d_in == 0
  const int n_split = (args.d_in + args.k_per_split - 1) / args.k_per_split;
  dim3 g1(grid_seg, grid_m, args.num_r_blocks * (n_split > 0 ? n_split : 1));
  shrink_kernel<T, BM><<<g1, kWarps * 32, 0, stream>>>(args);
  check(cudaGetLastError(), "shrink launch");
  dim3 g2(grid_seg, grid_m, (args.d_out + kExpandCols - 1) / kExpandCols);
  expand_kernel<T, BM><<<g2, kExpandCols, 0, stream>>>(args);
  check(cudaGetLastError(), "expand launch");
}

template <typename T>
void launch_t(const AddLoraArgs& args, int max_seg_len, int num_segments, cudaStream_t stream) {
  const bool known = max_seg_len >= 0;
  const int grid_seg = num_segments >= 0 ? num_segments : args.S;
  const int len = known ? max_seg_len : args.T;
  if (grid_seg == 0 || len == 0) return;
  // Decode (one token per adapter) wastes nothing with BM 1; short segments use 8; prefill 16.
  if (known && max_seg_len == 1) {
    launch_bm<T, 1>(args, grid_seg, len, stream);
  } else if (known && max_seg_len <= 8) {
    launch_bm<T, 8>(args, grid_seg, (len + 7) / 8, stream);
  } else {
    launch_bm<T, 16>(args, grid_seg, (len + 15) / 16, stream);
  }
}

}  // namespace

void add_lora_launch(const AddLoraArgs& args, DType dtype, int max_seg_len, int num_segments, cudaStream_t stream) {
  if (args.T == 0 || args.R == 0 || args.d_out == 0) return;
  if (args.R > kMaxRank) throw std::invalid_argument("hyperlora._C.add_lora: R exceeds 256");
  switch (dtype) {
    case DType::kFloat32: launch_t<float>(args, max_seg_len, num_segments, stream); break;
    case DType::kFloat16: launch_t<__half>(args, max_seg_len, num_segments, stream); break;
    case DType::kBFloat16: launch_t<__nv_bfloat16>(args, max_seg_len, num_segments, stream); break;
  }
}

}  // namespace hyperlora
