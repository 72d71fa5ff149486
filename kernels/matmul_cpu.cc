// Decode-sized products y = x @ W on CPU, as an XLA FFI custom call.
//
//   layout 'km':  W [K, M],  y[n, m] = sum_k x[n, k] W[k, m]
//   layout 'mk':  W [M, K],  y[n, m] = sum_k x[n, k] W[m, k]     (a tied unembedding)
//
// x [N, K], W and y [N, M] float32 or bfloat16; accumulation in
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
//         y[:, m0:m1] that each pass loads and stores stays in L1; a packed W
//         (`packed`, matmul_cpu_packed.h: 32-column blocks, each contiguous)
//         is read block by block, a decode step's sums in registers down K;
//   'mk': chunk c holds rows [m0, m1) of W and writes y[:, m0:m1]; 4 rows at a
//         time stay in L1 while every row of x passes, and the 4 x R dot
//         products' vectors are summed across lanes together (`LaneSums`;
//         matmul_cpu_vec.h has the vector helpers and this tiling).
//
// Every y[n, m] is summed in one order that depends on K alone (k ascending
// in 'km'; 16-lane partial sums over k, then a fixed tree across lanes, then
// the K % 16 tail in 'mk'), whatever the chunks, the threads or the other rows
// of x: results do not depend on the thread count, `chunk_bytes` or the batch.
// With bfloat16 x and W and a CPU with AVX512-BF16, both layouts multiply pairs of bfloat16s along k with
// VDPBF16PS (y += x[k] W[k] + x[k+1] W[k+1], float32 accumulation; each product of
// two bfloat16s is exact in float32): half the instructions of the float32 FMAs,
// which bound a step of several rows ('km' Q = 8 rows of W a pass becomes 4 pairs,
// 'mk' 32 k a vector instead of 16; matmul_cpu_bf16.h). The order of every sum is
// again fixed by K.
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

#include "matmul_cpu_amx.h"
#include "matmul_cpu_bf16.h"
#include "matmul_cpu_f32.h"
#include "matmul_cpu_packed.h"
#include "matmul_cpu_vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A spin-wait's pause (x86: PAUSE; elsewhere a no-op).
inline void Pause() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

// 'km': widest y[:, m0:m1] block (bytes) a chunk updates per pass (L1-resident).
constexpr int64_t OUT_TILE_BYTES = 16 << 10;

struct Shared {
  const float* x = nullptr;
  const uint32_t* xp = nullptr;  // x as bfloat16 pairs (the VDPBF16PS path) or null
  const uint32_t* xa = nullptr;  // x's pairs laid out for the AMX tiles (that path; then
                                 // x and xp are null) or null
  const void* w;
  bool bf16, mk, packed = false;  // packed: 'km' W in blocks of 32 columns (`RunChunk`)
  int64_t n, k, m, chunks, chunk_len;
  float* y;                  // the float32 sums
  uint16_t* y16 = nullptr;   // a bfloat16 y, rounded from them chunk by chunk, or null
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<bool> ready{false};  // the operands above are prepared
};

// What x, xp, xa and a bfloat16 y's float32 sums point into: the calling thread's, kept
// between its calls (growing, up to KEEP_BYTES each), so that a call faults no fresh pages
// in (a 512-row prefill's sums are megabytes). The call's pool tasks read it only while
// the call waits for its chunks.
struct Scratch {
  std::vector<float> x_wide, y_wide;
  std::vector<uint32_t> pairs, tiles;
};
constexpr size_t KEEP_BYTES = 16 << 20;

template <typename T>
void Trim(std::vector<T>& v) {
  if (v.capacity() * sizeof(T) > KEEP_BYTES) std::vector<T>().swap(v);
}

// y[:, m0:m1] = x @ W[:, m0:m1] for a 'km' W whose rows are `ldw` apart (`block`: W is one
// packed float32 block of m1 - m0 columns).
void RunKM(Shared& s, const void* w, int64_t ldw, float* y, int64_t m0, int64_t m1, bool block) {
#ifdef MOELAB_AMX
  if (s.xa != nullptr) {
    ChunkKMAmx(y, s.m, s.xa, static_cast<const uint16_t*>(w), ldw, s.n, s.k, m0, m1);
    return;
  }
#endif
#ifdef MOELAB_BF16_DOT
  if (s.xp != nullptr) {
    ChunkKMPairs(y, s.m, s.x, s.xp, static_cast<const uint16_t*>(w), ldw, s.n, s.k, m0, m1);
    return;
  }
#endif
  auto fmas = [&](const auto* wt) {  // float32 FMAs, W float32 or bfloat16
    if (!(block && PackedBlockF32(y, s.m, s.x, s.n, s.k, wt, m1 - m0)))
      ChunkKM(y, s.m, s.x, wt, ldw, s.n, s.k, m0, m1);
  };
  if (s.bf16) fmas(static_cast<const uint16_t*>(w));
  else fmas(static_cast<const float*>(w));
}

