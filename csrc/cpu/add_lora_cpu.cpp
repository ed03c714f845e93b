// add_lora on the CPU for decode-like batches (few tokens per adapter): per segment, the shrink
// h = scale * x A[s,:r]^T reads A's r rows once for up to 4 tokens, and the expand y += h B[s,:,:r]^T
// reads B's d_out rows once (a block of 8 rows stays in L1 across the block's tokens). So each used
// adapter is streamed from memory once, in order, with no gather copy, no padding and no per-adapter
// dispatch: what bounds it is one core's memory bandwidth plus the arithmetic that does not overlap
// with it (measurements in docs/KERNELS.md). Segments own disjoint rows of y, so an optional split of
// the segments over threads gives the same bits.
//
// Written with GCC/Clang vector extensions (8 x float), compiled twice: a generic build (SSE2 on
// x86-64, whatever the target has elsewhere) and, on x86, an AVX2+FMA+F16C build chosen at run time
// with __builtin_cpu_supports. Only portable compiler flags are needed (-O3 -std=c++17).
#include "add_lora_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // F16C conversions, used only inside the AVX2 build (target attributes)
#define HL_X86 1
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors passed between always-inlined helpers only
#endif

namespace hyperlora {
namespace cpu {
namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

#define HL_INLINE inline __attribute__((always_inline))

HL_INLINE v8f as_f(v8u u) { v8f f; std::memcpy(&f, &u, sizeof f); return f; }
HL_INLINE v8u as_u(v8f f) { v8u u; std::memcpy(&u, &f, sizeof u); return u; }
HL_INLINE float as_f1(uint32_t u) { float f; std::memcpy(&f, &u, sizeof f); return f; }
HL_INLINE uint32_t as_u1(float f) { uint32_t u; std::memcpy(&u, &f, sizeof u); return u; }
HL_INLINE v8u splat(uint32_t v) { return v8u{v, v, v, v, v, v, v, v}; }
HL_INLINE v8u select(v8u mask, v8u yes, v8u no) { return (yes & mask) | (no & ~mask); }

// ---- bfloat16: the high half of a float32; round to nearest even, NaN stays a (quiet) NaN
HL_INLINE float bf16_to_f32(uint16_t h) { return as_f1(uint32_t(h) << 16); }
HL_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t u = as_u1(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
HL_INLINE v8f bf16x8_to_f32(v8h h) { return as_f(__builtin_convertvector(h, v8u) << 16); }
HL_INLINE v8h f32x8_to_bf16(v8f f) {
  v8u u = as_u(f);
  v8u nan = (v8u)((u & 0x7fffffffu) > 0x7f800000u);
  v8u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return __builtin_convertvector(select(nan, (u >> 16) | 0x40u, rounded), v8h);
}

// ---- float16 (IEEE binary16), branch-free bit manipulation (subnormals, inf and NaN included)
HL_INLINE v8f f16x8_to_f32(v8h h16) {
  v8u h = __builtin_convertvector(h16, v8u);
  v8u o = (h & 0x7fffu) << 13;                          // exponent and mantissa in float position
  v8u exp = o & splat(0x7c00u << 13);
  o += splat((127u - 15u) << 23);                        // rebias
  v8u infnan = (v8u)(exp == splat(0x7c00u << 13));
  v8u denorm = (v8u)(exp == 0u);
  o += infnan & splat((128u - 16u) << 23);               // inf/NaN: exponent 255
  v8u renorm = as_u(as_f(o + splat(1u << 23)) - as_f(splat(113u << 23)));  // subnormal: exact via float math
  o = select(denorm, renorm, o);
  return as_f(o | ((h & 0x8000u) << 16));
}
HL_INLINE v8h f32x8_to_f16(v8f fv) {
  v8u f = as_u(fv);
  const v8u sign = f & 0x80000000u;
  f ^= sign;
  const uint32_t f16max = (127u + 16u) << 23, denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  v8u big = (v8u)(f >= f16max);                          // overflow to inf, or inf/NaN
  v8u infnan = select((v8u)(f > splat(255u << 23)), splat(0x7e00u), splat(0x7c00u));
  v8u small = (v8u)(f < splat(113u << 23));              // result is subnormal or zero
  v8u sub = as_u(as_f(f) + as_f(splat(denorm_magic))) - denorm_magic;
  v8u norm = (f + splat(((15u - 127u) << 23) + 0xfffu) + ((f >> 13) & 1u)) >> 13;  // round to nearest even
  v8u o = select(big, infnan, select(small, sub, norm));
  return __builtin_convertvector(o | (sign >> 16), v8h);
}
HL_INLINE float f16_to_f32(uint16_t h) {
  v8h v = {h, 0, 0, 0, 0, 0, 0, 0};
  return f16x8_to_f32(v)[0];
}
HL_INLINE uint16_t f32_to_f16(float f) {
  v8f v = {f, 0, 0, 0, 0, 0, 0, 0};
  return f32x8_to_f16(v)[0];
}

// ---- element access: load/store 8 or 1 element(s) as float32
template <int DT> struct Elem;
template <> struct Elem<0> {
  using S = float;
  static HL_INLINE v8f ld8(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
  static HL_INLINE float ld1(const float* p) { return *p; }
  static HL_INLINE void st8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
  static HL_INLINE void st1(float* p, float v) { *p = v; }
};
template <> struct Elem<1> {
  using S = uint16_t;
  static HL_INLINE v8f ld8(const uint16_t* p) { v8h v; std::memcpy(&v, p, sizeof v); return f16x8_to_f32(v); }
  static HL_INLINE float ld1(const uint16_t* p) { return f16_to_f32(*p); }
  static HL_INLINE void st8(uint16_t* p, v8f v) { v8h h = f32x8_to_f16(v); std::memcpy(p, &h, sizeof h); }
  static HL_INLINE void st1(uint16_t* p, float v) { *p = f32_to_f16(v); }
};
template <> struct Elem<2> {
  using S = uint16_t;
  static HL_INLINE v8f ld8(const uint16_t* p) { v8h v; std::memcpy(&v, p, sizeof v); return bf16x8_to_f32(v); }
  static HL_INLINE float ld1(const uint16_t* p) { return bf16_to_f32(*p); }
  static HL_INLINE void st8(uint16_t* p, v8f v) { v8h h = f32x8_to_bf16(v); std::memcpy(p, &h, sizeof h); }
  static HL_INLINE void st1(uint16_t* p, float v) { *p = f32_to_bf16(v); }
};

#ifdef HL_X86
// float16 through F16C (element code 3): instantiated only inside run_avx2, whose flatten attribute
// inlines these target("f16c") helpers there; the generic build uses Elem<1>'s bit operations.
#define HL_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
template <> struct Elem<3> {
  using S = uint16_t;
  HL_AVX2_TARGET static inline v8f ld8(const uint16_t* p) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    v8f out;
    std::memcpy(&out, &v, sizeof out);
    return out;
  }
  static HL_INLINE float ld1(const uint16_t* p) { return f16_to_f32(*p); }
  HL_AVX2_TARGET static inline void st8(uint16_t* p, v8f v) {
    __m256 m;
    std::memcpy(&m, &v, sizeof m);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(m, _MM_FROUND_TO_NEAREST_INT));
  }
  static HL_INLINE void st1(uint16_t* p, float v) { *p = f32_to_f16(v); }
};
#endif

HL_INLINE v8f load8f(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }

// bfloat16 read 16 at a time as 8 uint32 words: the even elements are the words' low halves, the odd
// elements their high halves, each a float32 after one shift or mask. The float32 operand it meets (x in
// the shrink, h in the expand) is stored with each full block of 16 reordered to (evens, odds).
constexpr bool pairs(int DT) { return DT == 2; }
HL_INLINE v8u load16_words(const uint16_t* p) { v8u v; std::memcpy(&v, p, sizeof v); return v; }
HL_INLINE v8f bf16_even(v8u w) { return as_f(w << 16); }
HL_INLINE v8f bf16_odd(v8u w) { return as_f(w & 0xffff0000u); }

// dst = src (n floats) with each full block of 16 reordered to (evens, odds).
HL_INLINE void deinterleave16(const float* src, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int m = 0; m < 8; ++m) {
      dst[k + m] = src[k + 2 * m];
      dst[k + 8 + m] = src[k + 2 * m + 1];
    }
  for (; k < n; ++k) dst[k] = src[k];
}
HL_INLINE float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// The 8 horizontal sums of a[0..7] as one vector (a transpose-and-add tree: 7 adds, 14 shuffles).
HL_INLINE v8f hsum8(const v8f* a) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define HL_SHUF __builtin_shufflevector
  v8f t0 = HL_SHUF(a[0], a[1], 0, 8, 2, 10, 4, 12, 6, 14) + HL_SHUF(a[0], a[1], 1, 9, 3, 11, 5, 13, 7, 15);
  v8f t1 = HL_SHUF(a[2], a[3], 0, 8, 2, 10, 4, 12, 6, 14) + HL_SHUF(a[2], a[3], 1, 9, 3, 11, 5, 13, 7, 15);
  v8f t2 = HL_SHUF(a[4], a[5], 0, 8, 2, 10, 4, 12, 6, 14) + HL_SHUF(a[4], a[5], 1, 9, 3, 11, 5, 13, 7, 15);
  v8f t3 = HL_SHUF(a[6], a[7], 0, 8, 2, 10, 4, 12, 6, 14) + HL_SHUF(a[6], a[7], 1, 9, 3, 11, 5, 13, 7, 15);
  v8f u0 = HL_SHUF(t0, t1, 0, 1, 8, 9, 4, 5, 12, 13) + HL_SHUF(t0, t1, 2, 3, 10, 11, 6, 7, 14, 15);
  v8f u1 = HL_SHUF(t2, t3, 0, 1, 8, 9, 4, 5, 12, 13) + HL_SHUF(t2, t3, 2, 3, 10, 11, 6, 7, 14, 15);
  return HL_SHUF(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) + HL_SHUF(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
#undef HL_SHUF
#else
  v8f out;
  for (int q = 0; q < 8; ++q) out[q] = hsum(a[q]);
  return out;
#endif
}

constexpr int kTokenBlock = 4;  // tokens sharing one pass over an adapter

// h[i][j0 + q] = x_i . A[j0 + q] for NB tokens and RB rank rows (A rows of length d_in, stride sa_r).
template <int DT, int NB, int RB>
HL_INLINE void shrink_rows(const typename Elem<DT>::S* A, int64_t sa_r, int64_t j0, int64_t d_in,
                           const float* const* xr, float* h, int64_t hs) {
  using E = Elem<DT>;
  const typename E::S* ar[RB];
  for (int q = 0; q < RB; ++q) ar[q] = A + (j0 + q) * sa_r;
  v8f acc[NB][RB];
  for (int i = 0; i < NB; ++i)
    for (int q = 0; q < RB; ++q) acc[i][q] = v8f{};
  int64_t k = 0;
  if constexpr (pairs(DT)) {
    for (; k + 16 <= d_in; k += 16) {
      v8u aw[RB];
      for (int q = 0; q < RB; ++q) aw[q] = load16_words(ar[q] + k);
      for (int i = 0; i < NB; ++i) {
        const v8f xe = load8f(xr[i] + k), xo = load8f(xr[i] + k + 8);
        for (int q = 0; q < RB; ++q) acc[i][q] += xe * bf16_even(aw[q]) + xo * bf16_odd(aw[q]);
      }
    }
  }
  for (; k + 8 <= d_in; k += 8) {
    v8f av[RB];
    for (int q = 0; q < RB; ++q) av[q] = E::ld8(ar[q] + k);
    for (int i = 0; i < NB; ++i) {
      const v8f xv = load8f(xr[i] + k);
      for (int q = 0; q < RB; ++q) acc[i][q] += xv * av[q];
    }
  }
  float tail[NB][RB] = {};
  for (; k < d_in; ++k)
    for (int q = 0; q < RB; ++q) {
      const float av = E::ld1(ar[q] + k);
      for (int i = 0; i < NB; ++i) tail[i][q] += xr[i][k] * av;
    }
  for (int i = 0; i < NB; ++i)
    for (int q = 0; q < RB; ++q) h[i * hs + j0 + q] = hsum(acc[i][q]) + tail[i][q];
}

// One token, one row of A, read front to back (A's rows are consecutive, so the whole adapter is one
// sequential stream); 4 independent accumulators hide the FMA latency.
template <int DT>
HL_INLINE float dot_row(const typename Elem<DT>::S* a, const float* x, int64_t d_in) {
  using E = Elem<DT>;
  v8f acc[4] = {v8f{}, v8f{}, v8f{}, v8f{}};
  int64_t k = 0;
  if constexpr (pairs(DT)) {
    for (; k + 64 <= d_in; k += 64) {
      for (int u = 0; u < 4; ++u) {
        const v8u w = load16_words(a + k + 16 * u);
        acc[u] += load8f(x + k + 16 * u) * bf16_even(w) + load8f(x + k + 16 * u + 8) * bf16_odd(w);
      }
    }
    for (; k + 16 <= d_in; k += 16) {
      const v8u w = load16_words(a + k);
      acc[0] += load8f(x + k) * bf16_even(w) + load8f(x + k + 8) * bf16_odd(w);
    }
  } else {
    for (; k + 32 <= d_in; k += 32) {
      for (int u = 0; u < 4; ++u) acc[u] += load8f(x + k + 8 * u) * E::ld8(a + k + 8 * u);
    }
  }
  for (; k + 8 <= d_in; k += 8) acc[1] += load8f(x + k) * E::ld8(a + k);
  float tail = 0.f;
  for (; k < d_in; ++k) tail += x[k] * E::ld1(a + k);
  return hsum((acc[0] + acc[1]) + (acc[2] + acc[3])) + tail;
}

template <int DT, int NB>
HL_INLINE void shrink(const typename Elem<DT>::S* A, int64_t sa_r, int64_t r, int64_t d_in,
                      const float* const* xr, float* h, int64_t hs) {
  constexpr int RB = NB <= 1 ? 4 : 2;  // NB * RB vector accumulators (8 of 16 AVX2 registers at most)
  if constexpr (NB == 1) {  // one token: row by row, so A streams front to back
    for (int64_t j = 0; j < r; ++j) h[j] = dot_row<DT>(A + j * sa_r, xr[0], d_in);
    return;
  }
  int64_t j = 0;
  for (; j + RB <= r; j += RB) shrink_rows<DT, NB, RB>(A, sa_r, j, d_in, xr, h, hs);
  for (; j < r; ++j) shrink_rows<DT, NB, 1>(A, sa_r, j, d_in, xr, h, hs);
}

// y_i[o] += sum_j h_i[j] B[o, j] for nb tokens; each block of 8 rows of B is read from memory once.
// For bfloat16, h's full blocks of 16 are in (evens, odds) order.
template <int DT>
HL_INLINE void expand(const typename Elem<DT>::S* B, int64_t sb_o, int64_t r, int64_t d_out, const float* h,
                      const float* h_nat, int64_t hs, typename Elem<DT>::S* const* yr, int nb) {
  using E = Elem<DT>;
  const int64_t r16 = pairs(DT) ? (r & ~int64_t(15)) : 0;
  const int64_t r8 = r16 + ((r - r16) & ~int64_t(7));
  int64_t o = 0;
  for (; o + 8 <= d_out; o += 8) {
    const typename E::S* br = B + o * sb_o;
    for (int i = 0; i < nb; ++i) {
      const float* hi = h + i * hs;
      v8f acc[8];
      for (int q = 0; q < 8; ++q) acc[q] = v8f{};
      if constexpr (pairs(DT)) {
        for (int64_t j = 0; j < r16; j += 16) {
          const v8f he = load8f(hi + j), ho = load8f(hi + j + 8);
          for (int q = 0; q < 8; ++q) {
            const v8u bw = load16_words(br + q * sb_o + j);
            acc[q] += he * bf16_even(bw) + ho * bf16_odd(bw);
          }
        }
      }
      for (int64_t j = r16; j < r8; j += 8) {
        const v8f hv = load8f(hi + j);
        for (int q = 0; q < 8; ++q) acc[q] += E::ld8(br + q * sb_o + j) * hv;
      }
      v8f sums = hsum8(acc);
      if (r8 < r) {
        v8f tail = v8f{};
        for (int64_t j = r8; j < r; ++j)
          for (int q = 0; q < 8; ++q) tail[q] += hi[j] * E::ld1(br + q * sb_o + j);
        sums += tail;
      }
      E::st8(yr[i] + o, E::ld8(yr[i] + o) + sums);
    }
  }
  for (; o < d_out; ++o) {
    const typename E::S* bo = B + o * sb_o;
    for (int i = 0; i < nb; ++i) {
      float acc = 0.f;
      for (int64_t j = 0; j < r; ++j) acc += h_nat[i * hs + j] * E::ld1(bo + j);
      E::st1(yr[i] + o, E::ld1(yr[i] + o) + acc);
    }
  }
}

template <int DT>
HL_INLINE void run(const AddLoraCpuArgs& p, int64_t g_begin, int64_t g_end) {
  using E = Elem<DT>;
  using S = typename E::S;
  const int64_t d_in = p.d_in, d_out = p.d_out;
  const int64_t hs = (p.R + 7) & ~int64_t(7);
  std::vector<float> hbuf(size_t(kTokenBlock * hs), 0.f);
  std::vector<float> hpbuf(pairs(DT) ? size_t(kTokenBlock * hs) : 0, 0.f);
  std::vector<float> xbuf(DT == 0 ? 0 : size_t(kTokenBlock * d_in));
  const S* x = static_cast<const S*>(p.x);
  S* y = static_cast<S*>(p.y);
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t s = p.seg_slots[g], start = p.seg_starts[g], n = p.seg_counts[g];
    const int64_t r = p.ranks ? p.ranks[s] : p.R;
    if (r <= 0 || n <= 0) continue;
    const float sc = p.scales ? p.scales[s] : 1.f;
    const S* A = static_cast<const S*>(p.a) + s * p.sa_s;
    const S* B = static_cast<const S*>(p.b) + s * p.sb_s;
    if (g + 1 < g_end) {  // the next adapter's first lines, while this one streams
      const int64_t s2 = p.seg_slots[g + 1];
      __builtin_prefetch(static_cast<const S*>(p.a) + s2 * p.sa_s);
      __builtin_prefetch(static_cast<const S*>(p.b) + s2 * p.sb_s);
    }
    for (int64_t i0 = 0; i0 < n; i0 += kTokenBlock) {
      const int nb = int(std::min<int64_t>(kTokenBlock, n - i0));
      const float* xr[kTokenBlock];
      S* yr[kTokenBlock];
      for (int i = 0; i < nb; ++i) {
        const int64_t t = p.token_ids[start + i0 + i];
        yr[i] = y + t * p.sy_t;
        if (DT == 0) {
          xr[i] = reinterpret_cast<const float*>(x + t * p.sx_t);
        } else {
          float* dst = xbuf.data() + i * d_in;
          const S* src = x + t * p.sx_t;
          int64_t k = 0;
          if constexpr (pairs(DT)) {
            for (; k + 16 <= d_in; k += 16) {
              const v8u w = load16_words(src + k);
              Elem<0>::st8(dst + k, bf16_even(w));
              Elem<0>::st8(dst + k + 8, bf16_odd(w));
            }
          }
          for (; k + 8 <= d_in; k += 8) Elem<0>::st8(dst + k, E::ld8(src + k));
          for (; k < d_in; ++k) dst[k] = E::ld1(src + k);
          xr[i] = dst;
        }
      }
      float* h = hbuf.data();
      switch (nb) {
        case 1: shrink<DT, 1>(A, p.sa_r, r, d_in, xr, h, hs); break;
        case 2: shrink<DT, 2>(A, p.sa_r, r, d_in, xr, h, hs); break;
        case 3: shrink<DT, 3>(A, p.sa_r, r, d_in, xr, h, hs); break;
        default: shrink<DT, 4>(A, p.sa_r, r, d_in, xr, h, hs); break;
      }
      for (int i = 0; i < nb; ++i)
        for (int64_t j = 0; j < r; ++j) h[i * hs + j] *= sc;
      const float* hp = h;
      if constexpr (pairs(DT)) {
        for (int i = 0; i < nb; ++i) deinterleave16(h + i * hs, hpbuf.data() + i * hs, r);
        hp = hpbuf.data();
      }
      expand<DT>(B, p.sb_o, r, d_out, hp, h, hs, yr, nb);
    }
  }
}

