// Packed 'km' weights for the CPU matrix kernel (kernels/matmul_cpu.cc, its only user).
//
// pack_km (kernels/matmul_cpu.py) stores W [K, M]'s columns [32 b, 32 b + w) (w = 32, or
// fewer in the last block) as one contiguous block of K w elements at element 32 b K, in
// an array of W's shape:
//   float32:  the [K, w] matrix W[:, 32 b : 32 b + w], row after row;
//   bfloat16: rows 2p and 2p + 1 interleaved into pairs along k, element 2 (p w + j) + e
//             = W[2p + e, 32 b + j] (the "VNNI" order in which VDPBF16PS and the AMX tiles
//             take W), an odd last row after them as it is.
// A decode step's product then reads each block as one sequential stream, which the
// hardware prefetchers follow, with its R <= 8 rows' sums in registers down all K
// (`PackedColumns` here for float32 FMAs, matmul_cpu_bf16.h for bfloat16 pairs, whose
// 64-byte loads are then whole pairs; the AMX tiles load theirs in place,
// matmul_cpu_amx.h); in W's own layout every row of a block is a separate 64-byte run
// and every pair two loads and a permute. With VDPBF16PS more rows (a prefill) take the
// same register tiles 8 rows at a time; other products (more rows otherwise, a narrower
// block) take each block as a 'km' W of its own (a bfloat16 one restored first,
// `UnpackPairs`).
// The sums run in the same order either way, so a packed product equals the unpacked
// one bit for bit.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>

#include "matmul_cpu_vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The columns of W a block holds (kernels/matmul_cpu.py PACK_COLUMNS).
constexpr int64_t PACK_COLUMNS = 32;

// 'km' packed block (16 V columns) by R <= 8 rows of x: the R x V sums in registers down
// all K rows, one sequential read of the block (4 KB ahead prefetched: without, a 576 x 3072
// float32 product at 8 rows took 451 us against 313); k ascending, as in `RowsPass`: the
// same sums. A bfloat16 block's pairs are widened in registers (the low half is row 2p).
template <int R, int V, typename W>
void PackedColumns(float* out, int64_t ldo, const float* x, int64_t k, const W* w) {
  V16 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = V16{};
  auto fma_row = [&](int64_t q, const V16* wv) {
    for (int r = 0; r < R; ++r) {
      const float b = x[r * k + q];
      for (int v = 0; v < V; ++v) acc[r][v] += b * wv[v];
    }
  };
  int64_t q = 0;
  if constexpr (std::is_same_v<W, uint16_t>) {
    for (; q + 1 < k; q += 2) {
      V16 even[V], odd[V];
      for (int v = 0; v < V; ++v) {
        U16x32 u, lo, hi;
        __builtin_prefetch(w + (q + 128 / V) * 16 * V + 32 * v, 0, 2);  // 4 KB ahead
        std::memcpy(&u, w + q * 16 * V + 32 * v, sizeof(u));
        lo = u << 16;
        hi = u & 0xFFFF0000u;
        std::memcpy(&even[v], &lo, sizeof(lo));
        std::memcpy(&odd[v], &hi, sizeof(hi));
      }
      fma_row(q, even);
      fma_row(q + 1, odd);
    }
  }
  for (; q < k; ++q) {  // float32 rows; a bfloat16 block's odd last row
    V16 wv[V];
    for (int v = 0; v < V; ++v) {
      if constexpr (std::is_same_v<W, float>) __builtin_prefetch(w + (q + 64 / V) * 16 * V + 16 * v, 0, 2);
      wv[v] = Load(w + q * 16 * V + 16 * v);
    }
    fma_row(q, wv);
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) *reinterpret_cast<V16*>(out + r * ldo + 16 * v) = acc[r][v];
}

