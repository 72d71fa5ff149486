// Decode-sized products y = x @ W on CPU, as an XLA FFI custom call.
//
//   layout 'km':  W [K, M],  y[n, m] = sum_k x[n, k] W[k, m]
//   layout 'mk':  W [M, K],  y[n, m] = sum_k x[n, k] W[m, k]     (a tied unembedding)
//
// x [N, K] float32, W float32 or bfloat16, y [N, M] float32; accumulation in
// float32 (a bfloat16 weight is widened exactly, in registers), by fused
// multiply-adds (explicit in the scalar tails, so that a column computes the
// same in every code path).
//
// Why a kernel: a decode step reads every weight once for its few rows, so it
// is bound by the weight stream. XLA:CPU widens bfloat16 weights to float32
// in a separate pass before its dot (reading 2 bytes, writing 4 and reading
// them again per weight), and with several rows and no YNNPACK multiplies by
// a transposed [M, K] weight far below the read rate. Here W is read once, in
// place, for all N rows. Both layouts split the output columns m into chunks
// of about `chunk_bytes` of W, claimed by the threads of XLA's intra-op pool;
// a chunk writes its own columns of y, so there are no partial sums to add:
//
//   'km': chunk c holds columns [m0, m1) of W (a block of K row segments) and
//         computes y[:, m0:m1] = x @ W[:, m0:m1], 8 rows of W a pass over the
//         block's columns (the same columns of the next 8 rows prefetched);
//         the block is at most OUT_TILE_BYTES / (4 N) columns wide, so the
//         y[:, m0:m1] that each pass loads and stores stays in L1;
//   'mk': chunk c holds rows [m0, m1) of W and writes y[:, m0:m1]; 4 rows at a
//         time stay in L1 while every row of x passes, and the 4 x R dot
//         products' vectors are summed across lanes together (`LaneSums`).
//
// Every y[n, m] is summed in one order that depends on K alone (k ascending
// in 'km'; 16-lane partial sums over k, then a fixed tree across lanes, then
// the K % 16 tail in 'mk'), whatever the chunks, the threads or the other rows
// of x: results do not depend on the thread count, `chunk_bytes` or the batch.
// With bfloat16 x and W (`x_bf16`: x's values are bfloat16 numbers, widened) and a
// CPU with AVX512-BF16, both layouts multiply pairs of bfloat16s along k with
// VDPBF16PS (y += x[k] W[k] + x[k+1] W[k+1], float32 accumulation; each product of
// two bfloat16s is exact in float32): half the instructions of the float32 FMAs,
// which bound a step of several rows ('km' Q = 8 rows of W a pass becomes 4 pairs,
// 'mk' 32 k a vector instead of 16). The order of every sum is again fixed by K.
//
// Chunks are claimed from a counter by the calling thread and the pool tasks
// alike, so a busy core delays only what it claimed and the call finishes
// even when no pool thread is free; the state lives on the heap because a
// task may start after the call returned.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MOELAB_BF16_DOT 1
#endif

namespace ffi = xla::ffi;

