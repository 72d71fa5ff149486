// The AMX path of the CPU matrix kernel (kernels/matmul_cpu.cc, its only user): bfloat16 x
// times bfloat16 W on the tile unit of CPUs with AMX-BF16 (Intel Sapphire Rapids and later),
// where VDPBF16PS leaves a step of 8 rows bound by its multiplies. MOELAB_AMX says whether
// it is built; `AmxReady()` whether this process may use the tiles (Linux grants them on
// request, arch_prctl(ARCH_REQ_XCOMP_PERM)).
//
// TDPBF16PS C, A, B computes, for every row i of A and column j of C,
//     C[i][j] += sum_p A[i].bf16[2p] B[p].bf16[2j] + A[i].bf16[2p + 1] B[p].bf16[2j + 1]
// over the 16 pairs p of a 64-byte row (32 values of k), float32 accumulation of exact
// products. Each element is computed on its own: the sums of an output depend on K alone
// (k blocks of 32 in ascending order), not on its tile, chunk, thread or the other rows.
//
//   'km' (W [K, M]): A = 16 rows of x as pairs (x[r, 2p], x[r, 2p + 1]); B = 16 columns of W,
//        its rows 2p and 2p + 1 interleaved ("VNNI" layout, built for a whole chunk in a
//        scratch buffer while W streams past, the next rows prefetched, or for a packed W
//        loaded in place); C = y[r, columns].
//   'mk' (W [M, K], a tied unembedding): C^T = W x^T. A = 16 rows of W as they lie in
//        memory, B = 16 rows of x as pairs, transposed; C[v][r] = y[r, v].
//
// K, M and the row count need not be multiples of the tiles: blocks past the end are
// zero-padded copies (zero times zero: no NaN from a padding enters a valid output).

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "matmul_cpu_bf16.h"

#if defined(MOELAB_BF16_DOT) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define MOELAB_AMX 1

