// CPU implementation of milora_ext::gated_lora_linear.
//
//   y = x @ weight^T + bias                                (ATen: MKL / oneDNN, in x's dtype)
//   y[t] += sum_e gates[s,e] * B[p,e] @ (A[p,e] @ x[t])    (hand-written here, float32 accumulation)
//
// The LoRA term runs in two parallel phases over work grouped by adapter slot (lora_plan.h),
// so each active adapter's A and B are streamed once per call however its sequences are
// spread through the batch:
//   shrink: U[t, e, :] = gates[s,e] * A[p,e] @ x[t] for each token whose sequence has
//           gates[s,e] != 0 (U is a float32 scratch [T, E, Rpad]);
//   expand: y[t, :] += sum_e B[p,e] @ U[t, e, :] over the experts active for t's sequence,
//           in column chunks of 256 so a chunk of B stays in cache for all the adapter's tokens.
// Adapters with at least kPackedMinTokens tokens go through packed GEMM-like tiles (A^T / B^T
// packed to float32 panels once per work item); the others (decode: one token per adapter)
// through dot tiles that read A and B straight from memory, which bounds them (lora_tiles.h).
// Sequences with adapter -1 and experts with gate 0 are never visited.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <map>
#include <vector>

#include "checks.h"
#include "cpu/lora_tiles.h"
#include "cpu/vec.h"
#include "lora_plan.h"

namespace milora::cpu {
namespace {

constexpr int64_t kPackedMinTokens = 16;  // token lists (and adapters, in the expand) this long use packed tiles
constexpr int64_t kPackedMinChunk = 48;   // tokens per packed shrink work item: at least...
constexpr int64_t kPackedMaxChunk = 1024; // ...and at most
constexpr int64_t kDotTokens = 16;        // tokens per dot shrink work item
constexpr int64_t kDotRows = 8;           // rank rows per dot shrink work item
constexpr int64_t kExpandCols = 256;      // output columns per expand work item

constexpr int64_t kParallelMinMacs = 1 << 16;  // below this a phase runs on the calling thread

int64_t round_up(int64_t v, int64_t m) {
  return (v + m - 1) / m * m;
}

// Runs fn(begin, end) over [0, num_items), across threads when the phase does enough
// multiply-adds to pay for waking them (a tiny problem would otherwise wait on the thread
// pool, and on a loaded machine that wait dominates).
template <typename F>
void for_items(int64_t num_items, int64_t macs, const F& fn) {
  if (num_items == 0) return;
  if (macs < kParallelMinMacs) {
    fn(int64_t(0), num_items);
    return;
  }
  at::parallel_for(0, num_items, 1, fn);
}

// Raw pointers and sizes of one call's LoRA operands.
template <typename scalar_t, typename acc_t>
struct LoraOperands {
  const scalar_t* x;   // [T, K]
  const scalar_t* a;   // [P, E, R, K]
  const scalar_t* b;   // [P, E, N, R]
  const acc_t* gates;  // [S, E]
  acc_t* u;            // [T, E, Rpad] scratch: gated shrink results, pad lanes 0
  scalar_t* y;         // [T, N]
  int64_t K, N, E, R, Rpad;

