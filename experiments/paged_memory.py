"""KV memory under a request trace: reservation vs paging, on moelab's page allocator.

  python -m experiments.paged_memory [--budget=32768 --max_len=2048 --steps=3000]

vLLM (Kwon et al. 2023, arXiv 2309.06180 §2.3, Fig. 2) measured that systems which
reserve a contiguous KV region per request keep token states in only 20.4-38.2% of
it; paging (§4.2-4.3) keeps 96.3%. This replays that comparison: requests arrive as
a Poisson process (rate --rate_short / --rate_long per decode step, high enough that
a queue builds under every scheme, so memory is what limits the batch), with a short
and a long lognormal length distribution; each running request generates one token
per step; a fixed budget of --budget KV token slots. Schemes:

  max-length   reserves --max_len contiguous slots at admission (first fit)
  pow2         reserves the power of two >= its final length (first fit; an oracle
               of the length, vLLM's "Orca (Pow2)")
  paged S      pages of S = 8 ... 128 slots from moelab's allocator
               (model/page_pool.py: `claim` at admission and whenever a row crosses
               into a new page, `add_refs(-1)` when it finishes), admitted while the
               pool keeps a 1% watermark; a row that finds the pool dry preempts the
               latest-admitted rows (their pages back, requeued: vLLM §4.5 recompute)

Breakdown of the budget, averaged over the steps with requests waiting (vLLM Fig. 2):
token states (prompt + tokens generated so far), reserved (slots a request will still
fill), internal fragmentation (allocated slots it never fills), external
fragmentation & free (slots no request holds while requests wait). Also the mean and
largest concurrent batch and tokens per step. Writes paged_memory.csv,
paged_memory.png and verdict.txt (one line, also printed) into --out_dir (the layout
of experiments/figures/common.py).
"""

from __future__ import annotations

import collections
import csv
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from model import page_pool

_BUDGET = flags.DEFINE_integer("budget", 32768, "KV token slots in the budget.")
_MAX_LEN = flags.DEFINE_integer("max_len", 2048, "Longest request (max-length reservation).")
_STEPS = flags.DEFINE_integer("steps", 3000, "Decode steps simulated.")
_WARMUP = flags.DEFINE_integer("warmup", 500, "Steps before the averages start.")
_RATE_SHORT = flags.DEFINE_float("rate_short", 2.0, "Arrivals per step, short requests.")
_RATE_LONG = flags.DEFINE_float("rate_long", 0.2, "Arrivals per step, long requests.")
_SEED = flags.DEFINE_integer("seed", 0, "Trace seed.")
_OUT = flags.DEFINE_string("out_dir", "runs/figures/paged_memory", "Where the outputs go.")
BLOCKS = (8, 16, 32, 64, 128)
DISTRIBUTIONS = {  # (prompt median, output median, sigma)
    "short": (64, 128, 0.8), "long": (512, 512, 0.6)}


def trace(dist, rate, steps, max_len, seed):
  """[(arrival step, prompt, output)] of a Poisson trace, prompt + output <= max_len."""
  rng = np.random.default_rng(seed)
  pm, om, sigma = DISTRIBUTIONS[dist]
  out = []
  for t in range(steps):
    for _ in range(rng.poisson(rate)):
      p = int(np.clip(round(rng.lognormal(math.log(pm), sigma)), 1, max_len - 1))
      o = int(np.clip(round(rng.lognormal(math.log(om), sigma)), 1, max_len - p))
      out.append((t, p, o))
  return out


class Contiguous:
  """First-fit reservations in one linear buffer of `budget` slots."""

  def __init__(self, budget, size_of):
    self.holes, self.size_of = [(0, budget)], size_of

  def admit(self, req):
    need = self.size_of(req)
    for i, (start, size) in enumerate(self.holes):
      if size >= need:
        self.holes[i:i + 1] = [(start + need, size - need)] if size > need else []
        req["region"], req["alloc"] = (start, need), need
        return True
    return False

  def grow(self, running):
    return []  # everything was reserved at admission

  def finish(self, req):
    start, size = req.pop("region")
    holes = sorted(self.holes + [(start, size)])
    merged = [holes[0]]
    for s, n in holes[1:]:
      if merged[-1][0] + merged[-1][1] == s:
        merged[-1] = (merged[-1][0], merged[-1][1] + n)
      else:
        merged.append((s, n))
    self.holes = merged


