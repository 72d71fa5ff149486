// Top-k SwiGLU experts for a decode step on CPU, as an XLA FFI custom call.
//
//   y[n] = sum_j gate[n, j] * SwiGLU_{e}(x[n]),   e = expert[n, j]
//   SwiGLU_e(x) = (silu(x W_in[e][:, :F]) * (x W_in[e][:, F:])) W_out[e]
//
// Why a kernel: a decode step is bound by reading the chosen experts'
// weights. XLA:CPU multiplies an expert's rows either one row at a time
// (re-reading the expert per row) or as a product with several rows, which
// packs (copies) the weights first and streams them 2-3x slower per byte
// (README, "Decode benchmark"). Here every chosen expert is read once, in
// place in the stacked [E, ...] buffers, for all of its rows, and the read is
// split over P threads of XLA's intra-op pool, each streaming contiguous
// blocks (a disjoint 1/P of every chosen expert's bytes):
//
//   phase 1, part p owns rows [p D/P, (p+1) D/P) of every W_in[e] (contiguous):
//     h_p[r] = x[r, rows of p] @ W_in[e][rows of p, :]        (partial, [R, 2F])
//   (all parts finish phase 1)
//   phase 2, part p owns hidden units [p F/P, (p+1) F/P):
//     a[r, j] = gate[r] * silu(sum_p' h_p'[r, j]) * sum_p' h_p'[r, F + j]
//     y_p[r] += a[r, units of p] @ W_out[e][units of p, :]  (contiguous rows)
//   y = sum_p y_p
//
// R = N * K assignments, r one of them. Inside a part, 8 weight rows are
// loaded per pass and used for all of an expert's rows (`Block`). Shapes:
// x [N, D], expert and gate [N, K], w_in [E, D, 2F] ([gate | up] columns),
// w_out [E, F, D], y [N, D]; float32 (expert int32), row-major.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* x;
  const int32_t* expert;
  const float* gate;
  const float* w_in;
  const float* w_out;
  int64_t n, k, num_experts, d, f;
};

// 16 floats, loaded and stored unaligned (GCC/Clang vector extension; one
// AVX-512 register, or two AVX2 ones).
typedef float V16 __attribute__((vector_size(64), aligned(4)));

// For r < R and i < len:  out[r][i] += sum_{q < Q} s[r][q] * w[q * w_stride + i].
// The Q weight vectors at column i are loaded once for all R rows, and each
// output vector takes Q fused multiply-adds per load and store.
//
// Each of the Q rows of w is one short stream (a row of W_in is 8 KB at
// 2F = 2048, one 4 KB page at 1024), too short for the hardware prefetchers
// to run ahead in (one thread streamed 12 GB/s without this, 21 with it, in
// a stand-in of four Mixtral-like MoE layers); so the same
// columns of the next Q rows (`prefetch_rows` of them, the next pass) are
// prefetched into L2 while this pass runs.
template <int Q>
void Block(float* const* out, const float* const* s, int64_t r_count, const float* w,
           int64_t w_stride, int64_t len, int64_t prefetch_rows) {
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    for (int64_t q = 0; q < prefetch_rows; ++q) __builtin_prefetch(w + (Q + q) * w_stride + i, 0, 2);
    V16 wv[Q];
    for (int q = 0; q < Q; ++q) wv[q] = *reinterpret_cast<const V16*>(w + q * w_stride + i);
    for (int64_t r = 0; r < r_count; ++r) {
      V16 acc = *reinterpret_cast<const V16*>(out[r] + i);
      for (int q = 0; q < Q; ++q) acc += s[r][q] * wv[q];
      *reinterpret_cast<V16*>(out[r] + i) = acc;
    }
  }
  for (; i < len; ++i) {
    for (int64_t r = 0; r < r_count; ++r) {
      float acc = out[r][i];
      for (int q = 0; q < Q; ++q) acc += s[r][q] * w[q * w_stride + i];
      out[r][i] = acc;
    }
  }
}

// out[r][:len] += s[r][:rows] @ w[:rows, :len] (w rows w_stride apart), 8 rows of w a pass.
void AddProduct(std::vector<float*>& out, std::vector<const float*>& s, const float* w,
                int64_t w_stride, int64_t rows, int64_t len) {
  const int64_t r_count = static_cast<int64_t>(out.size());
  int64_t c = 0;
  for (; c + 8 <= rows; c += 8) {
    Block<8>(out.data(), s.data(), r_count, w + c * w_stride, w_stride, len,
             std::min<int64_t>(8, rows - c - 8));
    for (auto& sr : s) sr += 8;
  }
  for (; c < rows; ++c) {
    Block<1>(out.data(), s.data(), r_count, w + c * w_stride, w_stride, len, 0);
    for (auto& sr : s) sr += 1;
  }
}

// The rows of one chosen expert: r_count rows from `offset` in the [R, ...]
// scratch buffers, R = N * K the number of assignments.
struct Group {
  int64_t expert, offset;
  std::vector<int64_t> rows;
  std::vector<float> gates;
};

// Parts are claimed from counters by the calling thread and the pool tasks
// alike, so the call finishes even when no pool thread is free; the state
// lives on the heap because a task may start after the call returned.
struct Shared {
  Problem p;
  int64_t parts;
  std::vector<Group> groups;
  std::vector<std::vector<float>> h;        // per part: [R, 2F] partial pre-activations
  std::vector<float> a;                     // [R, F] gate * silu(h_gate) * h_up
  std::vector<std::vector<float>> partial;  // y of parts 1..P-1, [N, D]
  std::atomic<int64_t> next1{0}, done1{0}, next2{0}, done2{0};
};

