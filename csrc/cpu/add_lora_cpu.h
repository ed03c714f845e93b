// add_lora on the CPU: a batched GEMV over sorted segments that streams each used adapter once.
// Raw host pointers and sizes only (no torch C++ ABI); the Python caller validates shapes and dtypes.
#pragma once
#include <cstdint>

namespace hyperlora {
namespace cpu {

// Element type codes shared with Python (hyperlora/ops/_cpu_kernel.py), the same as csrc/common.h's.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One slice of add_lora. Every tensor's innermost stride is 1; the others are given in elements.
//   y [T, d_out] (row stride sy_t), x [T, d_in] (sx_t), a [S, R, d_in] (sa_s, sa_r), b [S, d_out, R] (sb_s, sb_o)
//   scales [S] float32 or null (= 1), ranks [S] int32 or null (= R)
//   token_ids [T], seg_slots/seg_starts/seg_counts [>= num_segments] int32: build_meta's sorted segments.
struct AddLoraCpuArgs {
  void* y = nullptr;
  int64_t sy_t = 0;
  const void* x = nullptr;
  int64_t sx_t = 0;
  const void* a = nullptr;
  int64_t sa_s = 0, sa_r = 0;
  const void* b = nullptr;
  int64_t sb_s = 0, sb_o = 0;
  const float* scales = nullptr;
  const int32_t* ranks = nullptr;
  const int32_t* token_ids = nullptr;
  const int32_t* seg_slots = nullptr;
  const int32_t* seg_starts = nullptr;
  const int32_t* seg_counts = nullptr;
  int64_t num_segments = 0;
  int64_t T = 0, S = 0, R = 0, d_in = 0, d_out = 0;
};

// y[t] += scales[s] * (x[t] @ a[s, :r].T) @ b[s, :, :r].T for every token t of every segment (slot s,
// r = ranks[s]); float32 accumulation, one rounding into y. Tokens outside the segments and slots of
// rank 0 are not touched. Throws std::invalid_argument on metadata out of range (before writing).
// num_threads > 1 splits the segments into that many contiguous ranges of about equal work, run on
// std::threads (each segment owns its rows of y, so the result does not depend on the split).
void add_lora(const AddLoraCpuArgs& args, DType dt, int num_threads = 1);

// "avx2" when the AVX2+FMA+F16C build of the kernel runs on this CPU, else "generic".
const char* isa();

// Use the generic build even where AVX2 is available (for tests of that build); returns the old setting.
bool force_generic(bool flag);

}  // namespace cpu
}  // namespace hyperlora
