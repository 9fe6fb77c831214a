// CPU implementation of milora_ext::gated_lora_linear.
//
//   y = x @ weight^T + bias                                (ATen: MKL / oneDNN, in x's dtype)
//   y[t] += sum_e gates[s,e] * B[p,e] @ (A[p,e] @ x[t])    (hand-written, float32 accumulation)
//
// This file plans the LoRA work; the work items themselves (cpu/lora_kernels.h) are compiled
// once per ISA level and the level is chosen at load time (cpu/isa.h, cpu/dispatch.cpp).
// The LoRA term runs in parallel phases over work grouped by adapter slot (lora_plan.h), so
// each active adapter's A and B are streamed once per call however its sequences are spread
// through the batch:
//   shrink:   U[t, e, :] = A[p,e] @ x[t] for each token whose sequence has gates[s,e] != 0
//             (U is a float32 scratch [T, E, Rpad]); when there are fewer work items than
//             threads (one adapter, few tokens) the reduction over K is split too, into
//             partial U buffers;
//   finalise: U[t, e, :] = gates[s,e] * (sum of the partial U), pad lanes 0;
//   expand:   y[t, :] += sum_e B[p,e] @ U[t, e, :] over the experts active for t's sequence,
//             in column chunks (256, narrower when that leaves threads idle) so a chunk of B
//             stays in cache for all the adapter's tokens; long lists on levels whose expand
//             is bound by y rather than B (AMX) in chunks of N / threads.
// Runs of batch-adjacent sequences of one adapter and expert set with at least gemm_min_tokens
// tokens (prefill; the level decides, cpu/isa.h) skip the phases: their LoRA term is two ATen GEMMs over their own rows
// (add_gated_lora_gemm), the blocked code the base product uses. In the phases, long token
// lists / adapters go through packed GEMM-like tiles (A^T / B^T packed to float32 panels once
// per work item); the others (decode: a few tokens per adapter) through dot tiles that read A
// and B straight from memory, which bounds them (for bfloat16 on AVX-512-BF16, with vdpbf16ps
// at the width B is stored).
// Sequences with adapter -1 and experts with gate 0 are never visited.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/isa.h"
#include "lora_plan.h"