// y[:, :width] for a packed bfloat16 block w (rows in pairs, matmul_cpu_packed.h): with
// VDPBF16PS, 8 rows of x at a time by 16 or 32 columns in registers down all k (the block
// in L2 after the first 8: a prefill's 512 rows 1.3-1.8x the unpacked 'km' passes, which
// re-pair W for every 32 rows); a decode step's rows by float32 FMAs without it; or else
// the block restored to W's own layout for the unpacked paths. (The AMX tiles take a
// whole chunk, `RunChunk`.)
void RunPackedPairs(Shared& s, const uint16_t* w, float* y, int64_t width) {
  if (width == 16 || width == 32) {
#ifdef MOELAB_BF16_DOT
    if (s.xp != nullptr) {
      const int64_t kp = (s.k + 1) / 2;
      for (int64_t r = 0; r < s.n; r += 8) {
        PackedPairsBlock(y + r * s.m, s.m, s.x + r * s.k, s.xp + r * kp, w,
                         std::min<int64_t>(8, s.n - r), s.k, width);
      }
      return;
    }
#endif
    if (s.n <= 8 && PackedBlockF32(y, s.m, s.x, s.n, s.k, w, width)) return;
  }
  thread_local std::vector<uint16_t> plain;
  plain.resize(s.k * width);
  UnpackPairs(w, plain.data(), s.k, width);
  RunKM(s, plain.data(), width, y, 0, width, false);
}

// Chunk c: output columns [c * chunk_len, (c + 1) * chunk_len). A packed 'km' W
// (kernels/matmul_cpu.py `pack_km`) holds its columns [b, b + 32) as one contiguous
// block at element b K (the last, narrower block likewise): each block is read
// sequentially, on its own.
void RunChunk(Shared& s, int64_t c) {
  const int64_t a = c * s.chunk_len, b = std::min(s.m, a + s.chunk_len);
  if (!s.mk) {
    if (!s.packed) {
      RunKM(s, s.w, s.m, s.y, a, b, false);
      return;
    }
    const int64_t size = s.bf16 ? 2 : 4;
#ifdef MOELAB_AMX
    if (s.xa != nullptr) {
      int configured = 0;
      PackedChunkAmx(s.y + a, s.m, s.xa, static_cast<const uint16_t*>(s.w) + a * s.k, s.n, s.k,
                     b - a, configured);
      return;
    }
#endif
    for (int64_t b0 = a; b0 < b; b0 += PACK_COLUMNS) {
      const int64_t width = std::min(PACK_COLUMNS, s.m - b0);
      const void* block = static_cast<const char*>(s.w) + b0 * s.k * size;
      if (s.bf16) RunPackedPairs(s, static_cast<const uint16_t*>(block), s.y + b0, width);
      else RunKM(s, block, width, s.y + b0, 0, width, true);
    }
    return;
  }
#ifdef MOELAB_AMX
  if (s.xa != nullptr) {
    ChunkMKAmx(s.y, s.xa, static_cast<const uint16_t*>(s.w), s.n, s.k, s.m, a, b);
    return;
  }
#endif
#ifdef MOELAB_BF16_DOT
  if (s.xp != nullptr) {
    ChunkMKPairs(s.y, s.x, s.xp, static_cast<const uint16_t*>(s.w), s.n, s.k, s.m, a, b);
    return;
  }
#endif
  if (s.bf16) ChunkMK(s.y, s.x, static_cast<const uint16_t*>(s.w), s.n, s.k, s.m, a, b);
  else ChunkMK(s.y, s.x, static_cast<const float*>(s.w), s.n, s.k, s.m, a, b);
}

// y16[:, columns of chunk c] = y's, rounded (`RoundBf16s`).
void RoundChunk(Shared& s, int64_t c) {
  const int64_t a = c * s.chunk_len, b = std::min(s.m, a + s.chunk_len);
  for (int64_t r = 0; r < s.n; ++r) RoundBf16s(s.y + r * s.m + a, s.y16 + r * s.m + a, b - a);
}