class Paged:
  """Pages of S slots from model/page_pool.py's allocator (jitted, as in the cache)."""

  claim = staticmethod(jax.jit(page_pool.claim))
  free = staticmethod(jax.jit(lambda pool, pages: page_pool.add_refs(pool, pages, -1)))

  def __init__(self, budget, s, max_len):
    self.s, self.pool = s, page_pool.new_pool(budget // s)
    self.width = math.ceil(max_len / s)  # most pages of one request: the free call's shape
    self.watermark = max(1, self.pool.num_pages // 100)

  def _claim(self, n):
    pool, pages = Paged.claim(self.pool, jnp.arange(self.pool.num_pages) < n)
    self.pool = pool
    pages = np.asarray(pages[:n])
    assert (pages < self.pool.num_pages).all(), "claim beyond the checked free pages"
    return pages.tolist()

  def top(self):
    return int(self.pool.top)

  def admit(self, req):
    need = math.ceil(req["len"] / self.s)
    if self.top() - need < self.watermark:
      return False
    req["pages"] = self._claim(need)
    req["alloc"] = need * self.s
    return True

  def grow(self, running):
    """Pages for the rows whose next token starts a page; returns the preempted rows."""
    needy = [r for r in running if r["len"] % self.s == 0]
    preempted = []
    while needy and self.top() < len(needy):
      victim = max((r for r in running if all(r is not v for v in preempted)),
                   key=lambda r: r["admitted"])
      preempted.append(victim)
      self.finish(victim)
      needy = [r for r in needy if r is not victim]
    if needy:
      for r, page in zip(needy, self._claim(len(needy))):
        r["pages"].append(page)
        r["alloc"] += self.s
    return preempted

  def finish(self, req):
    held = req.pop("pages")
    pages = np.full(self.width, self.pool.num_pages, np.int32)
    pages[:len(held)] = held
    self.pool = Paged.free(self.pool, pages)
    req["alloc"] = 0


def simulate(scheme, requests, budget, steps, warmup):
  """Replays the trace; returns the averaged breakdown and batch statistics."""
  queue = collections.deque()
  arrivals = collections.deque(requests)
  running, sums, samples, batches, tokens, preemptions = [], collections.Counter(), 0, [], 0, 0
  for t in range(steps):
    while arrivals and arrivals[0][0] <= t:
      _, p, o = arrivals.popleft()
      queue.append({"prompt": p, "final": p + o, "len": p, "admitted": -1})
    while queue and scheme.admit(queue[0]):
      req = queue.popleft()
      req["admitted"] = t
      running.append(req)
    preempted = scheme.grow(running)  # paging: a page for rows crossing a boundary
    running = [r for r in running if all(r is not v for v in preempted)]
    for req in reversed(preempted):  # back to the head of the queue, oldest first
      req.update(len=req["prompt"], admitted=-1)
      queue.appendleft(req)
      preemptions += 1
    if t >= warmup and queue:
      samples += 1
      held = sum(r["alloc"] for r in running)
      sums["token states"] += sum(r["len"] for r in running)
      sums["reserved"] += sum(min(r["alloc"], r["final"]) - r["len"] for r in running)
      sums["internal fragmentation"] += sum(r["alloc"] - min(r["alloc"], r["final"])
                                            for r in running)
      sums["external fragmentation & free"] += budget - held
      batches.append(len(running))
    for req in running:
      req["len"] += 1
    tokens += len(running) if t >= warmup else 0
    for req in [r for r in running if r["len"] >= r["final"]]:
      scheme.finish(req)
    running = [r for r in running if r["len"] < r["final"]]
  out = {k: v / max(samples, 1) / budget for k, v in sums.items()}
  out.update(mean_batch=float(np.mean(batches)) if batches else 0.0,
             max_batch=max(batches, default=0), tokens_per_step=tokens / (steps - warmup),
             preemptions=preemptions, saturated=samples / (steps - warmup))
  return out


def main(argv):
  del argv
  budget, max_len = _BUDGET.value, _MAX_LEN.value
  rows = []
  for dist, rate in (("short", _RATE_SHORT.value), ("long", _RATE_LONG.value)):
    reqs = trace(dist, rate, _STEPS.value, max_len, _SEED.value)
    schemes = {"max-length": lambda: Contiguous(budget, lambda r: max_len),
               "pow2": lambda: Contiguous(budget, lambda r: 1 << (r["final"] - 1).bit_length())}
    schemes.update({f"paged {s}": (lambda s=s: Paged(budget, s, max_len)) for s in BLOCKS})
    for name, make in schemes.items():
      r = simulate(make(), reqs, budget, _STEPS.value, _WARMUP.value)
      rows.append({"distribution": dist, "scheme": name, **r})
      print(f"{dist:5} {name:10} tokens {100 * r['token states']:5.1f}%  reserved "
            f"{100 * r['reserved']:5.1f}%  internal {100 * r['internal fragmentation']:5.1f}%  "
            f"external+free {100 * r['external fragmentation & free']:5.1f}%  batch "
            f"{r['mean_batch']:6.1f} (max {r['max_batch']:4d})  tok/step "
            f"{r['tokens_per_step']:6.1f}  preempted {r['preemptions']}  "
            f"saturated {100 * r['saturated']:.0f}%", flush=True)
  os.makedirs(_OUT.value, exist_ok=True)
  write_csv(os.path.join(_OUT.value, "paged_memory.csv"), rows)
  plot(os.path.join(_OUT.value, "paged_memory.png"), rows, budget)
  line = verdict(rows)
  with open(os.path.join(_OUT.value, "verdict.txt"), "w") as f:
    f.write(line + "\n")
  print(line)


def write_csv(path, rows):
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, path)


PARTS = ("token states", "reserved", "internal fragmentation", "external fragmentation & free")


def plot(path, rows, budget):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  dists = list(dict.fromkeys(r["distribution"] for r in rows))
  fig, axes = plt.subplots(1, len(dists), figsize=(6 * len(dists), 4.5), squeeze=False)
  colors = ("#4c72b0", "#dd8452", "#c44e52", "#8c8c8c")
  for ax, dist in zip(axes[0], dists):
    sub = [r for r in rows if r["distribution"] == dist]
    bottom = np.zeros(len(sub))
    for part, color in zip(PARTS, colors):
      vals = np.array([100 * r[part] for r in sub])
      ax.bar(range(len(sub)), vals, bottom=bottom, color=color, label=part)
      bottom += vals
    for i, r in enumerate(sub):
      ax.text(i, 101, f"{r['mean_batch']:.0f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(sub)), [r["scheme"] for r in sub], rotation=30, ha="right")
    ax.set_ylim(0, 110)
    ax.set_ylabel(f"% of the {budget}-slot KV budget")
    ax.set_title(f"{dist} requests (numbers: mean concurrent batch)")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(PARTS), fontsize=9)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  tmp = f"{path}.tmp-{os.getpid()}.png"
  fig.savefig(tmp, dpi=120)
  os.replace(tmp, path)


def verdict(rows):
  parts = []
  for dist in dict.fromkeys(r["distribution"] for r in rows):
    by = {r["scheme"]: r for r in rows if r["distribution"] == dist}
    p = by["paged 16"]
    util = p["token states"] / (p["token states"] + p["reserved"] + p["internal fragmentation"])
    parts.append(f"{dist}: paging (S=16) holds token states in {100 * util:.1f}% of the KV it "
                 f"allocates ({100 * p['token states']:.0f}% of the budget vs "
                 f"{100 * by['max-length']['token states']:.0f}% max-length, "
                 f"{100 * by['pow2']['token states']:.0f}% pow2) and runs "
                 f"{p['mean_batch'] / max(by['max-length']['mean_batch'], 1e-9):.1f}x the "
                 f"max-length batch")
  return "Verdict: " + "; ".join(parts) + "."


if __name__ == "__main__":
  app.run(main)
