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
// [B, H, Ev]; row-major; the pools both float32 or both bfloat16 (BF16, or its bits
// as U16), q, k_new, v_new and o all float32 or all bfloat16 (bfloat16 widened on
// read, o rounded to nearest even); table entries are clamped to [0, P).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "matmul_cpu_vec.h"  // V16, Load, LaneSums
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const void *q, *k_new, *v_new;  // float32, or bfloat16 when `bf16` (and then o too)
  const void *k_pages, *v_pages;  // float32, or bfloat16 when `cache_bf16`
  const int32_t *table, *len;
  void* o;
  bool bf16, cache_bf16;
  int64_t b, h, kv, p, s, m, ek, ev;
  float scale;
  // Elements between kv heads, pages and a page's slots, in k and in v (the layout).
  int64_t k_head, k_page, k_slot, v_head, v_page, v_slot;
};

// exp(x) lane by lane, x clamped to [-87, 88] (Cephes' expf: x = n ln 2 + r, a
// degree-5 polynomial in r, 2^n by the exponent bits); inline, where a libmvec call
// would spill every live vector register around it.
inline V16 Exp(V16 x) {
  typedef int32_t I16 __attribute__((vector_size(64), aligned(4)));
  const V16 lo = V16{} - 87.0f, hi = V16{} + 88.0f;
  x = x < lo ? lo : (x > hi ? hi : x);
  V16 n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f + 0.5f, I16), V16);
  n = n > x * 1.44269504f + 0.5f ? n - 1.0f : n;  // floor (the conversion truncates)
  const V16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V16 y = 1.9875691500e-4f * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const I16 bits = (__builtin_convertvector(n, I16) + 127) << 23;
  V16 two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return y * two_n;
}

// Tokens a block scores and accumulates at once: their keys and values stay in L1
// between the two passes and the G heads.
constexpr int64_t kBlock = 32;
const V16 kLane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

inline float Sum(V16 v) {
  float x = 0.0f;
  for (int i = 0; i < 16; ++i) x += v[i];
  return x;
}

// f(C, e0) over [0, e) in groups of C <= 8 chunks of 16 floats (C a
// std::integral_constant, so a group's C vectors live in registers); the
// e % 16 floats left are the caller's.
template <typename F>
void ForChunks(int64_t e, F f) {
  using std::integral_constant;
  int64_t e0 = 0;
  for (; e0 + 128 <= e; e0 += 128) f(integral_constant<int, 8>{}, e0);
  switch ((e - e0) / 16) {
    case 7: f(integral_constant<int, 7>{}, e0); break;
    case 6: f(integral_constant<int, 6>{}, e0); break;
    case 5: f(integral_constant<int, 5>{}, e0); break;
    case 4: f(integral_constant<int, 4>{}, e0); break;
    case 3: f(integral_constant<int, 3>{}, e0); break;
    case 2: f(integral_constant<int, 2>{}, e0); break;
    case 1: f(integral_constant<int, 1>{}, e0); break;
    default: break;
  }
}

// f(J, j0) over the heads [0, nh) in passes of J <= 4 heads (J a std::integral_constant),
// at most 16 / C at once so that a pass's J C query chunks or accumulators stay in
// registers beside the C chunks of a key or value.
template <int C, typename F>
void ForHeads(int64_t nh, F f) {
  using std::integral_constant;
  constexpr int64_t most = std::max(1, std::min(4, 16 / C));
  for (int64_t j0 = 0; j0 < nh;) {
    const int64_t j = std::min(most, nh - j0);
    if (j == 4) f(integral_constant<int, 4>{}, j0);
    else if (j == 3) f(integral_constant<int, 3>{}, j0);
    else if (j == 2) f(integral_constant<int, 2>{}, j0);
    else f(integral_constant<int, 1>{}, j0);
    j0 += j;
  }
}