  acc_t gate(int64_t s, int64_t e) const { return gates[s * E + e]; }
  acc_t* u_row(int64_t t, int64_t e) const { return u + (t * E + e) * Rpad; }
  const scalar_t* a_rows(int64_t p, int64_t e) const { return a + (p * E + e) * R * K; }
  const scalar_t* b_rows(int64_t p, int64_t e) const { return b + (p * E + e) * N * R; }
};

// The tokens of one adapter whose sequences share one set of active experts (gate != 0).
// Prefill batches have one sequence per adapter, so one list per adapter.
struct TokenList {
  int64_t adapter;
  std::vector<int64_t> experts;  // the active experts, ascending
  std::vector<int64_t> tokens;   // in batch order
  std::vector<int64_t> seqs;     // the sequence of each token
};

struct ShrinkItem {
  int64_t list;    // index into the token lists
  int64_t i0, i1;  // tokens [i0, i1) of the list
  int64_t q;       // dot items: the expert (index into the list's experts); packed items: all
  int64_t r0, r1;  // dot items: rank rows [r0, r1)
  bool packed;
};

std::vector<TokenList> token_lists(const LoraPlan& plan, int64_t E, const std::function<bool(int64_t, int64_t)>& active) {
  std::vector<TokenList> lists;
  for (const auto& grp : plan.groups) {
    std::map<std::vector<int64_t>, size_t> by_set;
    for (int64_t s : grp.seqs) {
      std::vector<int64_t> experts;
      for (int64_t e = 0; e < E; ++e)
        if (active(s, e)) experts.push_back(e);
      auto [it, fresh] = by_set.emplace(experts, lists.size());
      if (fresh) lists.push_back(TokenList{grp.adapter, std::move(experts), {}, {}});
      TokenList& l = lists[it->second];
      for (int64_t t = plan.seq_begin(s); t < plan.seq_end(s); ++t) {
        l.tokens.push_back(t);
        l.seqs.push_back(s);
      }
    }
  }
  return lists;
}

// U[t, e, :] = gates[s, e] * A[p, e] @ x[t] for every token and active expert; pad lanes 0.
// Packed lists (many tokens) pack A^T of all their experts once per item and read each x
// row once for all of them; the others run dot tiles per (expert, 8 rank rows).
template <typename scalar_t, typename acc_t>
void lora_shrink(const LoraOperands<scalar_t, acc_t>& op, const LoraPlan& plan) {
  RECORD_FUNCTION("milora::lora_shrink_cpu", std::vector<c10::IValue>());
  using V = Vec<acc_t>;
  const int64_t E = op.E, R = op.R, K = op.K, Rpad = op.Rpad;
  const auto lists = token_lists(plan, E, [&](int64_t s, int64_t e) { return op.gate(s, e) != acc_t(0); });
  const int64_t threads = at::get_num_threads();
  std::vector<ShrinkItem> items;
  int64_t macs = 0;
  for (int64_t l = 0; l < static_cast<int64_t>(lists.size()); ++l) {
    const int64_t n = static_cast<int64_t>(lists[l].tokens.size());
    const int64_t ne = static_cast<int64_t>(lists[l].experts.size());
    macs += n * ne * R * K;
    if (n >= kPackedMinTokens) {
      // Enough items to keep every thread busy, few enough to pack each panel rarely.
      const int64_t chunk = std::clamp(round_up((n + threads - 1) / threads, kPackedRows), kPackedMinChunk, kPackedMaxChunk);
      for (int64_t i0 = 0; i0 < n; i0 += chunk) items.push_back(ShrinkItem{l, i0, std::min(i0 + chunk, n), 0, 0, Rpad, true});
      continue;
    }
    for (int64_t q = 0; q < ne; ++q)
      for (int64_t i0 = 0; i0 < n; i0 += kDotTokens)
        for (int64_t r0 = 0; r0 < R; r0 += kDotRows)
          items.push_back(ShrinkItem{l, i0, std::min(i0 + kDotTokens, n), q, r0, std::min(r0 + kDotRows, R), false});
  }
  for_items(static_cast<int64_t>(items.size()), macs, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> panels;  // [experts][K][Rpad]: A^T of each active expert, zero beyond R
    for (int64_t w = begin; w < end; ++w) {
      const ShrinkItem& it = items[w];
      const TokenList& l = lists[it.list];
      if (it.packed) {
        const int64_t ne = static_cast<int64_t>(l.experts.size());
        panels.assign(ne * K * Rpad, acc_t(0));
        for (int64_t q = 0; q < ne; ++q) {
          const scalar_t* a_rows = op.a_rows(l.adapter, l.experts[q]);
          acc_t* panel = panels.data() + q * K * Rpad;
          for (int64_t k = 0; k < K; ++k)
            for (int64_t r = 0; r < R; ++r) panel[k * Rpad + r] = static_cast<acc_t>(a_rows[r * K + k]);
        }
        for (int64_t i = it.i0; i < it.i1; i += kPackedRows) {
          const int mr = static_cast<int>(std::min<int64_t>(kPackedRows, it.i1 - i));
          const scalar_t* xr[kPackedRows];
          acc_t* out[kPackedRows];
          acc_t gate[kPackedRows];
          for (int q = 0; q < mr; ++q) xr[q] = op.x + l.tokens[i + q] * K;
          for (int64_t q = 0; q < ne; ++q) {
            const int64_t e = l.experts[q];
            for (int j = 0; j < mr; ++j) gate[j] = op.gate(l.seqs[i + j], e);
            for (int64_t r0 = 0; r0 < Rpad; r0 += 2 * V::size) {
              for (int j = 0; j < mr; ++j) out[j] = op.u_row(l.tokens[i + j], e) + r0;
              const acc_t* panel = panels.data() + q * K * Rpad + r0;
              if (Rpad - r0 >= 2 * V::size) {
                packed_shrink_any<2>(mr, xr, gate, panel, Rpad, K, out);
              } else {
                packed_shrink_any<1>(mr, xr, gate, panel, Rpad, K, out);
              }
            }
          }
        }
        continue;
      }
      const int64_t e = l.experts[it.q];
      const scalar_t* a_rows = op.a_rows(l.adapter, e);
      acc_t dots[4 * 2];
      for (int64_t i = it.i0; i < it.i1; i += 4) {
        const int tm = static_cast<int>(std::min<int64_t>(4, it.i1 - i));
        const scalar_t* xr[4];
        for (int q = 0; q < tm; ++q) xr[q] = op.x + l.tokens[i + q] * K;
        for (int64_t r = it.r0; r < it.r1; r += 2) {
          const int tj = static_cast<int>(std::min<int64_t>(2, it.r1 - r));
          const scalar_t* ar[2] = {a_rows + r * K, a_rows + (r + tj - 1) * K};
          dot_tile_any<scalar_t, acc_t>(tm, tj, xr, ar, K, dots, 2);
          for (int q = 0; q < tm; ++q)
            for (int j = 0; j < tj; ++j) op.u_row(l.tokens[i + q], e)[r + j] = op.gate(l.seqs[i + q], e) * dots[q * 2 + j];
        }
        if (it.r1 == R)
          for (int q = 0; q < tm; ++q)
            for (int64_t r = R; r < Rpad; ++r) op.u_row(l.tokens[i + q], e)[r] = acc_t(0);
      }
    }
  });
}

struct ExpandItem {
  const AdapterGroup* group;
  int64_t n0, n1;  // output columns [n0, n1)
  bool packed;
};

// y[t, n0:n1] += sum over the active experts e of t's sequence of B[p, e, n0:n1, :] @ U[t, e, :].
template <typename scalar_t, typename acc_t>
void expand_packed(const LoraOperands<scalar_t, acc_t>& op, const LoraPlan& plan, const ExpandItem& it,
                   std::vector<acc_t>& panels, std::vector<int64_t>& experts) {
  using V = Vec<acc_t>;
  const int64_t E = op.E, R = op.R, Rpad = op.Rpad, N = op.N;
  const int64_t cols = it.n1 - it.n0;
  const int64_t ld = round_up(cols, V::size);
  const int64_t p = it.group->adapter;
  // Pack B^T of every expert some sequence of the group uses: panel e is [R][ld], zero padded.
  std::vector<char> used(E, 0);
  for (int64_t s : it.group->seqs)
    for (int64_t e = 0; e < E; ++e) used[e] |= op.gate(s, e) != acc_t(0);
  panels.assign(E * R * ld, acc_t(0));
  std::vector<const acc_t*> panel_of(E, nullptr), at_col(E, nullptr);  // panel of e, at this tile's column
  for (int64_t e = 0; e < E; ++e) {
    if (!used[e]) continue;
    acc_t* panel = panels.data() + e * R * ld;
    const scalar_t* b_rows = op.b_rows(p, e) + it.n0 * R;
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = 0; r < R; ++r) panel[r * ld + c] = static_cast<acc_t>(b_rows[c * R + r]);
    panel_of[e] = panel;
  }
  for (int64_t s : it.group->seqs) {
    int64_t na = 0;
    for (int64_t e = 0; e < E; ++e)
      if (op.gate(s, e) != acc_t(0)) experts[na++] = e;
    for (int64_t t = plan.seq_begin(s); t < plan.seq_end(s); t += kPackedRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kPackedRows, plan.seq_end(s) - t));
      const acc_t* u_rows[kPackedRows];
      scalar_t* y_rows[kPackedRows];
      for (int q = 0; q < mr; ++q) u_rows[q] = op.u_row(t + q, 0);
      for (int64_t c = 0; c < cols; c += 2 * V::size) {
        const int n_valid = static_cast<int>(std::min<int64_t>(2 * V::size, cols - c));
        for (int64_t e = 0; e < E; ++e) at_col[e] = panel_of[e] == nullptr ? nullptr : panel_of[e] + c;
        for (int q = 0; q < mr; ++q) y_rows[q] = op.y + (t + q) * N + it.n0 + c;
        if (n_valid > V::size) {
          packed_expand_any<2>(mr, u_rows, experts.data(), na, at_col.data(), ld, R, Rpad, y_rows, n_valid);
        } else {
          packed_expand_any<1>(mr, u_rows, experts.data(), na, at_col.data(), ld, R, Rpad, y_rows, n_valid);
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void expand_dot(const LoraOperands<scalar_t, acc_t>& op, const LoraPlan& plan, const ExpandItem& it,
                std::vector<int64_t>& experts) {
  using V = Vec<acc_t>;
  const int64_t E = op.E, R = op.R, Rpad = op.Rpad, N = op.N;
  for (int64_t s : it.group->seqs) {
    int64_t na = 0;
    for (int64_t e = 0; e < E; ++e)
      if (op.gate(s, e) != acc_t(0)) experts[na++] = e;
    for (int64_t t = plan.seq_begin(s); t < plan.seq_end(s); ++t) {
      scalar_t* yrow = op.y + t * N;
      for (int64_t n = it.n0; n < it.n1; n += V::size) {
        const int nv = static_cast<int>(std::min<int64_t>(V::size, it.n1 - n));
        V acc[V::size];
        for (int j = 0; j < V::size; ++j) acc[j] = V::zero();
        for (int64_t q = 0; q < na; ++q) {
          const scalar_t* b_rows = op.b_rows(it.group->adapter, experts[q]) + n * R;
          const acc_t* u = op.u_row(t, experts[q]);
          for (int64_t r = 0; r < Rpad; r += V::size) {
            const V uv = V::load(u + r);
            const int rem = static_cast<int>(std::min<int64_t>(V::size, R - r));
            if (rem == V::size) {
              for (int j = 0; j < nv; ++j) acc[j] = fma(V::load(b_rows + j * R + r), uv, acc[j]);
            } else {
              for (int j = 0; j < nv; ++j) acc[j] = fma(V::load(b_rows + j * R + r, rem), uv, acc[j]);
            }
          }
        }
        add_to_row(yrow + n, V::transpose_sum(acc), nv);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void lora_expand(const LoraOperands<scalar_t, acc_t>& op, const LoraPlan& plan) {
  RECORD_FUNCTION("milora::lora_expand_cpu", std::vector<c10::IValue>());
  std::vector<ExpandItem> items;
  int64_t macs = 0;
  for (const auto& grp : plan.groups) {
    int64_t tokens = 0;
    for (int64_t s : grp.seqs) tokens += plan.seq_end(s) - plan.seq_begin(s);
    macs += tokens * op.N * op.R;
    const bool packed = tokens >= kPackedMinTokens;
    for (int64_t n0 = 0; n0 < op.N; n0 += kExpandCols)
      items.push_back(ExpandItem{&grp, n0, std::min(n0 + kExpandCols, op.N), packed});
  }
  for_items(static_cast<int64_t>(items.size()), macs, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> panels;
    std::vector<int64_t> experts(op.E);
    for (int64_t w = begin; w < end; ++w) {
      if (items[w].packed) {
        expand_packed(op, plan, items[w], panels, experts);
      } else {
        expand_dot(op, plan, items[w], experts);
      }
    }
  });
}

template <typename scalar_t>
void add_gated_lora(
    at::Tensor& y,             // [T, N] contiguous, x's dtype
    const at::Tensor& x,       // [T, K] contiguous
    const at::Tensor& lora_a,  // [P, E, R, K] contiguous
    const at::Tensor& lora_b,  // [P, E, N, R] contiguous
    const at::Tensor& gates,   // [S, E] contiguous, accumulation dtype
    const LoraPlan& plan,
    const GatedLoraShape& sh) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t Rpad = round_up(sh.R, Vec<acc_t>::size);
  at::Tensor u = at::empty({sh.T, sh.E, Rpad}, x.options().dtype(gates.scalar_type()));
  const LoraOperands<scalar_t, acc_t> op{
      x.data_ptr<scalar_t>(), lora_a.data_ptr<scalar_t>(), lora_b.data_ptr<scalar_t>(), gates.data_ptr<acc_t>(),
      u.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), sh.K, sh.N, sh.E, sh.R, Rpad};
  lora_shrink(op, plan);
  lora_expand(op, plan);
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

  const auto x2 = x.reshape({sh.T, sh.K}).contiguous();   // [T, K]
  auto y = at::linear(x2, weight, bias).contiguous();     // [T, N]
  const auto gates_acc = gates.to(accumulate_type(x.scalar_type())).contiguous();  // [S, E]
  const LoraPlan plan = plan_by_adapter(seq_offsets, adapter_ids, &gates_acc);
  if (!plan.groups.empty()) {
    const auto a = lora_a.contiguous();  // [P, E, R, K]
    const auto b = lora_b.contiguous();  // [P, E, N, R]
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_lora_linear_cpu", [&] {
      add_gated_lora<scalar_t>(y, x2, a, b, gates_acc, plan, sh);
    });
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = sh.N;
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(milora_ext, CPU, m) {
  m.impl("gated_lora_linear", &gated_lora_linear_cpu);
}

}  // namespace milora::cpu
