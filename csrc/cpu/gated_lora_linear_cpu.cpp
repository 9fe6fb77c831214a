// CPU implementation of milora_ext::gated_lora_linear.
//
//   y = x @ weight^T + bias                      (ATen: MKL / oneDNN, in x's dtype)
//   y[t] += sum_e gates[s,e] * B[p,e] @ (A[p,e] @ x[t])   (hand-written below, float32 accumulation)
//
// The LoRA term runs in two parallel phases over work grouped by adapter slot (lora_plan.h):
//   shrink: U[t, e, :] = A[p,e] @ x[t] for each token whose sequence has gates[s,e] != 0,
//           tiles of 4 tokens x 2 rank rows, so a block of A is reused by 4 tokens in registers
//           and by up to 16 tokens in cache;
//   expand: y[t, n] += sum_e gates[s,e] * dot(B[p,e,n,:], U[t,e,:]) for column chunks of 256,
//           so a chunk of B stays in cache for every token of the adapter's sequences.
// Sequences with adapter -1 and experts with gate 0 are never visited.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu/vec.h"
#include "lora_plan.h"

namespace milora::cpu {
namespace {

constexpr int64_t kShrinkTokens = 16;  // tokens per shrink work item
constexpr int64_t kShrinkRows = 8;     // rank rows per shrink work item
constexpr int64_t kExpandCols = 256;   // output columns per expand work item

template <typename T>
int64_t round_up(T v, int64_t m) {
  return (static_cast<int64_t>(v) + m - 1) / m * m;
}

// out[i][j] = dot(x_rows[i], a_rows[j]) over K, for TM tokens x TJ rank rows.
template <int TM, int TJ, typename scalar_t, typename acc_t>
void dot_tile(const scalar_t* const* x_rows, const scalar_t* const* a_rows, int64_t K, acc_t* out, int64_t out_stride) {
  using V = Vec<acc_t>;
  V acc[TM][TJ];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TJ; ++j) acc[i][j] = V::zero();
  int64_t k = 0;
  for (; k + V::size <= K; k += V::size) {
    V xv[TM];
    for (int i = 0; i < TM; ++i) xv[i] = V::load(x_rows[i] + k);
    for (int j = 0; j < TJ; ++j) {
      const V av = V::load(a_rows[j] + k);
      for (int i = 0; i < TM; ++i) acc[i][j] = fma(xv[i], av, acc[i][j]);
    }
  }
  if (k < K) {
    const int rem = static_cast<int>(K - k);
    V xv[TM];
    for (int i = 0; i < TM; ++i) xv[i] = V::load(x_rows[i] + k, rem);
    for (int j = 0; j < TJ; ++j) {
      const V av = V::load(a_rows[j] + k, rem);
      for (int i = 0; i < TM; ++i) acc[i][j] = fma(xv[i], av, acc[i][j]);
    }
  }
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TJ; ++j) out[i * out_stride + j] = acc[i][j].sum();
}

template <typename scalar_t, typename acc_t>
void dot_tile_any(int tm, int tj, const scalar_t* const* xr, const scalar_t* const* ar, int64_t K, acc_t* out, int64_t stride) {
  switch (tm * 4 + tj) {
    case 1 * 4 + 1: return dot_tile<1, 1>(xr, ar, K, out, stride);
    case 1 * 4 + 2: return dot_tile<1, 2>(xr, ar, K, out, stride);
    case 2 * 4 + 1: return dot_tile<2, 1>(xr, ar, K, out, stride);
    case 2 * 4 + 2: return dot_tile<2, 2>(xr, ar, K, out, stride);
    case 3 * 4 + 1: return dot_tile<3, 1>(xr, ar, K, out, stride);
    case 3 * 4 + 2: return dot_tile<3, 2>(xr, ar, K, out, stride);
    case 4 * 4 + 1: return dot_tile<4, 1>(xr, ar, K, out, stride);
    default: return dot_tile<4, 2>(xr, ar, K, out, stride);
  }
}