namespace milora::cpu {
namespace {

constexpr int64_t kPackedMinTokens = 16;  // expand (float64): adapters with this many tokens use packed tiles
constexpr int64_t kPackedRows = 6;        // tokens per packed tile (lora_tiles.h)
constexpr int64_t kPackedMinChunk = 48;   // tokens per packed shrink work item: at least...
constexpr int64_t kPackedMaxChunk = 1024; // ...and at most
constexpr int64_t kDotTokens = 16;        // tokens per dot shrink work item
constexpr int64_t kDotRows = 8;           // rank rows per dot shrink work item
constexpr int64_t kMinSliceK = 512;       // a K slice of a split shrink is at least this long
constexpr int64_t kExpandCols = 256;      // output columns per expand work item (at most)
constexpr int64_t kMinExpandCols = 32;    // ...and at least

constexpr int64_t kParallelMinMacs = 1 << 16;  // below this a phase runs on the calling thread
constexpr size_t kKeptScratch = size_t(1) << 20;  // scratch (elements) kept per thread between calls

// Scratch of `need` elements: the calling thread's kept buffer (no allocation per decode step),
// or, for an unusually large call, `own`, freed by the caller on return.
template <typename A>
A* kept_or_own(std::vector<A>& kept, std::vector<A>& own, size_t need) {
  std::vector<A>& buf = need <= kKeptScratch ? kept : own;
  if (buf.size() < need) buf.resize(need);
  return buf.data();
}

int64_t round_up(int64_t v, int64_t m) {
  return (v + m - 1) / m * m;
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Runs fn(begin, end) over [0, num_items), across threads when the phase does enough
// multiply-adds to pay for waking them (a tiny problem would otherwise wait on the thread
// pool, and on a loaded machine that wait dominates).
template <typename F>
void for_items(int64_t num_items, int64_t macs, const F& fn) {
  if (num_items == 0) return;
  if (macs < kParallelMinMacs || at::get_num_threads() == 1) {
    fn(int64_t(0), num_items);
    return;
  }
  at::parallel_for(0, num_items, 1, fn);
}

// The active experts (gate != 0) of each sequence of the plan: seq_experts[s * E + q], q < nexp[s].
template <typename A>
struct ActiveExperts {
  std::vector<int64_t> experts, nexp;

  ActiveExperts(const LoraPlan& plan, const A* gates, int64_t S, int64_t E) : experts(S * E), nexp(S, 0) {
    for (const auto& grp : plan.groups)
      for (int64_t s : grp.seqs)
        for (int64_t e = 0; e < E; ++e)
          if (gates[s * E + e] != A(0)) experts[s * E + nexp[s]++] = e;
  }
};

// The tokens of one adapter whose sequences share one set of active experts.
// Prefill batches have one sequence per adapter, so one list per adapter.
struct TokenList {
  int64_t adapter;
  std::vector<int64_t> experts;  // the active experts, ascending
  std::vector<int64_t> tokens;   // in batch order
  std::vector<int64_t> seqs;     // the sequence of each token
};

template <typename A>
std::vector<TokenList> token_lists(const LoraPlan& plan, const ActiveExperts<A>& act, int64_t E) {
  std::vector<TokenList> lists;
  for (const auto& grp : plan.groups) {
    const size_t first = lists.size();  // this adapter's lists: few (one per distinct expert set)
    for (int64_t s : grp.seqs) {
      const int64_t* set = act.experts.data() + s * E;
      const int64_t n = act.nexp[s];
      size_t li = first;
      while (li < lists.size() &&
             !(static_cast<int64_t>(lists[li].experts.size()) == n && std::equal(set, set + n, lists[li].experts.begin())))
        ++li;
      if (li == lists.size()) lists.push_back(TokenList{grp.adapter, std::vector<int64_t>(set, set + n), {}, {}});
      TokenList& l = lists[li];
      for (int64_t t = plan.seq_begin(s); t < plan.seq_end(s); ++t) {
        l.tokens.push_back(t);
        l.seqs.push_back(s);
      }
    }
  }
  return lists;
}

struct ShrinkItem {
  int64_t list;    // index into the token lists
  int64_t i0, i1;  // tokens [i0, i1) of the list
  int64_t q;       // dot items: the expert (index into the list's experts); packed items: all
  int64_t r0, r1;  // dot items: rank rows [r0, r1)
  bool packed;
};

// Raw pointers and sizes of one call's LoRA operands (S: the kernels' storage type).
template <typename S, typename A>
struct LoraOperands {
  const S* x;          // [T, K]
  const S* a;          // [P, E, R, K]
  const S* b;          // [P, E, N, R]
  const A* gates;      // [S, E]
  A* u;                // [T, E, Rpad]
  S* y;                // [T, N]
  int64_t T, K, N, E, R, Rpad;
};

// U[t, e, :] = gates[s, e] * A[p, e] @ x[t] for every token and active expert; pad lanes 0.
template <typename S, typename A>
void lora_shrink(const LoraOperands<S, A>& op, const std::vector<TokenList>& lists, const LoraKernels<S, A>& kern) {
  RECORD_FUNCTION("milora::lora_shrink_cpu", std::vector<c10::IValue>());
  const int64_t E = op.E, R = op.R, K = op.K, Rpad = op.Rpad;
  const int64_t threads = at::get_num_threads();
  const int64_t packed_min_tokens = kern.shrink_packed_min_tokens;  // the level's choice (cpu/isa.h)
  std::vector<ShrinkItem> items;
  int64_t macs = 0;
  for (int64_t l = 0; l < static_cast<int64_t>(lists.size()); ++l) {
    const int64_t n = static_cast<int64_t>(lists[l].tokens.size());
    const int64_t ne = static_cast<int64_t>(lists[l].experts.size());
    macs += n * ne * R * K;
    if (n >= packed_min_tokens) {
      // Enough items to keep every thread busy, few enough to pack each panel rarely.
      const int64_t chunk = std::clamp(round_up(ceil_div(n, threads), kPackedRows), kPackedMinChunk, kPackedMaxChunk);
      for (int64_t i0 = 0; i0 < n; i0 += chunk) items.push_back(ShrinkItem{l, i0, std::min(i0 + chunk, n), 0, 0, Rpad, true});
      continue;
    }
    for (int64_t q = 0; q < ne; ++q)
      for (int64_t i0 = 0; i0 < n; i0 += kDotTokens)
        for (int64_t r0 = 0; r0 < R; r0 += kDotRows)
          items.push_back(ShrinkItem{l, i0, std::min(i0 + kDotTokens, n), q, r0, std::min(r0 + kDotRows, R), false});
  }
  const int64_t num_items = static_cast<int64_t>(items.size());
  if (num_items == 0) return;
  // Fewer items than threads (one adapter, few tokens): split K as well, each slice into its
  // own partial U, summed when the rows are finalised.
  int64_t slices = 1;
  if (num_items < threads && macs >= kParallelMinMacs)
    slices = std::max<int64_t>(1, std::min(ceil_div(threads, num_items), K / kMinSliceK));
  const int64_t slice_k = round_up(ceil_div(K, slices), 64);
  slices = ceil_div(K, slice_k);
  at::Tensor partial;
  A* partial_base = op.u;
  const int64_t slice_stride = op.T * E * Rpad;
  if (slices > 1) {
    partial = at::empty({slices * slice_stride}, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
    partial_base = partial.data_ptr<A>();
  }
  for_items(num_items * slices, macs, [&](int64_t begin, int64_t end) {
    // The packed items' A panels, kept per pool thread as the expand's scratch is: a fresh
    // zero-filled vector per call (256 KB at K = 4096, R = 16) cost 14 us of the ~60 us shrink
    // of a two-adapter 64-token prefill (in-process A/B, caches flushed).
    thread_local std::vector<A> kept;
    std::vector<A> own;
    for (int64_t w = begin; w < end; ++w) {
      const ShrinkItem& it = items[w % num_items];
      const int64_t slice = w / num_items;
      const TokenList& l = lists[it.list];
      ShrinkJob<S, A> job{};
      job.x = op.x;
      job.a = op.a + l.adapter * E * R * K;
      job.out = partial_base + slice * slice_stride;
      job.tokens = l.tokens.data();
      job.K = K;
      job.E = E;
      job.R = R;
      job.Rpad = Rpad;
      job.i0 = it.i0;
      job.i1 = it.i1;
      job.r0 = it.r0;
      job.r1 = it.r1;
      job.k0 = slice * slice_k;
      job.k1 = std::min(K, job.k0 + slice_k);
      if (it.packed) {
        job.experts = l.experts.data();
        job.ne = static_cast<int64_t>(l.experts.size());
        job.scratch = kept_or_own(kept, own, static_cast<size_t>(job.ne * (job.k1 - job.k0) * Rpad));
        kern.shrink_packed(job);
      } else {
        job.experts = l.experts.data() + it.q;
        job.ne = 1;
        kern.shrink_dot(job);
      }
    }
  });
  // Finalise: gate (and sum the K slices); pad lanes 0.
  std::vector<std::pair<int64_t, int64_t>> rows;  // (list, token index in the list)
  for (int64_t l = 0; l < static_cast<int64_t>(lists.size()); ++l)
    for (int64_t i = 0; i < static_cast<int64_t>(lists[l].tokens.size()); ++i) rows.emplace_back(l, i);
  for_items(static_cast<int64_t>(rows.size()), static_cast<int64_t>(rows.size()) * E * Rpad * slices, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const TokenList& l = lists[rows[w].first];
      const int64_t t = l.tokens[rows[w].second], s = l.seqs[rows[w].second];
      for (int64_t e : l.experts) {
        const A g = op.gates[s * E + e];
        A* u = op.u + (t * E + e) * Rpad;
        const A* p = partial_base + (t * E + e) * Rpad;
        for (int64_t r = 0; r < R; ++r) {
          A sum = p[r];
          for (int64_t sl = 1; sl < slices; ++sl) sum += p[sl * slice_stride + r];
          u[r] = g * sum;
        }
        for (int64_t r = R; r < Rpad; ++r) u[r] = A(0);
      }
    }
  });
}

// Column chunks of the expand: 256, or narrower when there are fewer chunks than threads.
int64_t expand_chunk_cols(int64_t units, int64_t N) {
  const int64_t threads = at::get_num_threads();
  if (units * ceil_div(N, kExpandCols) >= threads) return kExpandCols;
  return std::max(kMinExpandCols, round_up(ceil_div(N * units, threads), kMinExpandCols));
}

// The fields of an expand work item every kind shares: adapter slot p's B, columns [n0, n1).
template <typename S, typename A>
ExpandJob<S, A> expand_job(const LoraOperands<S, A>& op, int64_t adapter, int64_t n0, int64_t n1) {
  ExpandJob<S, A> job{};
  job.b = op.b + adapter * op.E * op.N * op.R;
  job.u = op.u;
  job.y = op.y;
  job.N = op.N;
  job.E = op.E;
  job.R = op.R;
  job.Rpad = op.Rpad;
  job.n0 = n0;
  job.n1 = n1;
  return job;
}

// The expand by token list (every dtype but float64): one work item per (list, column chunk).
template <typename S, typename A>
void lora_expand_lists(const LoraOperands<S, A>& op, const std::vector<TokenList>& lists, const LoraKernels<S, A>& kern) {
  RECORD_FUNCTION("milora::lora_expand_cpu", std::vector<c10::IValue>());
  const int64_t N = op.N, num_lists = static_cast<int64_t>(lists.size());
  const int64_t cols = expand_chunk_cols(num_lists, N);
  // Long lists where the level wants it (kern.expand_wide_min_tokens): one chunk per thread.
  const int64_t wide_cols = std::max(cols, round_up(ceil_div(N, at::get_num_threads()), kMinExpandCols));
  struct Item {
    int64_t list, n0, n1;
  };
  std::vector<Item> items;
  int64_t macs = 0;
  for (int64_t l = 0; l < num_lists; ++l) {
    const int64_t ntokens = static_cast<int64_t>(lists[l].tokens.size());
    macs += ntokens * static_cast<int64_t>(lists[l].experts.size()) * N * op.R;
    const int64_t step = ntokens >= kern.expand_wide_min_tokens ? wide_cols : cols;
    for (int64_t n0 = 0; n0 < N; n0 += step) items.push_back(Item{l, n0, std::min(N, n0 + step)});
  }
  for_items(static_cast<int64_t>(items.size()), macs, [&](int64_t begin, int64_t end) {
    thread_local std::vector<A> scratch;  // kept per pool thread: no allocation per decode step
    for (int64_t w = begin; w < end; ++w) {
      const TokenList& l = lists[items[w].list];
      ExpandJob<S, A> job = expand_job(op, l.adapter, items[w].n0, items[w].n1);
      job.tokens = l.tokens.data();
      job.ntokens = static_cast<int64_t>(l.tokens.size());
      job.experts = l.experts.data();
      job.nexperts = static_cast<int64_t>(l.experts.size());
      std::vector<A> own;
      job.scratch = kept_or_own(scratch, own, static_cast<size_t>(expand_list_scratch(job.nexperts, op.R, job.n1 - job.n0)));
      kern.expand_list(job);
    }
  });
}

// y[t, :] += sum over the active experts e of t's sequence of B[p, e] @ U[t, e, :], by adapter
// (float64).
template <typename S, typename A>
void lora_expand(const LoraOperands<S, A>& op, const LoraPlan& plan, const ActiveExperts<A>& act,
                 const LoraKernels<S, A>& kern) {
  RECORD_FUNCTION("milora::lora_expand_cpu", std::vector<c10::IValue>());
  const int64_t E = op.E, N = op.N, R = op.R;
  const int64_t groups = static_cast<int64_t>(plan.groups.size());
  const int64_t cols = expand_chunk_cols(groups, N);
  struct Item {
    int64_t group, n0, n1;
    bool packed;
  };
  std::vector<Item> items;
  std::vector<char> used(groups * E, 0);  // [group, E]: whether some sequence of the group uses e
  int64_t macs = 0;
  for (int64_t g = 0; g < groups; ++g) {
    int64_t tokens = 0;
    for (int64_t s : plan.groups[g].seqs) {
      tokens += plan.seq_end(s) - plan.seq_begin(s);
      for (int64_t q = 0; q < act.nexp[s]; ++q) used[g * E + act.experts[s * E + q]] = 1;
    }
    macs += tokens * N * R;
    const bool packed = tokens >= kPackedMinTokens;
    for (int64_t n0 = 0; n0 < N; n0 += cols) items.push_back(Item{g, n0, std::min(n0 + cols, N), packed});
  }
  for_items(static_cast<int64_t>(items.size()), macs, [&](int64_t begin, int64_t end) {
    thread_local std::vector<A> kept;
    std::vector<A> own;
    for (int64_t w = begin; w < end; ++w) {
      const Item& it = items[w];
      const AdapterGroup& grp = plan.groups[it.group];
      ExpandJob<S, A> job = expand_job(op, grp.adapter, it.n0, it.n1);
      job.seqs = grp.seqs.data();
      job.nseqs = static_cast<int64_t>(grp.seqs.size());
      job.offsets = plan.offsets.data();
      job.seq_experts = act.experts.data();
      job.seq_nexp = act.nexp.data();
      job.used = used.data() + it.group * E;
      if (it.packed) {
        job.scratch = kept_or_own(kept, own, static_cast<size_t>(std::min<int64_t>(E, 64) * R * round_up(it.n1 - it.n0, 32)));
        kern.expand_packed(job);
      } else {
        kern.expand_dot(job);
      }
    }
  });
}

// Runs of batch-adjacent sequences of one adapter and one set of active experts with at least
// gemm_min_tokens tokens (prefill; a chunk of requests sharing an adapter) take their LoRA term
// through ATen's GEMM (oneDNN: AMX tiles or AVX-512 blocking, the same code as the base
// product) instead of the hand-written tiles: at these sizes the shrink and expand are thin
// GEMMs whose cost is one more pass over x and y, which a blocked GEMM does at memory speed.
struct GemmRun {
  int64_t s0, s1;   // sequences [s0, s1): rows [offsets[s0], offsets[s1]) of x and y
  int64_t adapter;
};

bool same_active_experts(const float* gates, int64_t a, int64_t b, int64_t E) {
  for (int64_t e = 0; e < E; ++e)
    if ((gates[a * E + e] != 0.0f) != (gates[b * E + e] != 0.0f)) return false;
  return true;
}

// Moves the runs out of the plan (groups left empty are dropped); gates: [S, E] float32.
std::vector<GemmRun> take_gemm_runs(LoraPlan& plan, const float* gates, int64_t E, int64_t min_tokens) {
  std::vector<GemmRun> runs;
  for (const auto& grp : plan.groups) {
    size_t i = 0;
    while (i < grp.seqs.size()) {
      size_t j = i + 1;
      while (j < grp.seqs.size() && grp.seqs[j] == grp.seqs[j - 1] + 1 && same_active_experts(gates, grp.seqs[i], grp.seqs[j], E))
        ++j;
      if (plan.seq_begin(grp.seqs[j - 1] + 1) - plan.seq_begin(grp.seqs[i]) >= min_tokens)
        runs.push_back(GemmRun{grp.seqs[i], grp.seqs[j - 1] + 1, grp.adapter});
      i = j;
    }
  }
  if (runs.empty()) return runs;  // decode batches: the plan stays as it is (no copies)
  std::vector<char> taken(plan.offsets.size(), 0);
  for (const auto& r : runs)
    for (int64_t s = r.s0; s < r.s1; ++s) taken[s] = 1;
  std::vector<AdapterGroup> kept;
  for (auto& grp : plan.groups) {
    AdapterGroup rest{grp.adapter, {}};
    for (int64_t s : grp.seqs)
      if (!taken[s]) rest.seqs.push_back(s);
    if (!rest.seqs.empty()) kept.push_back(std::move(rest));
  }
  plan.groups = std::move(kept);
  return runs;
}

// y[t] += sum_e gates[s, e] * B[p, e] @ (A[p, e] @ x[t]) for the tokens t of a run, with ATen
// GEMMs over the run's own rows and its active experts only (tenant isolation: no other
// adapter, and no expert with gate 0, is read). The rank-R intermediate is rounded to x's dtype
// between the two products, as PyTorch does for the same computation in that dtype.
void add_gated_lora_gemm(
    at::Tensor& y,             // [T, N]
    const at::Tensor& x,       // [T, K]
    const at::Tensor& lora_a,  // [P, E, R, K]
    const at::Tensor& lora_b,  // [P, E, N, R]
    const float* gates,        // [S, E]
    const LoraPlan& plan,
    const GemmRun& run) {
  RECORD_FUNCTION("milora::lora_gemm_cpu", std::vector<c10::IValue>());
  const int64_t E = lora_a.size(1), R = lora_a.size(2), K = lora_a.size(3), N = lora_b.size(2);
  const int64_t t0 = plan.seq_begin(run.s0), len = plan.seq_begin(run.s1) - t0;
  std::vector<int64_t> experts;
  for (int64_t e = 0; e < E; ++e)
    if (gates[run.s0 * E + e] != 0.0f) experts.push_back(e);
  const int64_t k = static_cast<int64_t>(experts.size());
  const at::Tensor xs = x.narrow(0, t0, len);  // [len, K]
  at::Tensor ys = y.narrow(0, t0, len);        // [len, N], whole rows: contiguous
  const at::Tensor a_p = lora_a[run.adapter];  // [E, R, K]
  const at::Tensor b_p = lora_b[run.adapter];  // [E, N, R]
  at::Tensor a_sel, b_sel;                      // [k R, K], [N, k R]
  if (k == 1) {
    a_sel = a_p[experts[0]];
    b_sel = b_p[experts[0]];
  } else {
    const at::Tensor idx = at::tensor(experts, at::TensorOptions().dtype(at::kLong));
    a_sel = a_p.index_select(0, idx).reshape({k * R, K});
    b_sel = b_p.index_select(0, idx).permute({1, 0, 2}).reshape({N, k * R});
  }
  at::Tensor u = at::mm(xs, a_sel.t());  // [len, k R], contiguous
  // Each row's k rank blocks times its sequence's gates, rounded to u's dtype as an in-place
  // PyTorch multiply would. A plain loop: a broadcast mixed-dtype mul_ costs more (20-100 us
  // at 64-1024 rows) than the rest of this term's bookkeeping.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "lora_gemm_gates", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* up = u.data_ptr<scalar_t>();
    for (int64_t s = run.s0; s < run.s1; ++s)
      for (int64_t t = plan.seq_begin(s); t < plan.seq_end(s); ++t)
        for (int64_t q = 0; q < k; ++q) {
          const acc_t gv = gates[s * E + experts[q]];
          scalar_t* row = up + ((t - t0) * k + q) * R;
          for (int64_t r = 0; r < R; ++r) row[r] = static_cast<scalar_t>(static_cast<acc_t>(row[r]) * gv);
        }
  });
  ys.addmm_(u, b_sel.t());
}

