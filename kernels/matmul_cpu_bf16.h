// The VDPBF16PS path of the CPU matrix kernel (kernels/matmul_cpu.cc, its only user,
// which explains it): bfloat16 x times bfloat16 W in pairs along k, on CPUs with
// AVX512-BF16. MOELAB_BF16_DOT says whether it is built.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "matmul_cpu_vec.h"

namespace {
// 'km' with bfloat16 pairs: blocks of PAIR_ROWS rows of x (a prompt's prefill has
// hundreds), each block's y[:, m0:m1] in L1 while the chunk's W columns (in L2
// after the first block) pass.
constexpr int64_t PAIR_ROWS = 32;
}  // namespace

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MOELAB_BF16_DOT 1

namespace {

// bfloat16 pairs along k: xp[r, p] = (x[r, 2p + 1] << 16) | x[r, 2p] (bfloat16 bits).
typedef __m512bh BH;

inline BH AsBH(__m512i v) { return (BH)v; }

// The permutes that interleave two rows a, b of 32 bfloat16s into pairs:
// permutex2var(a, lo, b) = (a[0], b[0], ..., a[15], b[15]), with `hi` the 16 after.
struct PairPermutes {
  __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
};

// 16 columns of two W rows (at w and w + ldw) as their 16 pairs.
inline __m512i PairOf16(const uint16_t* w, int64_t ldw, const PairPermutes& perm) {
  const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  const __m512i b =
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + ldw)));
  return _mm512_permutex2var_epi16(a, perm.lo, b);
}

// 'km', P pairs of W rows a pass: out[r, i] += sum_p x[r, 2p] W[2p, i] + x[r, 2p+1] W[2p+1, i]
// for columns i < len (the multiple of 16 below it; the caller does the rest), rows of W
// `ldw` apart. W's two rows of a pair are interleaved in registers (one permute per 16
// columns), then serve every row of x.
template <int P>
int64_t PairsPass(float* out, int64_t ldo, int64_t ldw, const uint32_t* xp, int64_t kp,
                  int64_t rows, const uint16_t* w, int64_t len, int64_t prefetch_rows) {
  const PairPermutes perm;
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    for (int64_t q = 0; q < prefetch_rows; ++q) __builtin_prefetch(w + (2 * P + q) * ldw + i, 0, 2);
    __m512i wv[P][2];
    for (int p = 0; p < P; ++p) {
      const __m512i a = _mm512_loadu_si512(w + 2 * p * ldw + i);
      const __m512i b = _mm512_loadu_si512(w + (2 * p + 1) * ldw + i);
      wv[p][0] = _mm512_permutex2var_epi16(a, perm.lo, b);
      wv[p][1] = _mm512_permutex2var_epi16(a, perm.hi, b);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* o = out + r * ldo + i;
      __m512 acc0 = _mm512_loadu_ps(o), acc1 = _mm512_loadu_ps(o + 16);
      for (int p = 0; p < P; ++p) {
        const BH xb = AsBH(_mm512_set1_epi32(static_cast<int>(xp[r * kp + p])));
        acc0 = _mm512_dpbf16_ps(acc0, AsBH(wv[p][0]), xb);
        acc1 = _mm512_dpbf16_ps(acc1, AsBH(wv[p][1]), xb);
      }
      _mm512_storeu_ps(o, acc0);
      _mm512_storeu_ps(o + 16, acc1);
    }
  }
  if (i + 16 <= len) {
    __m512i wv[P];
    for (int p = 0; p < P; ++p) wv[p] = PairOf16(w + 2 * p * ldw + i, ldw, perm);
    for (int64_t r = 0; r < rows; ++r) {
      float* o = out + r * ldo + i;
      __m512 acc = _mm512_loadu_ps(o);
      for (int p = 0; p < P; ++p)
        acc = _mm512_dpbf16_ps(acc, AsBH(wv[p]),
                               AsBH(_mm512_set1_epi32(static_cast<int>(xp[r * kp + p]))));
      _mm512_storeu_ps(o, acc);
    }
    i += 16;
  }
  return i;
}

// A packed bfloat16 block (matmul_cpu_packed.h: 16 V columns, rows in pairs) by R <= 8 rows
// of x: out[r, :16 V] = x[r, :k2] @ W[:k2, block], the R x V sums in registers down all k2
// (even) rows, one sequential read whose 64-byte loads are whole pairs (4 KB ahead
// prefetched). The pairs run in k order, as in `PairsPass`: the same sums.
template <int R, int V>
void PackedPairColumns(float* out, int64_t ldo, const uint32_t* xp, int64_t kp,
                       const uint16_t* w, int64_t k2) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < k2; q += 2) {
    const uint16_t* wq = w + q * 16 * V;
    __m512i wv[V];
    for (int v = 0; v < V; ++v) {
      __builtin_prefetch(wq + 32 * v + 2048, 0, 2);
      wv[v] = _mm512_loadu_si512(wq + 32 * v);
    }
    for (int r = 0; r < R; ++r) {
      const BH xb = AsBH(_mm512_set1_epi32(static_cast<int>(xp[r * kp + q / 2])));
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], AsBH(wv[v]), xb);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + r * ldo + 16 * v, acc[r][v]);
}