namespace {

// 16 floats and 16 bfloat16s, loaded unaligned (GCC/Clang vector extensions;
// one AVX-512 register, or two AVX2 ones).
typedef float V16 __attribute__((vector_size(64), aligned(4)));
typedef uint32_t U16x32 __attribute__((vector_size(64), aligned(4)));
typedef uint16_t B16 __attribute__((vector_size(32), aligned(2)));

// 'km': widest y[:, m0:m1] block (bytes) a chunk updates per pass (L1-resident).
constexpr int64_t OUT_TILE_BYTES = 16 << 10;
// 'km' with bfloat16 pairs: blocks of PAIR_ROWS rows of x (a prompt's prefill has
// hundreds), each block's y[:, m0:m1] in L1 while the chunk's W columns (in L2
// after the first block) pass.
constexpr int64_t PAIR_ROWS = 32;

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

// 'km', Q rows of W a pass: out[r, i] += sum_{q < Q} s[r, q] W[q, i] for every row r of x
// and column i < len. The Q x C weight vectors at columns i .. i + 16C are loaded
// once for all rows; each row's Q scalars are broadcast once for the C vectors.
// A row of W is a short stream for the hardware prefetchers, so the same
// columns of the next pass's rows are prefetched while this pass runs.
template <int Q, int C, typename W>
void RowsPass(float* out, int64_t m, const float* s, int64_t k, int64_t rows, const W* w,
              int64_t len, int64_t prefetch_rows) {
  constexpr int64_t line = 64 / sizeof(W);  // weights per cache line
  int64_t i = 0;
  for (; i + 16 * C <= len; i += 16 * C) {
    for (int64_t q = 0; q < prefetch_rows; ++q)
      for (int64_t j = 0; j < 16 * C; j += line) __builtin_prefetch(w + (Q + q) * m + i + j, 0, 2);
    V16 wv[Q][C];
    for (int q = 0; q < Q; ++q)
      for (int c = 0; c < C; ++c) wv[q][c] = Load(w + q * m + i + 16 * c);
    for (int64_t r = 0; r < rows; ++r) {
      float* o = out + r * m + i;
      const float* sr = s + r * k;
      V16 acc[C];
      for (int c = 0; c < C; ++c) acc[c] = Load(o + 16 * c);
      for (int q = 0; q < Q; ++q) {
        const float b = sr[q];
        for (int c = 0; c < C; ++c) acc[c] += b * wv[q][c];
      }
      for (int c = 0; c < C; ++c) *reinterpret_cast<V16*>(o + 16 * c) = acc[c];
    }
  }
  if constexpr (C > 1) {
    if (i + 16 <= len) {
      RowsPass<Q, 1>(out + i, m, s, k, rows, w + i, len - i, prefetch_rows);
      return;
    }
  }
  for (; i < len; ++i) {
    for (int64_t r = 0; r < rows; ++r) {
      float acc = out[r * m + i];
      for (int q = 0; q < Q; ++q) acc = std::fma(s[r * k + q], Scalar(w[q * m + i]), acc);
      out[r * m + i] = acc;
    }
  }
}

// 'km' chunk: y[:, m0:m1] = x @ W[:, m0:m1], 8 rows of W a pass.
template <typename W>
void ChunkKM(float* y, const float* x, const W* w, int64_t n, int64_t k, int64_t m,
             int64_t m0, int64_t m1) {
  for (int64_t r = 0; r < n; ++r) std::fill(y + r * m + m0, y + r * m + m1, 0.0f);
  int64_t c = 0;
  for (; c + 8 <= k; c += 8) {
    RowsPass<8, 2>(y + m0, m, x + c, k, n, w + c * m + m0, m1 - m0,
                   std::min<int64_t>(8, k - c - 8));
  }
  for (; c < k; ++c) RowsPass<1, 2>(y + m0, m, x + c, k, n, w + c * m + m0, m1 - m0, 0);
}

// 'mk', J rows of W by R rows of x: y[r, m0 + j] = x[r, :] . W[m0 + j, :].
template <int J, int R, typename W>
void DotTile(float* y, int64_t m, const float* x, int64_t k, const W* w, int64_t m0,
             bool prefetch) {
  V16 acc[J][R];
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = V16{};
  const W* wr = w + m0 * k;
  int64_t d = 0;
  for (; d + 16 <= k; d += 16) {
    if (prefetch) {
      for (int j = 0; j < J; ++j) __builtin_prefetch(wr + (J + j) * k + d, 0, 2);
    }
    V16 wv[J], xv[R];
    for (int j = 0; j < J; ++j) wv[j] = Load(wr + j * k + d);
    for (int r = 0; r < R; ++r) xv[r] = Load(x + r * k + d);
    for (int j = 0; j < J; ++j)
      for (int r = 0; r < R; ++r) acc[j][r] += wv[j] * xv[r];
  }
  float sums[J * R];
  LaneSums(&acc[0][0], J * R, sums);
  for (int j = 0; j < J; ++j) {
    for (int r = 0; r < R; ++r) {
      float s = sums[j * R + r];
      for (int64_t t = d; t < k; ++t) s = std::fma(x[r * k + t], Scalar(wr[j * k + t]), s);
      y[r * m + m0 + j] = s;
    }
  }
}

template <int J, typename W>
void DotRows(float* y, int64_t m, const float* x, int64_t n, int64_t k, const W* w, int64_t m0,
             bool prefetch) {
  int64_t r = 0;
  for (; r + 4 <= n; r += 4, prefetch = false)
    DotTile<J, 4>(y + r * m, m, x + r * k, k, w, m0, prefetch);
  switch (n - r) {
    case 3: DotTile<J, 3>(y + r * m, m, x + r * k, k, w, m0, prefetch); break;
    case 2: DotTile<J, 2>(y + r * m, m, x + r * k, k, w, m0, prefetch); break;
    case 1: DotTile<J, 1>(y + r * m, m, x + r * k, k, w, m0, prefetch); break;
    default: break;
  }
}

// 'mk' chunk: y[:, m0:m1] = x @ W[m0:m1, :]^T, 4 rows of W a tile (they stay
// in L1 while every row of x passes), the next 4 prefetched.
template <typename W>
void ChunkMK(float* y, const float* x, const W* w, int64_t n, int64_t k, int64_t m, int64_t m0,
             int64_t m1) {
  int64_t c = m0;
  for (; c + 4 <= m1; c += 4) DotRows<4>(y, m, x, n, k, w, c, c + 8 <= m1);
  for (; c < m1; ++c) DotRows<1>(y, m, x, n, k, w, c, false);
}

#ifdef MOELAB_BF16_DOT
// bfloat16 pairs along k: xp[r, p] = (x[r, 2p + 1] << 16) | x[r, 2p] (bfloat16 bits).
typedef __m512bh BH;

inline BH AsBH(__m512i v) { return (BH)v; }

// 'km', P pairs of W rows a pass: out[r, i] += sum_p x[r, 2p] W[2p, i] + x[r, 2p+1] W[2p+1, i]
// for columns i < len (the multiple of 16 below it; the caller does the rest).
// W's two rows of a pair are interleaved in registers (one permute per 16 columns),
// then serve every row of x.
template <int P>
int64_t PairsPass(float* out, int64_t ldo, int64_t m, const uint32_t* xp, int64_t kp,
                  int64_t rows, const uint16_t* w, int64_t len, int64_t prefetch_rows) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                      40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
                                      32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    for (int64_t q = 0; q < prefetch_rows; ++q) __builtin_prefetch(w + (2 * P + q) * m + i, 0, 2);
    __m512i wv[P][2];
    for (int p = 0; p < P; ++p) {
      const __m512i a = _mm512_loadu_si512(w + 2 * p * m + i);
      const __m512i b = _mm512_loadu_si512(w + (2 * p + 1) * m + i);
      wv[p][0] = _mm512_permutex2var_epi16(a, lo, b);
      wv[p][1] = _mm512_permutex2var_epi16(a, hi, b);
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
    for (int p = 0; p < P; ++p) {
      const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(w + 2 * p * m + i)));
      const __m512i b = _mm512_castsi256_si512(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(w + (2 * p + 1) * m + i)));
      wv[p] = _mm512_permutex2var_epi16(a, lo, b);
    }
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