// y = x @ W^T (+ bias) [T, N] on the level's own bfloat16 product where it has one and the
// call suits it (cpu/base_amx.h: bfloat16, K % 32 == 0, N % 16 == 0, few tokens), else ATen's.
at::Tensor base_product(const at::Tensor& x2, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const GatedLoraShape& sh) {
  const BaseKernels& bk = active_kernels().base_bf16;
  const bool own = bk.product != nullptr && x2.scalar_type() == at::kBFloat16 && sh.T > 0 && sh.T <= bk.max_tokens &&
                   sh.K % 32 == 0 && sh.N % 16 == 0 && weight.is_contiguous() && (!bias.has_value() || bias->is_contiguous());
  if (!own) return at::linear(x2, weight, bias);
  RECORD_FUNCTION("milora::base_tiles_cpu", std::vector<c10::IValue>());
  const int64_t blocks = ceil_div(sh.T, 16);
  // The packed x, kept per calling thread (1 MB at 128 tokens, K = 4096): no allocation per step.
  thread_local std::vector<uint32_t> kept;
  std::vector<uint32_t> own_xt;
  at::Tensor y = at::empty({sh.T, sh.N}, x2.options());  // [T, N]
  BaseJob job{};
  job.x = reinterpret_cast<const bf16_t*>(x2.data_ptr<at::BFloat16>());
  job.w = reinterpret_cast<const bf16_t*>(weight.data_ptr<at::BFloat16>());
  job.bias = bias.has_value() ? reinterpret_cast<const bf16_t*>(bias->data_ptr<at::BFloat16>()) : nullptr;
  job.y = reinterpret_cast<bf16_t*>(y.data_ptr<at::BFloat16>());
  job.xt = kept_or_own(kept, own_xt, static_cast<size_t>(blocks * 16 * sh.K / 2));
  job.T = sh.T;
  job.K = sh.K;
  job.N = sh.N;
  for_items(blocks, blocks > 1 ? blocks * 16 * sh.K : 0, [&](int64_t b0, int64_t b1) {  // one block: this thread
    BaseJob part = job;
    part.b0 = b0;
    part.b1 = b1;
    bk.pack_x(part);
  });
  for_items(sh.N / 16, sh.T * sh.N * sh.K, [&](int64_t b0, int64_t b1) {
    BaseJob part = job;
    part.b0 = b0;
    part.b1 = b1;
    bk.product(part);
  });
  return y;
}