// y[:, :width] for a packed bfloat16 block of 16 or 32 columns and n <= 8 rows of x:
// `PackedPairColumns`, then an odd last row of W by float32 FMAs, as `ChunkKMPairsRows` does.
void PackedPairsBlock(float* y, int64_t ldy, const float* x, const uint32_t* xp,
                      const uint16_t* w, int64_t n, int64_t k, int64_t width) {
  const int64_t kp = (k + 1) / 2, c = k / 2 * 2;
  WithRows(n, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    if (width == 32) PackedPairColumns<R, 2>(y, ldy, xp, kp, w, c);
    else PackedPairColumns<R, 1>(y, ldy, xp, kp, w, c);
  });
  if (c == k) return;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < width; ++j)
      y[r * ldy + j] = std::fma(x[r * k + c], Scalar(w[c * width + j]), y[r * ldy + j]);
}

// 'km' chunk with bfloat16 x: y[:, m0:m1] = x @ W[:, m0:m1], rows of y `ldy` apart and of
// W `ldw`. Pairs of W rows (4 a pass, then 1); the columns past the last 16 and an odd last
// row of W by `RowsPass`'s float32 FMAs.
void ChunkKMPairsRows(float* y, int64_t ldy, const float* x, const uint32_t* xp,
                      const uint16_t* w, int64_t ldw, int64_t n, int64_t k, int64_t m0,
                      int64_t m1) {
  // The block accumulates in a dense tile: rows of y are m floats apart, and with m a
  // multiple of 1024 (3072: FFN-in) they all fall in one L1 set and evict each other.
  // A decode step's few rows fit one set's ways: they accumulate in y itself (the
  // same sums in the same order either way).
  const int64_t kp = (k + 1) / 2, len = m1 - m0;
  const bool direct = n <= 8;
  thread_local std::vector<float> tile;
  if (!direct) tile.assign(n * len, 0.0f);
  float* acc = direct ? y + m0 : tile.data();
  const int64_t ldo = direct ? ldy : len;
  int64_t c = 0, done = len;
  if (direct) {
    for (int64_t r = 0; r < n; ++r) std::fill(acc + r * ldo, acc + r * ldo + len, 0.0f);
  }
  for (; c + 8 <= k; c += 8)
    done = PairsPass<4>(acc, ldo, ldw, xp + c / 2, kp, n, w + c * ldw + m0, len,
                        std::min<int64_t>(8, k - c - 8));
  for (; c + 2 <= k; c += 2)
    done = PairsPass<1>(acc, ldo, ldw, xp + c / 2, kp, n, w + c * ldw + m0, len, 0);
  for (int64_t r = 0; r < n; ++r) {
    float* t = acc + r * ldo;
    for (int64_t j = done; j < len; ++j) {  // the last columns: each pair's two FMAs, in k order
      float acc = 0.0f;
      for (int64_t q = 0; q + 1 < k; q += 2) {
        acc = std::fma(x[r * k + q], Scalar(w[q * ldw + m0 + j]), acc);
        acc = std::fma(x[r * k + q + 1], Scalar(w[(q + 1) * ldw + m0 + j]), acc);
      }
      t[j] = acc;
    }
    if (c < k) {  // an odd last row of W
      for (int64_t j = 0; j < len; ++j)
        t[j] = std::fma(x[r * k + c], Scalar(w[c * ldw + m0 + j]), t[j]);
    }
    if (!direct) std::memcpy(y + r * ldy + m0, t, len * sizeof(float));
  }
}

void ChunkKMPairs(float* y, int64_t ldy, const float* x, const uint32_t* xp, const uint16_t* w,
                  int64_t ldw, int64_t n, int64_t k, int64_t m0, int64_t m1) {
  const int64_t kp = (k + 1) / 2;
  for (int64_t r = 0; r < n; r += PAIR_ROWS) {
    ChunkKMPairsRows(y + r * ldy, ldy, x + r * k, xp + r * kp, w, ldw, std::min(PAIR_ROWS, n - r),
                     k, m0, m1);
  }
}

// 'mk', J rows of W by R rows of x in bfloat16 pairs, 32 k a vector.
template <int J, int R>
void DotTilePairs(float* y, int64_t m, const float* x, const uint32_t* xp, int64_t k,
                  const uint16_t* w, int64_t m0, bool prefetch) {
  __m512 acc[J][R];
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
  const uint16_t* wr = w + m0 * k;
  const int64_t kp = (k + 1) / 2;
  int64_t d = 0;
  for (; d + 32 <= k; d += 32) {
    if (prefetch) {
      for (int j = 0; j < J; ++j) __builtin_prefetch(wr + (J + j) * k + d, 0, 2);
    }
    __m512i wv[J], xv[R];
    for (int j = 0; j < J; ++j) wv[j] = _mm512_loadu_si512(wr + j * k + d);
    for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_si512(xp + r * kp + d / 2);
    for (int j = 0; j < J; ++j)
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], AsBH(wv[j]), AsBH(xv[r]));
  }
  V16 lanes[J * R];
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) std::memcpy(&lanes[j * R + r], &acc[j][r], sizeof(V16));
  FinishTile<J, R>(y, m, m0, lanes, x, k, wr, d);
}

void ChunkMKPairs(float* y, const float* x, const uint32_t* xp, const uint16_t* w, int64_t n,
                  int64_t k, int64_t m, int64_t m0, int64_t m1) {
  const int64_t kp = (k + 1) / 2;
  ForTiles(m0, m1, n, [&](int64_t c, int64_t r, auto j, auto rows, bool prefetch) {
    DotTilePairs<decltype(j)::value, decltype(rows)::value>(y + r * m, m, x + r * k,
                                                            xp + r * kp, k, w, c, prefetch);
  });
}

}  // namespace

#endif  // AVX512-BF16