// 'km' chunk with bfloat16 x: pairs of W rows (4 a pass, then 1), the columns past
// the last 16 and an odd last row of W by `RowsPass`'s float32 FMAs.
void ChunkKMPairsRows(float* y, const float* x, const uint32_t* xp, const uint16_t* w,
                      int64_t n, int64_t k, int64_t m, int64_t m0, int64_t m1);

void ChunkKMPairs(float* y, const float* x, const uint32_t* xp, const uint16_t* w, int64_t n,
                  int64_t k, int64_t m, int64_t m0, int64_t m1) {
  const int64_t kp = (k + 1) / 2;
  for (int64_t r = 0; r < n; r += PAIR_ROWS) {
    ChunkKMPairsRows(y + r * m, x + r * k, xp + r * kp, w, std::min(PAIR_ROWS, n - r), k, m,
                     m0, m1);
  }
}

void ChunkKMPairsRows(float* y, const float* x, const uint32_t* xp, const uint16_t* w,
                      int64_t n, int64_t k, int64_t m, int64_t m0, int64_t m1) {
  // The block accumulates in a dense tile: rows of y are m floats apart, and with m a
  // multiple of 1024 (3072: FFN-in) they all fall in one L1 set and evict each other.
  // A decode step's few rows fit one set's ways: they accumulate in y itself (the
  // same sums in the same order either way).
  const int64_t kp = (k + 1) / 2, len = m1 - m0;
  const bool direct = n <= 8;
  std::vector<float> tile(direct ? 0 : n * len, 0.0f);
  float* acc = direct ? y + m0 : tile.data();
  const int64_t ldo = direct ? m : len;
  if (direct) {
    for (int64_t r = 0; r < n; ++r) std::fill(acc + r * ldo, acc + r * ldo + len, 0.0f);
  }
  int64_t c = 0, done = len;
  for (; c + 8 <= k; c += 8)
    done = PairsPass<4>(acc, ldo, m, xp + c / 2, kp, n, w + c * m + m0, len,
                        std::min<int64_t>(8, k - c - 8));
  for (; c + 2 <= k; c += 2)
    done = PairsPass<1>(acc, ldo, m, xp + c / 2, kp, n, w + c * m + m0, len, 0);
  for (int64_t r = 0; r < n; ++r) {
    float* t = acc + r * ldo;
    for (int64_t j = done; j < len; ++j) {  // the last columns: each pair's two FMAs, in k order
      float acc = 0.0f;
      for (int64_t q = 0; q + 1 < k; q += 2) {
        acc = std::fma(x[r * k + q], Scalar(w[q * m + m0 + j]), acc);
        acc = std::fma(x[r * k + q + 1], Scalar(w[(q + 1) * m + m0 + j]), acc);
      }
      t[j] = acc;
    }
    if (c < k) {  // an odd last row of W
      for (int64_t j = 0; j < len; ++j) t[j] = std::fma(x[r * k + c], Scalar(w[c * m + m0 + j]), t[j]);
    }
    if (!direct) std::memcpy(y + r * m + m0, t, len * sizeof(float));
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
  float sums[J * R];
  LaneSums(lanes, J * R, sums);
  for (int j = 0; j < J; ++j) {
    for (int r = 0; r < R; ++r) {
      float s = sums[j * R + r];
      for (int64_t t = d; t < k; ++t) s = std::fma(x[r * k + t], Scalar(wr[j * k + t]), s);
      y[r * m + m0 + j] = s;
    }
  }
}

template <int J>
void DotRowsPairs(float* y, int64_t m, const float* x, const uint32_t* xp, int64_t n, int64_t k,
                  const uint16_t* w, int64_t m0, bool prefetch) {
  const int64_t kp = (k + 1) / 2;
  int64_t r = 0;
  for (; r + 4 <= n; r += 4, prefetch = false)
    DotTilePairs<J, 4>(y + r * m, m, x + r * k, xp + r * kp, k, w, m0, prefetch);
  switch (n - r) {
    case 3: DotTilePairs<J, 3>(y + r * m, m, x + r * k, xp + r * kp, k, w, m0, prefetch); break;
    case 2: DotTilePairs<J, 2>(y + r * m, m, x + r * k, xp + r * kp, k, w, m0, prefetch); break;
    case 1: DotTilePairs<J, 1>(y + r * m, m, x + r * k, xp + r * kp, k, w, m0, prefetch); break;
    default: break;
  }
}

void ChunkMKPairs(float* y, const float* x, const uint32_t* xp, const uint16_t* w, int64_t n,
                  int64_t k, int64_t m, int64_t m0, int64_t m1) {
  int64_t c = m0;
  for (; c + 4 <= m1; c += 4) DotRowsPairs<4>(y, m, x, xp, n, k, w, c, c + 8 <= m1);
  for (; c < m1; ++c) DotRowsPairs<1>(y, m, x, xp, n, k, w, c, false);
}
#endif  // MOELAB_BF16_DOT

struct Shared {
  const float* x;
  const uint32_t* xp = nullptr;  // x as bfloat16 pairs (the VDPBF16PS path) or null
  const void* w;
  bool bf16, mk;
  int64_t n, k, m, chunks, chunk_len;
  float* y;
  std::atomic<int64_t> next{0}, done{0};
};

// Chunk c: output columns [c * chunk_len, (c + 1) * chunk_len).
void RunChunk(Shared& s, int64_t c) {
  const int64_t a = c * s.chunk_len, b = std::min(s.m, a + s.chunk_len);
#ifdef MOELAB_BF16_DOT
  if (s.xp != nullptr) {
    const auto* w = static_cast<const uint16_t*>(s.w);
    if (s.mk) ChunkMKPairs(s.y, s.x, s.xp, w, s.n, s.k, s.m, a, b);
    else ChunkKMPairs(s.y, s.x, s.xp, w, s.n, s.k, s.m, a, b);
    return;
  }
#endif
  if (s.mk) {
    if (s.bf16) ChunkMK(s.y, s.x, static_cast<const uint16_t*>(s.w), s.n, s.k, s.m, a, b);
    else ChunkMK(s.y, s.x, static_cast<const float*>(s.w), s.n, s.k, s.m, a, b);
  } else {
    if (s.bf16) ChunkKM(s.y, s.x, static_cast<const uint16_t*>(s.w), s.n, s.k, s.m, a, b);
    else ChunkKM(s.y, s.x, static_cast<const float*>(s.w), s.n, s.k, s.m, a, b);
  }
}

void Work(Shared& s) {
  for (int64_t c; (c = s.next.fetch_add(1, std::memory_order_acq_rel)) < s.chunks;) {
    RunChunk(s, c);
    s.done.fetch_add(1, std::memory_order_acq_rel);
  }
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                      ffi::ResultBuffer<ffi::F32> y, bool transpose_w, int64_t threads,
                      int64_t chunk_bytes, bool x_bf16) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) {
    return ffi::Error::InvalidArgument("matmul: x [N, K] and a 2-D weight");
  }
  const bool bf16 = w.element_type() == ffi::DataType::BF16;
  if (!bf16 && w.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("matmul: the weight must be float32 or bfloat16");
  }
  auto s = std::make_shared<Shared>();
  s->x = x.typed_data();
  s->w = w.untyped_data();
  s->bf16 = bf16;
  s->mk = transpose_w;
  s->n = xd[0];
  s->k = xd[1];
  s->m = transpose_w ? wd[0] : wd[1];
  if ((transpose_w ? wd[1] : wd[0]) != s->k) {
    return ffi::Error::InvalidArgument("matmul: the weight's contraction size is not K");
  }
  s->y = y->typed_data();
  std::shared_ptr<std::vector<uint32_t>> pairs;