// part[j kBlock + i] += q_j[:16 C] * k_i[:16 C] lane by lane for J query heads q_j = q + j
// q_stride sharing the keys k_i = k + i * slot, i < n (float32, or bfloat16 bits widened
// on load): each key chunk is loaded once for the J heads.
template <int C, int J, typename T>
void DotHeads(const float* q, int64_t q_stride, const T* k, int64_t slot, int64_t n, V16* part) {
  V16 qc[J][C];
  for (int j = 0; j < J; ++j)
    for (int c = 0; c < C; ++c) qc[j][c] = Load(q + j * q_stride + 16 * c);
  for (int64_t i = 0; i < n; ++i) {
    V16 kc[C];
    for (int c = 0; c < C; ++c) kc[c] = Load(k + i * slot + 16 * c);
    for (int j = 0; j < J; ++j) {
      V16 x = part[j * kBlock + i];
      for (int c = 0; c < C; ++c) x += qc[j][c] * kc[c];
      part[j * kBlock + i] = x;
    }
  }
}

// acc_j[:16 C] = a_j acc_j[:16 C] + sum_i w_j[i] v_i[:16 C] for J heads (w_j = w + j kBlock,
// acc_j = acc + j acc_stride) sharing the values v_i = v + i * slot, i < n.
template <int C, int J, typename T>
void AxpyHeads(const float* w, const T* v, int64_t slot, int64_t n, const float* a, float* acc,
               int64_t acc_stride) {
  V16 y[J][C];
  for (int j = 0; j < J; ++j)
    for (int c = 0; c < C; ++c) y[j][c] = a[j] * Load(acc + j * acc_stride + 16 * c);
  for (int64_t i = 0; i < n; ++i) {
    V16 vc[C];
    for (int c = 0; c < C; ++c) vc[c] = Load(v + i * slot + 16 * c);
    for (int j = 0; j < J; ++j) {
      const V16 wi = V16{} + w[j * kBlock + i];
      for (int c = 0; c < C; ++c) y[j][c] += wi * vc[c];
    }
  }
  for (int j = 0; j < J; ++j)
    for (int c = 0; c < C; ++c) std::memcpy(acc + j * acc_stride + 16 * c, &y[j][c], sizeof(V16));
}

