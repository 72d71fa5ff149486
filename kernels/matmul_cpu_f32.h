// The float32-FMA paths of the CPU matrix kernel (kernels/matmul_cpu.cc, its only user,
// which explains them): x float32, W float32 or bfloat16 (widened in registers), both
// layouts; every sum k ascending ('km') or by `LaneSums`' fixed tree ('mk').

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "matmul_cpu_vec.h"

namespace {

// 'km', Q rows of W a pass: out[r, i] += sum_{q < Q} s[r, q] W[q, i] for every row r of x
// and column i < len. The Q x C weight vectors at columns i .. i + 16C are loaded
// once for all rows; each row's Q scalars are broadcast once for the C vectors.
// A row of W is a short stream for the hardware prefetchers, so the same
// columns of the next pass's rows are prefetched while this pass runs.
template <int Q, int C, typename W>
void RowsPass(float* out, int64_t ldo, const float* s, int64_t k, int64_t rows, const W* w,
              int64_t ldw, int64_t len, int64_t prefetch_rows) {
  constexpr int64_t line = 64 / sizeof(W);  // weights per cache line
  int64_t i = 0;
  for (; i + 16 * C <= len; i += 16 * C) {
    for (int64_t q = 0; q < prefetch_rows; ++q)
      for (int64_t j = 0; j < 16 * C; j += line) __builtin_prefetch(w + (Q + q) * ldw + i + j, 0, 2);
    V16 wv[Q][C];
    for (int q = 0; q < Q; ++q)
      for (int c = 0; c < C; ++c) wv[q][c] = Load(w + q * ldw + i + 16 * c);
    for (int64_t r = 0; r < rows; ++r) {
      float* o = out + r * ldo + i;
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
      RowsPass<Q, 1>(out + i, ldo, s, k, rows, w + i, ldw, len - i, prefetch_rows);
      return;
    }
  }
  for (; i < len; ++i) {
    for (int64_t r = 0; r < rows; ++r) {
      float acc = out[r * ldo + i];
      for (int q = 0; q < Q; ++q) acc = std::fma(s[r * k + q], Scalar(w[q * ldw + i]), acc);
      out[r * ldo + i] = acc;
    }
  }
}

// 'km' chunk: y[:, m0:m1] = x @ W[:, m0:m1], 8 rows of W a pass (rows of y `ldy` apart,
// of W `ldw`).
template <typename W>
void ChunkKM(float* y, int64_t ldy, const float* x, const W* w, int64_t ldw, int64_t n,
             int64_t k, int64_t m0, int64_t m1) {
  for (int64_t r = 0; r < n; ++r) std::fill(y + r * ldy + m0, y + r * ldy + m1, 0.0f);
  int64_t c = 0;
  for (; c + 8 <= k; c += 8) {
    RowsPass<8, 2>(y + m0, ldy, x + c, k, n, w + c * ldw + m0, ldw, m1 - m0,
                   std::min<int64_t>(8, k - c - 8));
  }
  for (; c < k; ++c) RowsPass<1, 2>(y + m0, ldy, x + c, k, n, w + c * ldw + m0, ldw, m1 - m0, 0);
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
  FinishTile<J, R>(y, m, m0, &acc[0][0], x, k, wr, d);
}

template <typename W>
void ChunkMK(float* y, const float* x, const W* w, int64_t n, int64_t k, int64_t m, int64_t m0,
             int64_t m1) {
  ForTiles(m0, m1, n, [&](int64_t c, int64_t r, auto j, auto rows, bool prefetch) {
    DotTile<decltype(j)::value, decltype(rows)::value>(y + r * m, m, x + r * k, k, w, c,
                                                       prefetch);
  });
}

}  // namespace
