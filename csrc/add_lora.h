// Interface between the add_lora CUDA launcher (add_lora.cu) and its pybind11 binding (add_lora_binding.cpp).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.h"

namespace hyperlora {

constexpr int kMaxRank = 256;

// One slice of add_lora: y[tok] += scale * (x[tok] A[s, :r]^T) B[s, :, :r]^T. Strides are in elements.
struct AddLoraArgs {
  void* y; int64_t sy_t, sy_o;
  const void* x; int64_t sx_t, sx_d;
  const void* a; int64_t sa_s, sa_r, sa_d;        // [S, R, d_in]
  const void* b; int64_t sb_s, sb_o, sb_r;        // [S, d_out, R]
  float* h; int64_t sh_t;                          // [T, R] float32 scratch, sorted-token order, ZEROED
  const float* scales;                             // [S] float32 or nullptr (= 1)
  const int32_t* ranks;                            // [S] int32 or nullptr (= R)
  const int32_t* token_ids;                        // [T] tokens sorted by slot
  const int32_t* seg_slots;                        // [S]
  const int32_t* seg_starts;                       // [S]
  const int32_t* seg_counts;                       // [S]
  const int32_t* num_active;                       // [2] (segments, tokens with a slot)
  int T, S, R, d_in, d_out;
  int rows_per_warp;                               // set by the launcher
  int num_r_blocks, k_per_split;                   // set by the launcher (shrink split over d_in)
};

// Launches shrink then expand on `stream`. max_seg_len / num_segments: host hints, -1 = unknown
// (then the grid covers all S slots and T tokens, as needed under CUDA-graph capture).
void add_lora_launch(const AddLoraArgs& args, DType dtype, int max_seg_len, int num_segments, cudaStream_t stream);

}  // namespace hyperlora