// A packed bfloat16 block p (`width` columns) back in W's own [K, width] order, into w.
inline void UnpackPairs(const uint16_t* p, uint16_t* w, int64_t k, int64_t width) {
  for (int64_t q = 0; q + 1 < k; q += 2) {
    for (int64_t j = 0; j < width; ++j) {
      w[q * width + j] = p[q * width + 2 * j];
      w[(q + 1) * width + j] = p[q * width + 2 * j + 1];
    }
  }
  if (k % 2) std::memcpy(w + (k - 1) * width, p + (k - 1) * width, width * sizeof(uint16_t));
}

// A packed block of 16 or 32 columns by 1..8 rows of x (a decode step); false otherwise.
template <typename W>
bool PackedBlockF32(float* out, int64_t ldo, const float* x, int64_t rows, int64_t k, const W* w,
                    int64_t width) {
  if (rows > 8 || (width != 16 && width != 32)) return false;
  WithRows(rows, [&](auto r) {
    constexpr int R = decltype(r)::value;
    if (width == 32) PackedColumns<R, 2>(out, ldo, x, k, w);
    else PackedColumns<R, 1>(out, ldo, x, k, w);
  });
  return true;
}

// pack_km's task t: rows [32 t, 32 t + 32) of every block, the 32 rows of w read in order
// and each block's part of them written as one contiguous run (`size` bytes an element;
// bfloat16 rows in pairs, the task's first row even).
inline int64_t PackTasks(int64_t k) { return (k + 31) / 32; }

inline void PackTask(const char* w, char* p, int64_t k, int64_t m, int64_t size, int64_t t) {
  const int64_t r1 = std::min(k, 32 * t + 32);
  for (int64_t c = 0; c < m; c += PACK_COLUMNS) {
    const int64_t width = std::min(PACK_COLUMNS, m - c), row = width * size;
    char* out = p + c * k * size;
    int64_t r = 32 * t;
    if (size == 2) {
      const auto* w16 = reinterpret_cast<const uint16_t*>(w);
      auto* o16 = reinterpret_cast<uint16_t*>(out);
      for (; r + 1 < r1; r += 2) {
        const uint16_t *a = w16 + r * m + c, *b = a + m;
        for (int64_t j = 0; j < width; ++j) {
          o16[r * width + 2 * j] = a[j];
          o16[r * width + 2 * j + 1] = b[j];
        }
      }
    }
    for (; r < r1; ++r) std::memcpy(out + r * row, w + (r * m + c) * size, row);
  }
}

// The FFI handler of pack_km: p = pack_km(w), its `PackTask`s split over `threads` of the pool.
ffi::Error PackImpl(ffi::ThreadPool pool, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> p,
                    int64_t threads) {
  const auto wd = w.dimensions();
  if (wd.size() != 2 || p->dimensions().size() != 2 || p->dimensions()[0] != wd[0] ||
      p->dimensions()[1] != wd[1] || p->element_type() != w.element_type()) {
    return ffi::Error::InvalidArgument("pack_km: a [K, M] weight, packed into its own shape");
  }
  struct Job {
    const char* w;
    char* p;
    int64_t k, m, size;
    std::atomic<int64_t> next{0}, done{0};
  };
  auto job = std::make_shared<Job>();
  job->w = static_cast<const char*>(w.untyped_data());
  job->p = static_cast<char*>(p->untyped_data());
  job->k = wd[0];
  job->m = wd[1];
  job->size = static_cast<int64_t>(w.size_bytes()) / std::max<int64_t>(1, wd[0] * wd[1]);
  auto work = [](Job& j) {
    for (int64_t t; (t = j.next.fetch_add(1, std::memory_order_acq_rel)) < PackTasks(j.k);) {
      PackTask(j.w, j.p, j.k, j.m, j.size, t);
      j.done.fetch_add(1, std::memory_order_acq_rel);
    }
  };
  const int64_t tasks = PackTasks(job->k);
  for (int64_t t = 1; t < std::min(threads, tasks); ++t) {
    pool.Schedule([job, work] { work(*job); });
  }
  work(*job);
  while (job->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace
