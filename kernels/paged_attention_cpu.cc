// Paged decode attention on CPU, as an XLA FFI custom call: one query token per row
// over the row's cached tokens in a paged pool plus the step's own key.
//
//   o[b, h] = sum_t softmax_t(s_t) v_t,  s_t = scale * q[b, h] . k_t,
//   t over the tokens < len[b] of row b (page table[b, t / S], slot t % S of the
//   pools) and the step's own key/value k_new[b, h / G], v_new[b, h / G].
//
// Why a kernel: XLA:CPU reads a paged cache by gathering every row's pages into a
// contiguous copy first (a write and a second read of the whole cache per step),
// and reads the full table width for every row. Here each (row, kv head) reads the
// row's valid tokens once, in place in the pools, for the G query heads that share
// them, with the online softmax (Milakov & Gimelshein 2018, arXiv 1805.02867) over
// one page at a time (the contiguous cache is read as one page of T slots per row,
// `layout` 1 below):
//
//   m' = max(m, max_s s_s), a = exp(m - m'), l' = a l + sum_s exp(s_s - m'),
//   acc' = a acc + sum_s exp(s_s - m') v_s,  o = acc / l   (start: the new token)
//
// Tasks (b, kv head) are split over the threads of XLA's intra-op pool; slots past
// a row's length are never read, so whatever free or half-filled pages hold cannot
// reach o. Shapes: q [B, H, Ek], k_pages [K, P, S, Ek], v_pages [K, P, S, Ev]
// (`layout` 0, the paged pools) or [P, S, K, Ek], [P, S, K, Ev] (`layout` 1: the
// contiguous [B, T, K, E] cache, P = B pages of S = T slots, table [B, 1] = b),
// table [B, M] int32, len [B] int32, k_new [B, K, Ek], v_new [B, K, Ev] -> o
// [B, H, Ev]; float32, row-major; table entries are clamped to [0, P).

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
  const float *q, *k_pages, *v_pages, *k_new, *v_new;
  const int32_t *table, *len;
  float* o;
  int64_t b, h, kv, p, s, m, ek, ev;
  float scale;
  // Elements between kv heads, pages and a page's slots, in k and in v (the layout).
  int64_t k_head, k_page, k_slot, v_head, v_page, v_slot;
};

// 8 floats, loaded and stored unaligned (GCC/Clang vector extension: one AVX2
// register, half an AVX-512 one).
typedef float V8 __attribute__((vector_size(32), aligned(4)));

inline V8 Load(const float* x) { return *reinterpret_cast<const V8*>(x); }

inline float Sum(V8 v) {
  float acc = 0.0f;
  for (int i = 0; i < 8; ++i) acc += v[i];
  return acc;
}

// Row b, kv head kh: its G query heads over the row's tokens and its new token. A
// page's keys and values are loaded once for all G heads: per token, each 8-float
// chunk of k feeds G products, each chunk of v G accumulations. Built with
// -ffast-math (kernels/paged_attention_cpu.py) so the exp of a page's scores is
// vectorised; every value read is finite (slots past a row's length are never read).
void Task(const Problem& p, int64_t b, int64_t kh) {
  const int64_t g = p.h / p.kv, ek8 = p.ek / 8 * 8, ev8 = p.ev / 8 * 8;
  const float* q = p.q + (b * p.h + kh * g) * p.ek;  // [G, Ek]
  std::vector<float> m(g), l(g, 1.0f), acc(g * p.ev), s(g * p.s);
  std::vector<V8> part(g);
  auto scores = [&](const float* k, float* out, int64_t stride) {  // out[j * stride] = q_j . k
    for (int64_t j = 0; j < g; ++j) part[j] = V8{};
    for (int64_t e = 0; e < ek8; e += 8) {
      const V8 kc = Load(k + e);
      for (int64_t j = 0; j < g; ++j) part[j] += Load(q + j * p.ek + e) * kc;
    }
    for (int64_t j = 0; j < g; ++j) {
      float x = Sum(part[j]);
      for (int64_t e = ek8; e < p.ek; ++e) x += q[j * p.ek + e] * k[e];
      out[j * stride] = p.scale * x;
    }
  };
  auto accumulate = [&](const float* v, const float* w, int64_t stride) {  // acc_j += w_j v
    for (int64_t e = 0; e < ev8; e += 8) {
      const V8 vc = Load(v + e);
      for (int64_t j = 0; j < g; ++j) {
        V8* a = reinterpret_cast<V8*>(acc.data() + j * p.ev + e);
        *a += w[j * stride] * vc;
      }
    }
    for (int64_t e = ev8; e < p.ev; ++e) {
      for (int64_t j = 0; j < g; ++j) acc[j * p.ev + e] += w[j * stride] * v[e];
    }
  };
  const std::vector<float> ones(g, 1.0f);
  scores(p.k_new + (b * p.kv + kh) * p.ek, m.data(), 1);  // start from the new token
  accumulate(p.v_new + (b * p.kv + kh) * p.ev, ones.data(), 1);
  const int64_t len = std::clamp<int64_t>(p.len[b], 0, p.m * p.s);
  for (int64_t t0 = 0; t0 < len; t0 += p.s) {
    const int64_t page = std::clamp<int64_t>(p.table[b * p.m + t0 / p.s], 0, p.p - 1);
    const int64_t n = std::min(p.s, len - t0);
    const float* kp = p.k_pages + kh * p.k_head + page * p.k_page;
    const float* vp = p.v_pages + kh * p.v_head + page * p.v_page;
    if (t0 + p.s < len) {  // the next page is elsewhere in the pool: fetch it ahead
      const int64_t next = std::clamp<int64_t>(p.table[b * p.m + t0 / p.s + 1], 0, p.p - 1);
      const float* kx = p.k_pages + kh * p.k_head + next * p.k_page;
      const float* vx = p.v_pages + kh * p.v_head + next * p.v_page;
      for (int64_t i = 0; i < p.s; ++i) {
        for (int64_t e = 0; e < p.ek; e += 16) __builtin_prefetch(kx + i * p.k_slot + e);
        for (int64_t e = 0; e < p.ev; e += 16) __builtin_prefetch(vx + i * p.v_slot + e);
      }
    }
    for (int64_t i = 0; i < n; ++i) scores(kp + i * p.k_slot, s.data() + i, p.s);
    for (int64_t j = 0; j < g; ++j) {
      float* sj = s.data() + j * p.s;
      float top = m[j];
      for (int64_t i = 0; i < n; ++i) top = std::max(top, sj[i]);
      const float a = std::exp(m[j] - top);
      float sum = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        sj[i] = std::exp(sj[i] - top);
        sum += sj[i];
      }
      for (int64_t e = 0; e < p.ev; ++e) acc[j * p.ev + e] *= a;
      l[j] = a * l[j] + sum;
      m[j] = top;
    }
    for (int64_t i = 0; i < n; ++i) accumulate(vp + i * p.v_slot, s.data() + i, p.s);
  }
  float* o = p.o + (b * p.h + kh * g) * p.ev;
  for (int64_t j = 0; j < g; ++j) {
    for (int64_t e = 0; e < p.ev; ++e) o[j * p.ev + e] = acc[j * p.ev + e] / l[j];
  }
}