template <typename scalar_t>
struct KernelStorage {
  using type = scalar_t;
};
template <>
struct KernelStorage<c10::BFloat16> {
  using type = bf16_t;
};
template <>
struct KernelStorage<c10::Half> {
  using type = f16_t;
};

template <typename S, typename A>
const LoraKernels<S, A>& kernels_of(const KernelTable& t) {
  if constexpr (std::is_same_v<S, float>) {
    return t.f32;
  } else if constexpr (std::is_same_v<S, double>) {
    return t.f64;
  } else if constexpr (std::is_same_v<S, bf16_t>) {
    return t.bf16;
  } else {
    return t.f16;
  }
}

template <typename scalar_t>
void add_gated_lora(
    at::Tensor& y,             // [T, N] contiguous, x's dtype
    const at::Tensor& x,       // [T, K] contiguous
    const at::Tensor& lora_a,  // [P, E, R, K] contiguous
    const at::Tensor& lora_b,  // [P, E, N, R] contiguous
    const at::Tensor& gates,   // [S, E] contiguous, accumulation dtype
    LoraPlan& plan,
    const GatedLoraShape& sh) {
  using S = typename KernelStorage<scalar_t>::type;
  using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  static_assert(sizeof(S) == sizeof(scalar_t));
  const KernelTable& table = active_kernels();
  const LoraKernels<S, A>& kern = kernels_of<S, A>(table);
  // Long runs first, through ATen's GEMM where the level says so; they leave the plan. float64
  // stays on the tiles: it is the reference dtype, whose LoRA term keeps one rounding.
  if constexpr (!std::is_same_v<scalar_t, double>) {
    const float* g = gates.data_ptr<float>();
    for (const GemmRun& run : take_gemm_runs(plan, g, sh.E, kern.gemm_min_tokens)) add_gated_lora_gemm(y, x, lora_a, lora_b, g, plan, run);
    if (plan.groups.empty()) return;
  }
  const int64_t Rpad = round_up(sh.R, std::is_same_v<A, double> ? table.lanes64 : table.lanes32);
  // U scratch [T, E, Rpad]: a buffer kept per calling thread for decode-sized calls (no
  // allocation per step); large prefills get their own, freed on return.
  const size_t u_size = static_cast<size_t>(sh.T * sh.E * Rpad);
  thread_local std::vector<A> kept;
  std::vector<A> own;
  A* const u_buffer = kept_or_own(kept, own, u_size);
  const A* g = gates.data_ptr<A>();
  const LoraOperands<S, A> op{
      reinterpret_cast<const S*>(x.data_ptr<scalar_t>()), reinterpret_cast<const S*>(lora_a.data_ptr<scalar_t>()),
      reinterpret_cast<const S*>(lora_b.data_ptr<scalar_t>()), g, u_buffer,
      reinterpret_cast<S*>(y.data_ptr<scalar_t>()), sh.T, sh.K, sh.N, sh.E, sh.R, Rpad};
  const ActiveExperts<A> act(plan, g, sh.S, sh.E);
  const std::vector<TokenList> lists = token_lists(plan, act, sh.E);
  lora_shrink(op, lists, kern);
  if (kern.expand_list != nullptr) {
    lora_expand_lists(op, lists, kern);
  } else {
    lora_expand(op, plan, act, kern);
  }
}

at::Tensor gated_lora_linear_cpu(
    const at::Tensor& x,
    const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_a,
    const at::Tensor& lora_b,
    const at::Tensor& seq_offsets,
    const at::Tensor& adapter_ids,
    const at::Tensor& gates) {
  constexpr const char* op = "gated_lora_linear";
  const GatedLoraShape sh =
      check_gated_lora_args(op, x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates);
  check_index_values(op, seq_offsets, adapter_ids, sh.T, sh.P);

  // Per-call work beyond the base GEMM is kept to what a decode step needs: views and dtype
  // conversions only when the inputs are not already in the kernels' layout (the module layer
  // passes them so), no ATen op on the index tensors (read in place by the plan).
  const bool flat = x.dim() == 2 && x.is_contiguous();
  const at::Tensor x2 = flat ? x : x.reshape({sh.T, sh.K}).contiguous();  // [T, K]
  at::Tensor y = base_product(x2, weight, bias, sh);                       // [T, N]
  if (!y.is_contiguous()) y = y.contiguous();
  const at::ScalarType acc = accumulate_type(x.scalar_type());
  const at::Tensor gates_acc = gates.scalar_type() == acc && gates.is_contiguous() ? gates : gates.to(acc).contiguous();  // [S, E]
  LoraPlan plan = plan_by_adapter(seq_offsets, adapter_ids, &gates_acc);
  if (!plan.groups.empty()) {
    const c10::MaybeOwned<at::Tensor> a = lora_a.expect_contiguous();  // [P, E, R, K]
    const c10::MaybeOwned<at::Tensor> b = lora_b.expect_contiguous();  // [P, E, N, R]
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_lora_linear_cpu", [&] {
      add_gated_lora<scalar_t>(y, x2, *a, *b, gates_acc, plan, sh);
    });
  }
  if (flat) return y;
  auto out_shape = x.sizes().vec();
  out_shape.back() = sh.N;
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(milora_ext, CPU, m) {
  m.impl("gated_lora_linear", &gated_lora_linear_cpu);
}

}  // namespace milora::cpu