// Row b, kv head kh: its G query heads over the row's tokens and its new token, in
// blocks of kBlock tokens within a page. A block's keys are scored for all G heads
// (each key chunk loaded once for up to 4 heads, `DotHeads`; each head's 16-lane
// partial dots reduced 16 tokens at a time by `LaneSums`), its scores update the
// online softmax, and its values are accumulated for all G heads (`AxpyHeads`, the
// accumulators in registers over the block). Built with -ffast-math
// (kernels/paged_attention_cpu.py) so the max over a block vectorises; every value read
// is finite (slots past a row's length are never read). T: the cache's element, float
// or uint16_t (bfloat16 bits, widened on load).
template <typename T>
void Task(const Problem& p, int64_t b, int64_t kh) {
  const int64_t g = p.h / p.kv, ek16 = p.ek / 16 * 16, ev16 = p.ev / 16 * 16;
  const T* k_pages = static_cast<const T*>(p.k_pages);
  const T* v_pages = static_cast<const T*>(p.v_pages);
  std::vector<float> q(g * p.ek), m(g), l(g, 1.0f), a(g), acc(g * p.ev), s(g * kBlock);
  std::vector<V16> part(g * kBlock);
  auto in = [&](const void* x, int64_t i) {  // element i of q, k_new or v_new, widened
    return p.bf16 ? Scalar(static_cast<const uint16_t*>(x)[i]) : static_cast<const float*>(x)[i];
  };
  const int64_t q0 = (b * p.h + kh * g) * p.ek;
  for (int64_t i = 0; i < g * p.ek; ++i) q[i] = p.scale * in(p.q, q0 + i);  // the scale, once
  // s[j kBlock + i] = q_j . k_i for the block's n tokens k_i = k + i * slot.
  auto scores = [&](const T* k, int64_t slot, int64_t n) {
    for (int64_t j = 0; j < g; ++j) std::fill(&part[j * kBlock], &part[j * kBlock] + n, V16{});
    ForChunks(p.ek, [&](auto c, int64_t e0) {
      ForHeads<c>(g, [&](auto jn, int64_t j) {
        DotHeads<c, jn>(&q[j * p.ek + e0], p.ek, k + e0, slot, n, &part[j * kBlock]);
      });
    });
    for (int64_t j = 0; j < g; ++j) {
      float* sj = s.data() + j * kBlock;
      for (int64_t i0 = 0; i0 < n; i0 += 16)
        LaneSums(&part[j * kBlock + i0], static_cast<int>(std::min<int64_t>(16, n - i0)), sj + i0);
      for (int64_t e = ek16; e < p.ek; ++e)
        for (int64_t i = 0; i < n; ++i) sj[i] += q[j * p.ek + e] * Scalar(k[i * slot + e]);
    }
  };
  // acc_j = a_j acc_j + sum_i s_j[i] v_i.
  auto accumulate = [&](const T* v, int64_t slot, int64_t n) {
    ForChunks(p.ev, [&](auto c, int64_t e0) {
      ForHeads<c>(g, [&](auto jn, int64_t j) {
        AxpyHeads<c, jn>(&s[j * kBlock], v + e0, slot, n, &a[j], &acc[j * p.ev + e0], p.ev);
      });
    });
    for (int64_t j = 0; j < g; ++j) {
      const float* w = s.data() + j * kBlock;
      float* acc_j = acc.data() + j * p.ev;
      for (int64_t e = ev16; e < p.ev; ++e) {
        float y = a[j] * acc_j[e];
        for (int64_t i = 0; i < n; ++i) y += w[i] * Scalar(v[i * slot + e]);
        acc_j[e] = y;
      }
    }
  };
  const int64_t k0 = (b * p.kv + kh) * p.ek, v0 = (b * p.kv + kh) * p.ev;  // the new token
  for (int64_t j = 0; j < g; ++j) {
    float x = 0.0f;
    for (int64_t e = 0; e < p.ek; ++e) x += q[j * p.ek + e] * in(p.k_new, k0 + e);
    m[j] = x;
    for (int64_t e = 0; e < p.ev; ++e) acc[j * p.ev + e] = in(p.v_new, v0 + e);
  }
  constexpr int64_t kLine = 64 / sizeof(T);  // elements of a cache line
  const int64_t len = std::clamp<int64_t>(p.len[b], 0, p.m * p.s);
  for (int64_t t0 = 0; t0 < len; t0 += p.s) {
    const int64_t page = std::clamp<int64_t>(p.table[b * p.m + t0 / p.s], 0, p.p - 1);
    const T* kp = k_pages + kh * p.k_head + page * p.k_page;
    const T* vp = v_pages + kh * p.v_head + page * p.v_page;
    if (t0 + p.s < len) {  // the next page is elsewhere in the pool: fetch it ahead
      const int64_t next = std::clamp<int64_t>(p.table[b * p.m + t0 / p.s + 1], 0, p.p - 1);
      const T* kx = k_pages + kh * p.k_head + next * p.k_page;
      const T* vx = v_pages + kh * p.v_head + next * p.v_page;
      for (int64_t i = 0; i < p.s; ++i) {
        for (int64_t e = 0; e < p.ek; e += kLine) __builtin_prefetch(kx + i * p.k_slot + e);
        for (int64_t e = 0; e < p.ev; e += kLine) __builtin_prefetch(vx + i * p.v_slot + e);
      }
    }
    const int64_t page_n = std::min(p.s, len - t0);
    for (int64_t i0 = 0; i0 < page_n; i0 += kBlock) {
      const int64_t n = std::min(kBlock, page_n - i0);
      scores(kp + i0 * p.k_slot, p.k_slot, n);
      for (int64_t j = 0; j < g; ++j) {  // the online softmax's update
        float* sj = s.data() + j * kBlock;
        float top = m[j];
        for (int64_t i = 0; i < n; ++i) top = std::max(top, sj[i]);
        a[j] = Exp(V16{} + (m[j] - top))[0];
        V16 sum{};
        for (int64_t i0 = 0; i0 < n; i0 += 16) {  // lanes past n: garbage in, 0 out
          V16 e = Exp(Load(sj + i0) - top);
          e = kLane < static_cast<float>(n - i0) ? e : V16{};
          std::memcpy(sj + i0, &e, sizeof(e));
          sum += e;
        }
        l[j] = a[j] * l[j] + Sum(sum);
        m[j] = top;
      }
      accumulate(vp + i0 * p.v_slot, p.v_slot, n);
    }
  }
  const int64_t o0 = (b * p.h + kh * g) * p.ev;
  for (int64_t j = 0; j < g; ++j) {
    for (int64_t e = 0; e < p.ev; ++e) {
      const float y = acc[j * p.ev + e] / l[j];
      if (p.bf16) static_cast<uint16_t*>(p.o)[o0 + j * p.ev + e] = RoundBf16(y);
      else static_cast<float*>(p.o)[o0 + j * p.ev + e] = y;
    }
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
  const Problem& p = s.p;
  const int64_t tasks = p.b * p.kv;
  for (int64_t t; (t = s.next.fetch_add(1, std::memory_order_acq_rel)) < tasks;) {
    if (p.cache_bf16) Task<uint16_t>(p, t / p.kv, t % p.kv);
    else Task<float>(p, t / p.kv, t % p.kv);
    s.done.fetch_add(1, std::memory_order_acq_rel);
  }
}

bool IsBf16(ffi::DataType t) { return t == ffi::DataType::BF16 || t == ffi::DataType::U16; }

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::AnyBuffer q,
                              ffi::AnyBuffer k_pages, ffi::AnyBuffer v_pages,
                              ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> len,
                              ffi::AnyBuffer k_new, ffi::AnyBuffer v_new,
                              ffi::Result<ffi::AnyBuffer> o, int64_t threads, float scale,
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
  const auto io = q.element_type();
  if ((io != ffi::DataType::F32 && io != ffi::DataType::BF16) || k_new.element_type() != io ||
      v_new.element_type() != io || o->element_type() != io) {
    return ffi::Error::InvalidArgument(
        "paged_attention_cpu: q, k_new, v_new and o are all float32 or all bfloat16");
  }
  const auto ct = k_pages.element_type();
  if ((ct != ffi::DataType::F32 && !IsBf16(ct)) || v_pages.element_type() != ct) {
    return ffi::Error::InvalidArgument(
        "paged_attention_cpu: k and v caches both float32, or both bfloat16 (or its bits, "
        "uint16)");
  }
  const int64_t kv = kd[ax_k], pages = kd[ax_p], slots = kd[ax_s], ek = kd[3], ev = vd[3];
  auto s = std::make_shared<Shared>();
  Problem& p = s->p;
  p.q = q.untyped_data(), p.k_new = k_new.untyped_data(), p.v_new = v_new.untyped_data();
  p.k_pages = k_pages.untyped_data(), p.v_pages = v_pages.untyped_data();
  p.table = table.typed_data(), p.len = len.typed_data(), p.o = o->untyped_data();
  p.bf16 = io == ffi::DataType::BF16, p.cache_bf16 = IsBf16(ct);
  p.b = qd[0], p.h = qd[1], p.kv = kv, p.p = pages, p.s = slots, p.m = td[1], p.ek = ek;
  p.ev = ev, p.scale = scale;
  if (layout == 0) {
    p.k_head = pages * slots * ek, p.k_page = slots * ek, p.k_slot = ek;
    p.v_head = pages * slots * ev, p.v_page = slots * ev, p.v_slot = ev;
  } else {
    p.k_head = ek, p.k_page = slots * kv * ek, p.k_slot = kv * ek;
    p.v_head = ev, p.v_page = slots * kv * ev, p.v_slot = kv * ev;
  }
  const int64_t tasks = p.b * p.kv;
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
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("threads")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("layout"));