// Tasks are claimed from a counter by the calling thread and the pool tasks alike,
// so the call finishes even when no pool thread is free; the state lives on the
// heap because a pool task may start after the call returned.
struct Shared {
  Problem p;
  std::atomic<int64_t> next{0}, done{0};
};

void Work(Shared& s) {
  const int64_t tasks = s.p.b * s.p.kv;
  for (int64_t t; (t = s.next.fetch_add(1, std::memory_order_acq_rel)) < tasks;) {
    Task(s.p, t / s.p.kv, t % s.p.kv);
    s.done.fetch_add(1, std::memory_order_acq_rel);
  }
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::Buffer<ffi::F32> k_pages, ffi::Buffer<ffi::F32> v_pages,
                              ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> len,
                              ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                              ffi::ResultBuffer<ffi::F32> o, int64_t threads, float scale,
                              int64_t layout) {
  const auto qd = q.dimensions(), kd = k_pages.dimensions(), vd = v_pages.dimensions();
  const auto td = table.dimensions();
  const int ax_k = layout == 0 ? 0 : 2, ax_p = layout == 0 ? 1 : 0, ax_s = layout == 0 ? 2 : 1;
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || td.size() != 2 ||
      (layout != 0 && layout != 1) || kd[0] != vd[0] || kd[1] != vd[1] || kd[2] != vd[2] ||
      kd[3] != qd[2] || qd[1] % kd[ax_k] != 0 || td[0] != qd[0]) {
    return ffi::Error::InvalidArgument(
        "paged_attention_cpu: q [B, H, Ek], k/v [K, P, S, Ek/Ev] (layout 0) or "
        "[P, S, K, Ek/Ev] (layout 1), table [B, M]");
  }
  const int64_t kv = kd[ax_k], pages = kd[ax_p], slots = kd[ax_s], ek = kd[3], ev = vd[3];
  auto s = std::make_shared<Shared>();
  s->p = {q.typed_data(), k_pages.typed_data(), v_pages.typed_data(), k_new.typed_data(),
          v_new.typed_data(), table.typed_data(), len.typed_data(), o->typed_data(),
          qd[0], qd[1], kv, pages, slots, td[1], ek, ev, scale};
  if (layout == 0) {
    s->p.k_head = pages * slots * ek, s->p.k_page = slots * ek, s->p.k_slot = ek;
    s->p.v_head = pages * slots * ev, s->p.v_page = slots * ev, s->p.v_slot = ev;
  } else {
    s->p.k_head = ek, s->p.k_page = slots * kv * ek, s->p.k_slot = kv * ek;
    s->p.v_head = ev, s->p.v_page = slots * kv * ev, s->p.v_slot = kv * ev;
  }
  const int64_t tasks = s->p.b * s->p.kv;
  const int64_t helpers = std::clamp<int64_t>(threads, 1, std::max<int64_t>(tasks, 1)) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([s] { Work(*s); });
  Work(*s);
  while (s->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttentionCpu, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("layout"));