// Phase 1, part q: h_q = x_rows @ W_in[e][rows q D/P .. (q+1) D/P of D, :].
void Phase1(Shared& s, int64_t q) {
  const Problem& p = s.p;
  const int64_t c0 = p.d * q / s.parts, c1 = p.d * (q + 1) / s.parts, f2 = 2 * p.f;
  std::vector<float>& h = s.h[q];
  h.assign(p.n * p.k * f2, 0.0f);
  std::vector<float*> out;
  std::vector<const float*> xs;
  for (const Group& g : s.groups) {
    out.clear();
    xs.clear();
    for (size_t r = 0; r < g.rows.size(); ++r) {
      out.push_back(h.data() + (g.offset + r) * f2);
      xs.push_back(p.x + g.rows[r] * p.d + c0);
    }
    AddProduct(out, xs, p.w_in + (g.expert * p.d + c0) * f2, f2, c1 - c0, f2);
  }
}

// Phase 2, part q, hidden units j in [q F/P, (q+1) F/P):
// a = gate * silu(sum_q' h_q'[:, j]) * sum_q' h_q'[:, F + j];  y_q += a @ W_out[e][j, :].
void Phase2(Shared& s, int64_t q, float* y_NxD) {
  const Problem& p = s.p;
  const int64_t j0 = p.f * q / s.parts, j1 = p.f * (q + 1) / s.parts, f2 = 2 * p.f;
  std::vector<float*> out;
  std::vector<const float*> as;
  for (const Group& g : s.groups) {
    for (size_t r = 0; r < g.rows.size(); ++r) {
      float* a = s.a.data() + (g.offset + r) * p.f;
      for (int64_t j = j0; j < j1; ++j) {
        float gate = 0.0f, up = 0.0f;
        for (const auto& h : s.h) {
          gate += h[(g.offset + r) * f2 + j];
          up += h[(g.offset + r) * f2 + p.f + j];
        }
        a[j] = gate / (1.0f + std::exp(-gate)) * up * g.gates[r];
      }
    }
    out.clear();
    as.clear();
    for (size_t r = 0; r < g.rows.size(); ++r) {
      out.push_back(y_NxD + g.rows[r] * p.d);
      as.push_back(s.a.data() + (g.offset + r) * p.f + j0);
    }
    AddProduct(out, as, p.w_out + (g.expert * p.f + j0) * p.d, p.d, j1 - j0, p.d);
  }
}

void Work(Shared& s, float* y0) {
  for (int64_t q; (q = s.next1.fetch_add(1, std::memory_order_acq_rel)) < s.parts;) {
    Phase1(s, q);
    s.done1.fetch_add(1, std::memory_order_acq_rel);
  }
  while (s.done1.load(std::memory_order_acquire) < s.parts) std::this_thread::yield();
  for (int64_t q; (q = s.next2.fetch_add(1, std::memory_order_acq_rel)) < s.parts;) {
    Phase2(s, q, q == 0 ? y0 : s.partial[q - 1].data());
    s.done2.fetch_add(1, std::memory_order_acq_rel);
  }
}

ffi::Error MoeFfnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> expert,
                      ffi::Buffer<ffi::F32> gate, ffi::Buffer<ffi::F32> w_in,
                      ffi::Buffer<ffi::F32> w_out, ffi::ResultBuffer<ffi::F32> y,
                      int64_t threads) {
  const auto xd = x.dimensions(), ed = expert.dimensions(), wd = w_in.dimensions();
  if (xd.size() != 2 || ed.size() != 2 || wd.size() != 3 || w_out.dimensions().size() != 3) {
    return ffi::Error::InvalidArgument("moe_ffn: x [N, D], expert [N, K], w_in [E, D, 2F]");
  }
  auto s = std::make_shared<Shared>();
  s->p = {x.typed_data(), expert.typed_data(), gate.typed_data(), w_in.typed_data(),
          w_out.typed_data(), xd[0], ed[1], wd[0], xd[1], wd[2] / 2};
  const Problem& p = s->p;
  s->parts = std::clamp<int64_t>(threads, 1, std::max<int64_t>(std::min(p.d, p.f), 1));
  int64_t offset = 0;
  for (int64_t e = 0; e < p.num_experts; ++e) {  // each chosen expert once, with all its rows
    Group g{e, offset, {}, {}};
    for (int64_t i = 0; i < p.n * p.k; ++i) {
      if (p.expert[i] == e) {
        g.rows.push_back(i / p.k);
        g.gates.push_back(p.gate[i]);
      }
    }
    offset += static_cast<int64_t>(g.rows.size());
    if (!g.rows.empty()) s->groups.push_back(std::move(g));
  }
  s->h.resize(s->parts);
  s->a.assign(p.n * p.k * p.f, 0.0f);
  s->partial.assign(s->parts - 1, std::vector<float>(p.n * p.d, 0.0f));
  float* y0 = y->typed_data();
  std::fill(y0, y0 + p.n * p.d, 0.0f);
  for (int64_t t = 1; t < s->parts; ++t) pool.Schedule([s, y0] { Work(*s, y0); });
  Work(*s, y0);
  while (s->done2.load(std::memory_order_acquire) < s->parts) std::this_thread::yield();
  for (const auto& part : s->partial) {
    for (int64_t i = 0; i < p.n * p.d; ++i) y0[i] += part[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeFfn, MoeFfnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));