namespace {

constexpr int64_t KB = 16;  // pairs of k per tile row (32 values)

// Linux: tile data is off until the process asks for it (once; every thread then may).
inline bool AmxReady() {
  static const bool ok = [] {
    constexpr long kReqPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0;
  }();
  return ok;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0, 1: A; 2, 3: B; 4, 5: C; `a_rows` rows in A and C ('km': rows of x), 16 in B.
inline void Configure(int a_rows) {
  TileConfig c;
  for (int t = 0; t < 6; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = (t == 2 || t == 3) ? 16 : a_rows;
  }
  _tile_loadconfig(&c);
}

// x's bfloat16 pairs (x[r, 2p] low, x[r, 2p + 1] high; x is [n, k] bfloat16) as 1 KB tiles
// [row block][k block][16 x 16], zero-padded past n and the pairs: each tile [16 rows][16 p]
// ('km' A) or, `transposed`, [16 p][16 rows] ('mk' B).
inline void PairTiles(std::vector<uint32_t>& t, const uint16_t* x, int64_t n, int64_t k,
                      bool transposed) {
  const int64_t kp = (k + 1) / 2, blocks = (kp + KB - 1) / KB, row_blocks = (n + 15) / 16;
  t.assign(row_blocks * blocks * 256, 0u);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t p = 0; p < kp; ++p) {
      const int64_t i = r % 16, q = p % KB;
      t[((r / 16) * blocks + p / KB) * 256 + (transposed ? q * 16 + i : i * KB + q)] =
          PairAt(x + r * k, k, p);
    }
}

// 'km', columns [m0, m1) of W as B tiles: tile (j, b), 16 columns by the pairs p of k block
// b, at vnni + (j * blocks + b) * 256: [p][i] = (W[2p, m0 + 16j + i], W[2p + 1, m0 + 16j + i]),
// zero past k and m1. One pass down W's rows (two at a time, the chunk's width of each
// contiguous), the rows four pairs ahead prefetched.
inline void InterleaveChunk(uint32_t* vnni, const uint16_t* w, int64_t k, int64_t ldw,
                            int64_t m0, int64_t m1, int64_t blocks) {
  const PairPermutes perm;
  const int64_t kp = (k + 1) / 2, tile = blocks * KB * 16;
  for (int64_t p = 0; p < blocks * KB; ++p) {
    uint32_t* row = vnni + (p / KB) * KB * 16 + (p % KB) * 16;  // tile (0, p / KB), row p % KB
    for (int64_t c = m0, j = 0; c < m1; c += 32, j += 2) {
      if (p >= kp) {
        _mm512_storeu_si512(row + j * tile, _mm512_setzero_si512());
        if (c + 16 < m1) _mm512_storeu_si512(row + (j + 1) * tile, _mm512_setzero_si512());
        continue;
      }
      const int64_t cols = std::min<int64_t>(32, m1 - c);
      const __mmask32 mask = cols >= 32 ? ~0u : (1u << cols) - 1;
      const uint16_t* r = w + 2 * p * ldw + c;
      for (int64_t q = 2 * p + 8; q < std::min(2 * p + 10, k); ++q)
        __builtin_prefetch(w + q * ldw + c, 0, 2);
      const __m512i a = _mm512_maskz_loadu_epi16(mask, r);
      const __m512i b =
          2 * p + 1 < k ? _mm512_maskz_loadu_epi16(mask, r + ldw) : _mm512_setzero_si512();
      _mm512_storeu_si512(row + j * tile, _mm512_permutex2var_epi16(a, perm.lo, b));
      if (cols > 16)
        _mm512_storeu_si512(row + (j + 1) * tile, _mm512_permutex2var_epi16(a, perm.hi, b));
    }
  }
}

// _tile_stored of C tile t (4 to 7; the intrinsic's tile is an assembler literal).
inline void StoreTile(int t, float* p, int64_t stride) {
  switch (t) {
    case 4: _tile_stored(4, p, stride); break;
    case 5: _tile_stored(5, p, stride); break;
    case 6: _tile_stored(6, p, stride); break;
    default: _tile_stored(7, p, stride); break;
  }
}

// C tiles t / t + 1 (4 / 5, or 6 / 7: a second row block) -> y[i, c0 + j] for i < rows,
// j < cols (16 columns a tile).
inline void StoreC(float* y, int64_t m, int64_t c0, int64_t cols, int rows, float* tmp,
                   int t = 4) {
  if (cols >= 16) StoreTile(t, y + c0, m * 4);
  else StoreTile(t, tmp, 64);
  if (cols >= 32) StoreTile(t + 1, y + c0 + 16, m * 4);
  else StoreTile(t + 1, tmp + 256, 64);
  if (cols >= 32) return;
  for (int i = 0; i < rows; ++i) {
    if (cols < 16) std::memcpy(y + i * m + c0, tmp + i * 16, cols * 4);
    else std::memcpy(y + i * m + c0 + 16, tmp + 256 + i * 16, (cols - 16) * 4);
  }
}

// 'km' chunk: y[:, m0:m1] = x @ W[:, m0:m1]; xa = PairTiles(x). W's columns are
// interleaved once (`InterleaveChunk`, a scratch buffer the size of the chunk, in L2),
// then every block of 16 rows of x takes them 32 columns (tiles 4, 5) at a time.
void ChunkKMAmx(float* y, int64_t ldy, const uint32_t* xa, const uint16_t* w, int64_t ldw,
                int64_t n, int64_t k, int64_t m0, int64_t m1) {
  const int64_t blocks = ((k + 1) / 2 + KB - 1) / KB, tile = blocks * KB * 16;
  const int64_t tiles = (m1 - m0 + 15) / 16;
  thread_local std::vector<uint32_t> vnni;
  vnni.resize(tiles * tile);
  InterleaveChunk(vnni.data(), w, k, ldw, m0, m1, blocks);
  float tmp[512];
  int configured = 0;
  for (int64_t r0 = 0; r0 < n; r0 += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, n - r0));
    if (rows != configured) Configure(configured = rows);
    const uint32_t* a = xa + (r0 / 16) * blocks * 256;
    for (int64_t j = 0; j < tiles; j += 2) {
      const uint32_t* b0 = vnni.data() + j * tile;
      const uint32_t* b1 = j + 1 < tiles ? b0 + tile : b0;  // an odd last tile: computed twice
      _tile_zero(4);
      _tile_zero(5);
      for (int64_t p = 0; p < blocks; ++p) {
        if (p + 1 < blocks) {  // the next k block's tiles, from L2
          for (int64_t l = 0; l < 256; l += 16) {
            __builtin_prefetch(a + (p + 1) * 256 + l, 0, 3);
            __builtin_prefetch(b0 + (p + 1) * 256 + l, 0, 3);
            __builtin_prefetch(b1 + (p + 1) * 256 + l, 0, 3);
          }
        }
        _tile_loadd(0, a + p * 256, 64);
        _tile_loadd(2, b0 + p * 256, 64);
        _tile_loadd(3, b1 + p * 256, 64);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(5, 0, 3);
      }
      StoreC(y + r0 * ldy, ldy, m0 + 16 * j, std::min<int64_t>(32, m1 - m0 - 16 * j), rows, tmp);
    }
  }
}