void Work(Shared& s) {
  bool ran = false;
  for (int64_t c; (c = s.next.fetch_add(1, std::memory_order_acq_rel)) < s.chunks;) {
    RunChunk(s, c);
    if (s.y16 != nullptr) RoundChunk(s, c);
    ran = true;
    s.done.fetch_add(1, std::memory_order_acq_rel);
  }
#ifdef MOELAB_AMX
  if (ran && s.xa != nullptr) _tile_release();  // the pool thread's tile state, for others
#endif
  (void)ran;
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                      ffi::Result<ffi::AnyBuffer> y, bool transpose_w, int64_t threads,
                      int64_t chunk_bytes, bool amx, bool packed) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) {
    return ffi::Error::InvalidArgument("matmul: x [N, K] and a 2-D weight");
  }
  const bool bf16 = w.element_type() == ffi::DataType::BF16;
  const bool x_bf16 = x.element_type() == ffi::DataType::BF16;
  const bool y_bf16 = y->element_type() == ffi::DataType::BF16;
  if ((!bf16 && w.element_type() != ffi::DataType::F32) ||
      (!x_bf16 && x.element_type() != ffi::DataType::F32) ||
      (!y_bf16 && y->element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("matmul: x, the weight and y must be float32 or bfloat16");
  }
  if (packed && transpose_w) {
    return ffi::Error::InvalidArgument("matmul: a packed weight is a [K, M] ('km') one");
  }
  if ((transpose_w ? wd[1] : wd[0]) != xd[1]) {
    return ffi::Error::InvalidArgument("matmul: the weight's contraction size is not K");
  }
  auto s = std::make_shared<Shared>();
  s->w = w.untyped_data();
  s->bf16 = bf16;
  s->mk = transpose_w;
  s->packed = packed;
  s->n = xd[0];
  s->k = xd[1];
  s->m = transpose_w ? wd[0] : wd[1];
  // The units: bfloat16 pairs (VDPBF16PS) where x and W are bfloat16, on the AMX tiles
  // where asked and granted; else float32 FMAs.
  bool pairs = false, tiles = false;
#ifdef MOELAB_BF16_DOT
  pairs = x_bf16 && bf16 && s->k >= 2;
#endif
#ifdef MOELAB_AMX
  tiles = pairs && amx && AmxReady();
#else
  (void)amx;
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
  if (!transpose_w && !tiles) {  // (the AMX path keeps y in its tiles)
    const int64_t rows = pairs ? std::min(s->n, PAIR_ROWS) : s->n;
    const int64_t tile_units = OUT_TILE_BYTES / (4 * unit * std::max<int64_t>(1, rows));
    per = std::min(per, std::max<int64_t>(1, tile_units));
  }
  s->chunk_len = std::max<int64_t>(1, per) * unit;
  s->chunks = (s->m + s->chunk_len - 1) / s->chunk_len;
  // The pool tasks first: a parked pool thread takes 10-20 us to start, which the
  // operands' preparation below overlaps (the tasks wait for it).
  for (int64_t t = 1; t < std::min(threads, s->chunks); ++t) {
    pool.Schedule([s] {
      while (!s->ready.load(std::memory_order_acquire)) Pause();
      Work(*s);
    });
  }
  thread_local Scratch mine;
  const auto* xb = static_cast<const uint16_t*>(x.untyped_data());
  if (tiles) {  // (the tiles read nothing else of x)
#ifdef MOELAB_AMX
    PairTiles(mine.tiles, xb, s->n, s->k, transpose_w);
    s->xa = mine.tiles.data();
#endif
  } else if (x_bf16) {  // widened once (small next to W)
    mine.x_wide.resize(xd[0] * xd[1]);
    for (int64_t i = 0; i < xd[0] * xd[1]; ++i) mine.x_wide[i] = Scalar(xb[i]);
    s->x = mine.x_wide.data();
  } else {
    s->x = static_cast<const float*>(x.untyped_data());
  }
  if (y_bf16) {  // the float32 sums in a buffer of their own
    mine.y_wide.resize(s->n * s->m);
    s->y = mine.y_wide.data();
    s->y16 = static_cast<uint16_t*>(y->untyped_data());
  } else {
    s->y = static_cast<float*>(y->untyped_data());
  }
  if (pairs && !tiles) {  // x[k] in the low half, x[k + 1] in the high
    const int64_t kp = (s->k + 1) / 2;
    mine.pairs.resize(s->n * kp);
    for (int64_t r = 0; r < s->n; ++r)
      for (int64_t p = 0; p < kp; ++p) mine.pairs[r * kp + p] = PairAt(xb + r * s->k, s->k, p);
    s->xp = mine.pairs.data();
  }
  s->ready.store(true, std::memory_order_release);
  Work(*s);
  while (s->done.load(std::memory_order_acquire) < s->chunks) std::this_thread::yield();
  Trim(mine.x_wide);
  Trim(mine.y_wide);
  Trim(mine.pairs);
  Trim(mine.tiles);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PackKM, PackImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Matmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("transpose_w")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("chunk_bytes")
                                  .Attr<bool>("amx")
                                  .Attr<bool>("packed"));

// Which bfloat16-pair units this build can use: 1 VDPBF16PS, 2 the AMX tiles (built and
// granted by the OS); kernels/matmul_cpu.py's `bf16_units`.
extern "C" int MoelabMatmulBf16Units() {
  int units = 0;
#ifdef MOELAB_BF16_DOT
  units |= 1;
#endif
#ifdef MOELAB_AMX
  if (AmxReady()) units |= 2;
#endif
  return units;
}
