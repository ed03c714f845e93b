// The pybind11 module hyperlora._cpu: CPU kernels on raw host pointers (ints) and sizes, no torch C++ ABI.
// Built by setup.py with the host C++ compiler whether or not nvcc exists.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "add_lora_cpu.h"

namespace py = pybind11;

namespace {
template <typename P>
P ptr(uintptr_t v) { return reinterpret_cast<P>(v); }
}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "hyperlora CPU kernels (raw host pointers + sizes; no torch C++ ABI)";
  m.def("isa", &hyperlora::cpu::isa, "'avx2' when the AVX2+FMA build of the kernels runs on this CPU, else 'generic'");
  m.def("force_generic", &hyperlora::cpu::force_generic, py::arg("flag"),
        "use the generic (non-AVX2) build of the kernels even on an AVX2 CPU (tests); returns the old setting");
  m.def(
      "add_lora",
      [](uintptr_t y, int64_t sy_t, uintptr_t x, int64_t sx_t, uintptr_t a, int64_t sa_s, int64_t sa_r, uintptr_t b,
         int64_t sb_s, int64_t sb_o, uintptr_t scales, uintptr_t ranks, uintptr_t token_ids, uintptr_t seg_slots,
         uintptr_t seg_starts, uintptr_t seg_counts, int64_t num_segments, int64_t T, int64_t S, int64_t R,
         int64_t d_in, int64_t d_out, int dtype_code, int num_threads) {
        hyperlora::cpu::AddLoraCpuArgs args;
        args.y = ptr<void*>(y); args.sy_t = sy_t;
        args.x = ptr<const void*>(x); args.sx_t = sx_t;
        args.a = ptr<const void*>(a); args.sa_s = sa_s; args.sa_r = sa_r;
        args.b = ptr<const void*>(b); args.sb_s = sb_s; args.sb_o = sb_o;
        args.scales = ptr<const float*>(scales);
        args.ranks = ptr<const int32_t*>(ranks);
        args.token_ids = ptr<const int32_t*>(token_ids);
        args.seg_slots = ptr<const int32_t*>(seg_slots);
        args.seg_starts = ptr<const int32_t*>(seg_starts);
        args.seg_counts = ptr<const int32_t*>(seg_counts);
        args.num_segments = num_segments;
        args.T = T; args.S = S; args.R = R; args.d_in = d_in; args.d_out = d_out;
        py::gil_scoped_release release;
        hyperlora::cpu::add_lora(args, static_cast<hyperlora::cpu::DType>(dtype_code), num_threads);
      },
      "add_lora(y, sy_t, x, sx_t, a, sa_s, sa_r, b, sb_s, sb_o, scales, ranks, token_ids, seg_slots, seg_starts, "
      "seg_counts, num_segments, T, S, R, d_in, d_out, dtype_code, num_threads): one slice of hyperlora.ops.add_lora on host "
      "pointers (inner strides 1, other strides in elements; scales float32 [S] or 0, ranks int32 [S] or 0, "
      "metadata int32; dtype_code 0 float32, 1 float16, 2 bfloat16; num_threads >= 1 std::threads over "
      "segments). Validated by the caller; metadata "
      "out of range raises ValueError.");
}
