// pybind11 registration of the add_lora CUDA op: raw device pointers (ints) + a stream handle.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "add_lora.h"
#include "common.h"

namespace py = pybind11;

namespace hyperlora {

namespace {
template <typename P>
P ptr(uintptr_t v) { return reinterpret_cast<P>(v); }
}  // namespace

void register_add_lora(py::module_& m) {
  m.def(
      "add_lora",
      [](uintptr_t y, int64_t sy_t, int64_t sy_o, uintptr_t x, int64_t sx_t, int64_t sx_d,
         uintptr_t a, int64_t sa_s, int64_t sa_r, int64_t sa_d, uintptr_t b, int64_t sb_s, int64_t sb_o,
         int64_t sb_r, uintptr_t h, int64_t sh_t, uintptr_t scales, uintptr_t ranks, uintptr_t token_ids,
         uintptr_t seg_slots, uintptr_t seg_starts, uintptr_t seg_counts, uintptr_t num_active, int T, int S,
         int R, int d_in, int d_out, int max_seg_len, int num_segments, int dtype_code, uintptr_t stream) {
        AddLoraArgs args{};
        args.y = ptr<void*>(y); args.sy_t = sy_t; args.sy_o = sy_o;
        args.x = ptr<const void*>(x); args.sx_t = sx_t; args.sx_d = sx_d;
        args.a = ptr<const void*>(a); args.sa_s = sa_s; args.sa_r = sa_r; args.sa_d = sa_d;
        args.b = ptr<const void*>(b); args.sb_s = sb_s; args.sb_o = sb_o; args.sb_r = sb_r;
        args.h = ptr<float*>(h); args.sh_t = sh_t;
        args.scales = ptr<const float*>(scales);
        args.ranks = ptr<const int32_t*>(ranks);
        args.token_ids = ptr<const int32_t*>(token_ids);
        args.seg_slots = ptr<const int32_t*>(seg_slots);
        args.seg_starts = ptr<const int32_t*>(seg_starts);
        args.seg_counts = ptr<const int32_t*>(seg_counts);
        args.num_active = ptr<const int32_t*>(num_active);
        args.T = T; args.S = S; args.R = R; args.d_in = d_in; args.d_out = d_out;
        DType dt = dtype_from_code(dtype_code);
        py::gil_scoped_release release;
        add_lora_launch(args, dt, max_seg_len, num_segments, reinterpret_cast<cudaStream_t>(stream));
      },
      "add_lora(y, sy_t, sy_o, x, sx_t, sx_d, a, sa_s, sa_r, sa_d, b, sb_s, sb_o, sb_r, h, sh_t, scales, ranks, "
      "token_ids, seg_slots, seg_starts, seg_counts, num_active, T, S, R, d_in, d_out, max_seg_len, num_segments, "
      "dtype_code, stream): one slice of hyperlora.ops.add_lora on raw device pointers (validated by the caller). "
      "scales float32 [S] or 0, ranks int32 [S] or 0, metadata int32, h float32 [T, R] scratch.");
}

}  // namespace hyperlora