__attribute__((flatten)) void run_generic(const AddLoraCpuArgs& p, DType dt, int64_t g0, int64_t g1) {
  switch (dt) {
    case DType::kFloat32: run<0>(p, g0, g1); break;
    case DType::kFloat16: run<1>(p, g0, g1); break;
    case DType::kBFloat16: run<2>(p, g0, g1); break;
  }
}

#if defined(__x86_64__) || defined(__i386__)
#define HL_HAVE_AVX2_BUILD 1
__attribute__((target("avx2,fma,f16c"), flatten)) void run_avx2(const AddLoraCpuArgs& p, DType dt, int64_t g0,
                                                                 int64_t g1) {
  switch (dt) {
    case DType::kFloat32: run<0>(p, g0, g1); break;
    case DType::kFloat16: run<3>(p, g0, g1); break;  // F16C conversions
    case DType::kBFloat16: run<2>(p, g0, g1); break;
  }
}

bool cpu_has_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return yes;
}
#endif

std::atomic<bool> g_force_generic{false};

void check(const AddLoraCpuArgs& p) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("hyperlora._cpu.add_lora: " + what); };
  if (p.T < 0 || p.S < 1 || p.R < 0 || p.d_in < 0 || p.d_out < 0 || p.num_segments < 0 || p.num_segments > p.S)
    fail("bad sizes (T, S, R, d_in, d_out, num_segments)");
  if (p.num_segments > 0 && (!p.token_ids || !p.seg_slots || !p.seg_starts || !p.seg_counts || !p.x || !p.y ||
                             !p.a || !p.b))
    fail("null pointer");
  for (int64_t g = 0; g < p.num_segments; ++g) {
    const int64_t s = p.seg_slots[g], start = p.seg_starts[g], n = p.seg_counts[g];
    if (s < 0 || s >= p.S) fail("segment slot " + std::to_string(s) + " outside [0, S)");
    if (start < 0 || n < 0 || start + n > p.T) fail("segment outside the T token ids");
    if (p.ranks && (p.ranks[s] < 0 || p.ranks[s] > p.R)) fail("rank of slot " + std::to_string(s) + " outside [0, R]");
    for (int64_t i = start; i < start + n; ++i)
      if (p.token_ids[i] < 0 || p.token_ids[i] >= p.T) fail("token id outside [0, T)");
  }
}

