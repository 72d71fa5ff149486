// Vector helpers of the CPU kernels (kernels/matmul_cpu.cc, paged_attention_cpu.cc):
// 16-float vectors, bfloat16 widening and rounding, the fixed lane-sum tree, the 'mk' tiling
// and the end of its tiles.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

// 16 floats and 16 bfloat16s, loaded unaligned (GCC/Clang vector extensions;
// one AVX-512 register, or two AVX2 ones).
typedef float V16 __attribute__((vector_size(64), aligned(4)));
typedef uint32_t U16x32 __attribute__((vector_size(64), aligned(4)));
typedef uint16_t B16 __attribute__((vector_size(32), aligned(2)));

inline V16 Load(const float* p) { return *reinterpret_cast<const V16*>(p); }

// bfloat16 is the high half of a float32: widen to 32 bits and shift.
inline V16 Load(const uint16_t* p) {
  U16x32 u = __builtin_convertvector(*reinterpret_cast<const B16*>(p), U16x32) << 16;
  V16 f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float Scalar(float w) { return w; }
inline float Scalar(uint16_t w) {
  uint32_t u = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The bfloat16 pair p of a row x_r of k bfloat16s: x_r[2p] low, x_r[2p + 1] (0 past k) high,
// as VDPBF16PS and the AMX tiles take pairs along k.
inline uint32_t PairAt(const uint16_t* x_r, int64_t k, int64_t p) {
  const uint32_t hi = 2 * p + 1 < k ? x_r[2 * p + 1] : 0;
  return x_r[2 * p] | hi << 16;
}

// float32 -> bfloat16, rounded to nearest even (NaN stays a NaN), as XLA's convert.
inline uint16_t RoundBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if (f != f) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// RoundBf16 of n floats, 16 a vector (the same bits).
inline void RoundBf16s(const float* f, uint16_t* out, int64_t n) {
  typedef uint16_t H16 __attribute__((vector_size(32), aligned(2)));
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    U16x32 u;
    std::memcpy(&u, f + i, sizeof(u));
    const V16 v = Load(f + i);
    const U16x32 nan = (v != v);  // all ones where NaN
    const U16x32 r = ((u >> 16) | 0x40) & nan | ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & ~nan;
    const H16 h = __builtin_convertvector(r, H16);
    std::memcpy(out + i, &h, sizeof(h));
  }
  for (; i < n; ++i) out[i] = RoundBf16(f[i]);
}

// One level of a lane-sum tree over two vectors: in blocks of W lanes, a's and
// b's blocks alternate, each the sum of the two halves of one of their 2W-lane
// blocks (indices: block g = i / W takes a (g even) or b at 2W (g / 2) + i % W).
template <int W>
V16 Fold(V16 a, V16 b);
template <>
inline V16 Fold<8>(V16 a, V16 b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                 31);
}
template <>
inline V16 Fold<4>(V16 a, V16 b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
template <>
inline V16 Fold<2>(V16 a, V16 b) {
  return __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
         __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
template <>
inline V16 Fold<1>(V16 a, V16 b) {
  return __builtin_shufflevector(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

// sums[j] = the 16 lanes of v[j] summed, j < count <= 16, by the same tree
// for every j (lane i + 8 first, then + 4, + 2, + 1); after four levels of
// `Fold` lane i holds the sum of v[bit-reversed i].
inline void LaneSums(const V16* v, int count, float* sums) {
  V16 a[16];
  for (int j = 0; j < 16; ++j) a[j] = j < count ? v[j] : V16{};
  for (int j = 0; j < 8; ++j) a[j] = Fold<8>(a[2 * j], a[2 * j + 1]);
  for (int j = 0; j < 4; ++j) a[j] = Fold<4>(a[2 * j], a[2 * j + 1]);
  for (int j = 0; j < 2; ++j) a[j] = Fold<2>(a[2 * j], a[2 * j + 1]);
  const V16 all = Fold<1>(a[0], a[1]);
  for (int j = 0; j < count; ++j) {
    const int r = ((j & 1) << 3) | ((j & 2) << 1) | ((j & 4) >> 1) | ((j & 8) >> 3);
    sums[j] = all[r];
  }
}

// The end of a J x R 'mk' tile: y[r, m0 + j] = the lane sum of v[j R + r] (`LaneSums`)
// plus x[r, t] W[m0 + j, t] for the columns t in [d, k) the vectors left (float32
// FMAs, t ascending); wr = W's row m0 ([M, K], row-major).
template <int J, int R, typename W>
void FinishTile(float* y, int64_t m, int64_t m0, const V16* v, const float* x, int64_t k,
                const W* wr, int64_t d) {
  float sums[J * R];
  LaneSums(v, J * R, sums);
  for (int j = 0; j < J; ++j) {
    for (int r = 0; r < R; ++r) {
      float s = sums[j * R + r];
      for (int64_t t = d; t < k; ++t) s = std::fma(x[r * k + t], Scalar(wr[j * k + t]), s);
      y[r * m + m0 + j] = s;
    }
  }
}

// The 'mk' tiling: W rows [m0, m1) in tiles of J = 4 (then single rows), each by rows
// of x in tiles of R = 4 (then the 1-3 left): tile(c, r, J, R, prefetch) with J and R
// std::integral_constants; a W tile's first x tile prefetches the next W tile.
template <typename Tile>
void ForTiles(int64_t m0, int64_t m1, int64_t n, Tile tile) {
  using std::integral_constant;
  auto rows = [&](int64_t c, auto j, bool prefetch) {
    int64_t r = 0;
    for (; r + 4 <= n; r += 4, prefetch = false)
      tile(c, r, j, integral_constant<int, 4>{}, prefetch);
    switch (n - r) {
      case 3: tile(c, r, j, integral_constant<int, 3>{}, prefetch); break;
      case 2: tile(c, r, j, integral_constant<int, 2>{}, prefetch); break;
      case 1: tile(c, r, j, integral_constant<int, 1>{}, prefetch); break;
      default: break;
    }
  };
  int64_t c = m0;
  for (; c + 4 <= m1; c += 4) rows(c, integral_constant<int, 4>{}, c + 8 <= m1);
  for (; c < m1; ++c) rows(c, integral_constant<int, 1>{}, false);
}

// f(std::integral_constant<int, R>{}) for R = rows, 1 <= rows <= 8: a kernel templated on
// a decode step's rows.
template <typename F>
void WithRows(int64_t rows, F f) {
  using std::integral_constant;
  switch (rows) {
    case 1: f(integral_constant<int, 1>{}); break;
    case 2: f(integral_constant<int, 2>{}); break;
    case 3: f(integral_constant<int, 3>{}); break;
    case 4: f(integral_constant<int, 4>{}); break;
    case 5: f(integral_constant<int, 5>{}); break;
    case 6: f(integral_constant<int, 6>{}); break;
    case 7: f(integral_constant<int, 7>{}); break;
    default: f(integral_constant<int, 8>{}); break;
  }
}

}  // namespace