// Tiles 0, 1: A (rows r0 and r0 + 16 of x); 2, 3: B; 4, 5: C of A0; 6, 7: C of A1. Rows
// `rows0` in A0 and its C, `rows1` in A1 and its C, 16 in B.
inline void Configure2(int rows0, int rows1) {
  TileConfig c;
  const int rows[8] = {rows0, rows1, 16, 16, rows0, rows0, rows1, rows1};
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = rows[t];
  }
  _tile_loadconfig(&c);
}

// 'km' packed chunk (matmul_cpu_packed.h: blocks of 32 columns, rows in pairs, block j at
// w + 32 j k, the last narrower where `len` says) by all n rows of x: y[:, :len]. A 32-column
// block's whole k blocks are B tiles as they lie (tile rows 128 bytes apart; the chunk is one
// sequential read, 8 KB ahead prefetched); a k tail or a narrower block's tiles come from a
// zero-padded copy. These are the tiles `InterleaveChunk` builds, taken in the same order:
// the same sums. Rows go 32 at a time (two A tiles by two B tiles: 4 products per 4 tile
// loads; a prefill), the last 16 or fewer alone. `configured`: the tile configuration's
// code (rows0, or 1000 + 32 rows0 + rows1 for two row blocks; 0: none yet).
void PackedChunkAmx(float* y, int64_t ldy, const uint32_t* xa, const uint16_t* w, int64_t n,
                    int64_t k, int64_t len, int& configured) {
  const int64_t kp = (k + 1) / 2, blocks = (kp + KB - 1) / KB, nb = (len + 31) / 32;
  const int64_t whole = k / 32;  // k blocks of a 32-column block read in place
  const int64_t last = len - 32 * (nb - 1), padded = blocks - whole;
  thread_local std::vector<uint32_t> pad;  // block j's other k blocks at pad_at(j)
  pad.assign((padded * (nb - 1) + blocks) * KB * 32, 0u);
  auto width = [&](int64_t j) { return j + 1 < nb ? int64_t{32} : last; };
  auto direct = [&](int64_t j) { return width(j) == 32 ? whole : int64_t{0}; };
  auto pad_at = [&](int64_t j) { return pad.data() + j * padded * KB * 32; };
  for (int64_t j = 0; j < nb; ++j) {
    const auto* pairs = reinterpret_cast<const uint32_t*>(w + 32 * j * k);
    const uint16_t* odd = w + 32 * j * k + (k - 1) * width(j);  // an odd last row, as it is
    for (int64_t p = direct(j) * KB; p < kp; ++p) {
      uint32_t* row = pad_at(j) + (p - direct(j) * KB) * 32;
      for (int64_t c = 0; c < width(j); ++c)
        row[c] = 2 * p + 1 < k ? pairs[p * width(j) + c] : odd[c];
    }
  }
  auto b_tiles = [&](int64_t j, int64_t p) {
    return p < direct(j) ? reinterpret_cast<const uint32_t*>(w + 32 * j * k) + p * KB * 32
                         : pad_at(j) + (p - direct(j)) * KB * 32;
  };
  auto prefetch = [&](int64_t j, int64_t p) {  // the stream 8 KB ahead, on the first pass
    if (p >= direct(j)) return;
    const char* ahead = reinterpret_cast<const char*>(b_tiles(j, p)) + 8192;
    for (int l = 0; l < 2048; l += 64) __builtin_prefetch(ahead + l, 0, 2);
  };
  // Rows r0 .. r0 + rows0 (A0, C 4 / 5) and, where rows1 > 0, the next rows1 (A1, C 6 / 7).
  auto pass = [&](int64_t r0, int rows0, int rows1) {
    const int code = rows1 > 0 ? 1000 + 32 * rows0 + rows1 : rows0;
    if (configured != code) {
      if (rows1 > 0) Configure2(rows0, rows1);
      else Configure(rows0);
      configured = code;
    }
    const uint32_t* a0 = xa + (r0 / 16) * blocks * 256;
    const uint32_t* a1 = a0 + blocks * 256;
    float tmp[512];
    for (int64_t j = 0; j < nb; ++j) {
      _tile_zero(4);
      _tile_zero(5);
      if (rows1 > 0) {
        _tile_zero(6);
        _tile_zero(7);
      }
      for (int64_t p = 0; p < blocks; ++p) {
        if (r0 == 0) prefetch(j, p);
        const uint32_t* b = b_tiles(j, p);
        _tile_loadd(0, a0 + p * 256, 64);
        _tile_loadd(2, b, 128);
        _tile_loadd(3, b + 16, 128);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(5, 0, 3);
        if (rows1 > 0) {
          _tile_loadd(1, a1 + p * 256, 64);
          _tile_dpbf16ps(6, 1, 2);
          _tile_dpbf16ps(7, 1, 3);
        }
      }
      StoreC(y + r0 * ldy, ldy, 32 * j, width(j), rows0, tmp);
      if (rows1 > 0) StoreC(y + (r0 + 16) * ldy, ldy, 32 * j, width(j), rows1, tmp, 6);
    }
  };
  int64_t r0 = 0;
  for (; n - r0 > 16; r0 += 32) pass(r0, 16, static_cast<int>(std::min<int64_t>(16, n - r0 - 16)));
  if (r0 < n) pass(r0, static_cast<int>(n - r0), 0);  // (the last pair may hold fewer than 32)
}