#ifdef MOELAB_BF16_DOT
  if (x_bf16 && bf16 && s->k >= 2) {  // x's values are bfloat16s: their high halves, exactly
    const int64_t kp = (s->k + 1) / 2;
    pairs = std::make_shared<std::vector<uint32_t>>(s->n * kp, 0u);
    for (int64_t r = 0; r < s->n; ++r) {
      for (int64_t t = 0; t < s->k; ++t) {
        uint32_t u;
        std::memcpy(&u, s->x + r * s->k + t, 4);
        (*pairs)[r * kp + t / 2] |= (u >> 16) << (16 * (t % 2));
      }
    }
    s->xp = pairs->data();
  }
#else
  (void)x_bf16;
#endif
  // Chunks of about `chunk_bytes` of W, their count rounded up to a multiple
  // of the threads (they finish together), in whole units: 4-row tiles ('mk')
  // or 32-column passes ('km', at most OUT_TILE_BYTES of y wide). The chunks
  // decide no sum's order, so they may depend on the threads. A product
  // of at most `chunk_bytes` runs on the calling thread alone.
  threads = std::max<int64_t>(1, threads);
  const int64_t unit = transpose_w ? 4 : 32, units = (s->m + unit - 1) / unit;
  const int64_t bytes = static_cast<int64_t>(w.size_bytes());
  int64_t chunks = (bytes + chunk_bytes - 1) / std::max<int64_t>(1, chunk_bytes);
  if (chunks > 1) chunks = (chunks + threads - 1) / threads * threads;
  int64_t per = (units + std::max<int64_t>(1, chunks) - 1) / std::max<int64_t>(1, chunks);
  if (!transpose_w) {
    const int64_t rows = s->xp != nullptr ? std::min(s->n, PAIR_ROWS) : s->n;
    const int64_t tile_units = OUT_TILE_BYTES / (4 * unit * std::max<int64_t>(1, rows));
    per = std::min(per, std::max<int64_t>(1, tile_units));
  }
  s->chunk_len = std::max<int64_t>(1, per) * unit;
  s->chunks = (s->m + s->chunk_len - 1) / s->chunk_len;
  for (int64_t t = 1; t < std::min(threads, s->chunks); ++t) {
    pool.Schedule([s, pairs] { Work(*s); });
  }
  Work(*s);
  while (s->done.load(std::memory_order_acquire) < s->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Matmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_w")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("chunk_bytes")
                                  .Attr<bool>("x_bf16"));