void run_range(const AddLoraCpuArgs& p, DType dt, int64_t g0, int64_t g1) {
#ifdef HL_HAVE_AVX2_BUILD
  if (cpu_has_avx2() && !g_force_generic.load(std::memory_order_relaxed)) {
    run_avx2(p, dt, g0, g1);
    return;
  }
#endif
  run_generic(p, dt, g0, g1);
}

}  // namespace

void add_lora(const AddLoraCpuArgs& p, DType dt, int num_threads) {
  if (int(dt) < 0 || int(dt) > 2) throw std::invalid_argument("hyperlora._cpu.add_lora: unknown dtype code");
  check(p);
  if (p.num_segments == 0 || p.d_out == 0 || p.R == 0) return;
  const int64_t n_seg = p.num_segments;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, n_seg)));
  if (threads == 1) {
    run_range(p, dt, 0, n_seg);
    return;
  }
  // Contiguous ranges of segments with about equal work (rank x token blocks; d_in, d_out are common).
  // Segments own disjoint rows of y, so the ranges never write the same memory.
  std::vector<int64_t> cum(size_t(n_seg) + 1, 0);
  for (int64_t g = 0; g < n_seg; ++g) {
    const int64_t r = p.ranks ? p.ranks[p.seg_slots[g]] : p.R;
    cum[g + 1] = cum[g] + r * ((p.seg_counts[g] + kTokenBlock - 1) / kTokenBlock);
  }
  std::vector<int64_t> bounds(size_t(threads) + 1, n_seg);
  bounds[0] = 0;
  for (int i = 1; i < threads; ++i) {
    const int64_t target = cum[n_seg] * i / threads;
    bounds[i] = std::max(bounds[i - 1], int64_t(std::lower_bound(cum.begin(), cum.end(), target) - cum.begin()));
    bounds[i] = std::min(bounds[i], n_seg);
  }
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  std::vector<std::thread> pool;
  pool.reserve(size_t(threads - 1));
  int spawned = 0;
  for (int i = 1; i < threads; ++i) {
    try {
      pool.emplace_back([&, i] {
        try {
          run_range(p, dt, bounds[i], bounds[i + 1]);
        } catch (...) {
          errors[i] = std::current_exception();
        }
      });
      spawned = i;
    } catch (const std::system_error&) {  // no more threads: this one does the rest
      break;
    }
  }
  try {
    run_range(p, dt, bounds[0], bounds[1]);
    if (spawned + 1 < threads) run_range(p, dt, bounds[spawned + 1], n_seg);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& t : pool) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

const char* isa() {
#ifdef HL_HAVE_AVX2_BUILD
  if (cpu_has_avx2() && !g_force_generic.load(std::memory_order_relaxed)) return "avx2";
#endif
  return "generic";
}

bool force_generic(bool flag) { return g_force_generic.exchange(flag); }

}  // namespace cpu
}  // namespace hyperlora