struct ShrinkItem {
  int64_t adapter, expert;
  const int64_t* tokens;  // token indices into x, all in sequences with gates[s, expert] != 0
  int64_t num_tokens;
  int64_t r0, r1;         // rank rows [r0, r1)
};

struct ExpandItem {
  const AdapterGroup* group;
  int64_t n0, n1;         // output columns [n0, n1)
};

template <typename scalar_t>
void add_gated_lora(
    at::Tensor& y,                // [T, N] contiguous, x's dtype
    const at::Tensor& x,          // [T, K] contiguous
    const at::Tensor& lora_a,     // [P, E, R, K] contiguous
    const at::Tensor& lora_b,     // [P, E, N, R] contiguous
    const at::Tensor& gates,      // [S, E] contiguous, accumulation dtype
    const LoraPlan& plan,
    const GatedLoraShape& sh) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using V = Vec<acc_t>;
  const int64_t K = sh.K, N = sh.N, E = sh.E, R = sh.R;
  const int64_t Rpad = round_up(R, V::size);
  const acc_t* g = gates.data_ptr<acc_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* ap = lora_a.data_ptr<scalar_t>();
  const scalar_t* bp = lora_b.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();

  // ---- shrink: U[t, e, r] = dot(A[p, e, r, :], x[t, :]); pad lanes r in [R, Rpad) hold 0 ----
  at::Tensor U = at::empty({sh.T, E, Rpad}, x.options().dtype(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat));
  acc_t* up = U.data_ptr<acc_t>();
  std::vector<std::vector<int64_t>> token_lists;  // per (group, expert) with work
  std::vector<std::pair<int64_t, int64_t>> list_keys;  // (adapter, expert) of each list
  for (const auto& grp : plan.groups) {
    for (int64_t e = 0; e < E; ++e) {
      std::vector<int64_t> toks;
      for (int64_t s : grp.seqs) {
        if (g[s * E + e] == acc_t(0)) continue;
        for (int64_t t = plan.seq_begin(s); t < plan.seq_end(s); ++t) toks.push_back(t);
      }
      if (!toks.empty()) {
        token_lists.push_back(std::move(toks));
        list_keys.emplace_back(grp.adapter, e);
      }
    }
  }
  std::vector<ShrinkItem> shrink;
  for (size_t l = 0; l < token_lists.size(); ++l) {
    const auto& toks = token_lists[l];
    for (int64_t i0 = 0; i0 < static_cast<int64_t>(toks.size()); i0 += kShrinkTokens) {
      for (int64_t r0 = 0; r0 < R; r0 += kShrinkRows) {
        shrink.push_back(ShrinkItem{list_keys[l].first, list_keys[l].second, toks.data() + i0,
                                    std::min<int64_t>(kShrinkTokens, toks.size() - i0), r0,
                                    std::min<int64_t>(r0 + kShrinkRows, R)});
      }
    }
  }
  at::parallel_for(0, static_cast<int64_t>(shrink.size()), 1, [&](int64_t begin, int64_t end) {
    acc_t out[4 * 2];
    for (int64_t w = begin; w < end; ++w) {
      const ShrinkItem& it = shrink[w];
      const scalar_t* a_base = ap + ((it.adapter * E + it.expert) * R) * K;
      for (int64_t i = 0; i < it.num_tokens; i += 4) {
        const int tm = static_cast<int>(std::min<int64_t>(4, it.num_tokens - i));
        const scalar_t* xr[4];
        for (int q = 0; q < tm; ++q) xr[q] = xp + it.tokens[i + q] * K;
        for (int64_t r = it.r0; r < it.r1; r += 2) {
          const int tj = static_cast<int>(std::min<int64_t>(2, it.r1 - r));
          const scalar_t* ar[2] = {a_base + r * K, a_base + (r + tj - 1) * K};
          dot_tile_any<scalar_t, acc_t>(tm, tj, xr, ar, K, out, 2);
          for (int q = 0; q < tm; ++q)
            for (int j = 0; j < tj; ++j) up[(it.tokens[i + q] * E + it.expert) * Rpad + r + j] = out[q * 2 + j];
        }
        if (it.r1 == R) {
          for (int q = 0; q < tm; ++q)
            for (int64_t r = R; r < Rpad; ++r) up[(it.tokens[i + q] * E + it.expert) * Rpad + r] = acc_t(0);
        }
      }
    }
  });

  // ---- expand: y[t, n] += sum_e gates[s,e] * dot(B[p, e, n, :], U[t, e, :]) --------------
  std::vector<ExpandItem> expand;
  for (const auto& grp : plan.groups)
    for (int64_t n0 = 0; n0 < N; n0 += kExpandCols)
      expand.push_back(ExpandItem{&grp, n0, std::min<int64_t>(n0 + kExpandCols, N)});
  at::parallel_for(0, static_cast<int64_t>(expand.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ug(E * Rpad);      // gated U row of the current token, active experts only
    std::vector<int64_t> active(E);       // active experts of the current sequence
    alignas(32) acc_t col[V::size];
    for (int64_t w = begin; w < end; ++w) {
      const ExpandItem& it = expand[w];
      const int64_t p = it.group->adapter;
      for (int64_t s : it.group->seqs) {
        int64_t na = 0;
        for (int64_t e = 0; e < E; ++e)
          if (g[s * E + e] != acc_t(0)) active[na++] = e;
        if (na == 0) continue;
        for (int64_t t = plan.seq_begin(s); t < plan.seq_end(s); ++t) {
          for (int64_t i = 0; i < na; ++i) {
            const acc_t gate = g[s * E + active[i]];
            const acc_t* u = up + (t * E + active[i]) * Rpad;
            for (int64_t r = 0; r < Rpad; ++r) ug[i * Rpad + r] = gate * u[r];
          }
          for (int64_t n = it.n0; n < it.n1; n += V::size) {
            const int nv = static_cast<int>(std::min<int64_t>(V::size, it.n1 - n));
            V acc[V::size];
            for (int j = 0; j < V::size; ++j) acc[j] = V::zero();
            for (int64_t i = 0; i < na; ++i) {
              const scalar_t* b_rows = bp + ((p * E + active[i]) * N + n) * R;
              for (int64_t r = 0; r < Rpad; r += V::size) {
                const V u = V::load(ug.data() + i * Rpad + r);
                if (r + V::size <= R) {
                  for (int j = 0; j < nv; ++j) acc[j] = fma(V::load(b_rows + j * R + r), u, acc[j]);
                } else {
                  const int rem = static_cast<int>(R - r);
                  for (int j = 0; j < nv; ++j) acc[j] = fma(V::load(b_rows + j * R + r, rem), u, acc[j]);
                }
              }
            }
            V::transpose_sum(acc).store(col);
            scalar_t* yrow = yp + t * N + n;
            for (int j = 0; j < nv; ++j) yrow[j] = static_cast<scalar_t>(static_cast<acc_t>(yrow[j]) + col[j]);
          }
        }
      }
    }
  });
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

  const auto x2 = x.reshape({sh.T, sh.K}).contiguous();                   // [T, K]
  auto y = at::linear(x2, weight, bias).contiguous();                       // [T, N]
  const auto acc_dtype = accumulate_type(x.scalar_type());
  const auto gates_acc = gates.to(acc_dtype).contiguous();                  // [S, E]
  const LoraPlan plan = plan_by_adapter(seq_offsets, adapter_ids, &gates_acc);
  if (!plan.groups.empty()) {
    const auto a = lora_a.contiguous();                                     // [P, E, R, K]
    const auto b = lora_b.contiguous();                                     // [P, E, N, R]
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