// 'mk' chunk: y[:, m0:m1] = x @ W[m0:m1, :]^T; xb = PairTiles(x, transposed). 32 rows of W a
// pass (tiles 0 and 1), read in place where whole, else from a zero-padded copy.
void ChunkMKAmx(float* y, const uint32_t* xb, const uint16_t* w, int64_t n, int64_t k,
                int64_t m, int64_t m0, int64_t m1) {
  const int64_t blocks = ((k + 1) / 2 + KB - 1) / KB, whole = k / 32;
  const int64_t kpad = blocks * 32;
  thread_local std::vector<uint16_t> pad;
  float tmp[2][256];
  Configure(16);
  for (int64_t v0 = m0; v0 < m1; v0 += 32) {
    const int64_t vrows = std::min<int64_t>(32, m1 - v0);
    // Rows past m1 or k past `whole` blocks come from `pad` (32 rows of kpad, zeros beyond).
    const bool copy = vrows < 32 || whole < blocks;
    if (copy) {
      pad.assign(32 * kpad, 0);
      for (int64_t i = 0; i < vrows; ++i) std::memcpy(pad.data() + i * kpad, w + (v0 + i) * k, k * 2);
    }
    // The next pass's rows (contiguous in W) prefetched over this pass's k blocks.
    const char* next = reinterpret_cast<const char*>(w + (v0 + 32) * k);
    const int64_t next_bytes = std::max<int64_t>(0, std::min<int64_t>(32, m1 - v0 - 32)) * k * 2;
    const int64_t per = (next_bytes / blocks + 63) / 64 * 64;
    for (int64_t rb = 0; rb * 16 < n; ++rb) {
      _tile_zero(4);
      _tile_zero(5);
      for (int64_t p = 0; p < blocks; ++p) {
        if (rb == 0)
          for (int64_t off = p * per; off < std::min(next_bytes, (p + 1) * per); off += 64)
            __builtin_prefetch(next + off, 0, 2);
        if (copy) {
          _tile_loadd(0, pad.data() + p * 32, kpad * 2);
          _tile_loadd(1, pad.data() + 16 * kpad + p * 32, kpad * 2);
        } else {
          _tile_loadd(0, w + v0 * k + p * 32, k * 2);
          _tile_loadd(1, w + (v0 + 16) * k + p * 32, k * 2);
        }
        _tile_loadd(2, xb + (rb * blocks + p) * KB * 16, 64);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(5, 1, 2);
      }
      _tile_stored(4, tmp[0], 64);
      _tile_stored(5, tmp[1], 64);
      const int64_t rows = std::min<int64_t>(16, n - rb * 16);
      for (int64_t i = 0; i < vrows; ++i)
        for (int64_t r = 0; r < rows; ++r) y[(rb * 16 + r) * m + v0 + i] = tmp[i / 16][(i % 16) * 16 + r];
    }
  }
}

}  // namespace

#endif  // AMX-BF16
