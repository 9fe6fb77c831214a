// Backward of milora_ext::gated_lora_linear, written once with ATen ops for every device.
//
// With u = A[p,e] x and v = B[p,e]^T dy for each token (float32, or float64 for float64):
//   dx      = dy @ weight + sum_e gates[s,e] * A[p,e]^T v
//   dweight = dy^T @ x,  dbias = sum_t dy[t]
//   dA[p,e] = sum_t gates[s,e] * v x^T,  dB[p,e] = sum_t gates[s,e] * dy u^T
//   dgates[s,e] = sum_{t in s} dot(u, v)
// Tokens are grouped by adapter (lora_plan.h): each adapter costs a handful of GEMMs over
// all of its tokens. Reading the index tensors on the host synchronises a CUDA device
// once per backward call; the forward never does.
//
// dgates is the true gradient, also for gates that are 0 (their experts were skipped in the
// forward, yet d y / d gate is not zero), so zero-gate experts cost backward work only when
// gates need a gradient.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>

#include "checks.h"
#include "lora_plan.h"

namespace milora {
namespace {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// keep_zero_gate_seqs: also process sequences whose gates are all zero. They add nothing to
// the gradients, but the gradients depend on their gates (dx = ... + gates * A^T B^T dy), so
// a differentiable (double backward) evaluation must keep them in the graph.
Grads backward_impl(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& lora_a,
    const at::Tensor& lora_b,
    const at::Tensor& seq_offsets,
    const at::Tensor& adapter_ids,
    const at::Tensor& gates,
    std::array<bool, 6> output_mask,
    bool keep_zero_gate_seqs) {
  constexpr const char* op = "gated_lora_linear_backward";
  const GatedLoraShape sh =
      check_gated_lora_args(op, x, weight, c10::nullopt, lora_a, lora_b, seq_offsets, adapter_ids, gates);
  auto y_shape = x.sizes().vec();
  y_shape.back() = sh.N;
  TORCH_CHECK_VALUE(
      grad_y.sizes() == c10::IntArrayRef(y_shape), op, ": grad_y must have the output's shape ",
      c10::IntArrayRef(y_shape), ", got ", grad_y.sizes());
  TORCH_CHECK_TYPE(
      grad_y.scalar_type() == x.scalar_type(), op, ": grad_y must have x's dtype ", x.scalar_type(), ", got ",
      grad_y.scalar_type());
  TORCH_CHECK_VALUE(grad_y.device() == x.device(), op, ": grad_y must be on x's device ", x.device());

  const bool need_dx = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2];
  const bool need_da = output_mask[3], need_db_lora = output_mask[4], need_dg = output_mask[5];
  const auto empty = [&] { return at::empty({0}, x.options()); };
  const auto x2 = x.reshape({sh.T, sh.K});        // [T, K]
  const auto dy = grad_y.reshape({sh.T, sh.N});   // [T, N]

  at::Tensor dx = need_dx ? at::mm(dy, weight) : empty();                     // [T, K]
  at::Tensor dw = need_dw ? at::mm(dy.t(), x2) : empty();                     // [N, K]
  at::Tensor dbias = need_db ? dy.sum(0) : empty();                           // [N]
  // Every gradient is returned contiguous whatever the inputs' strides (zeros_like would
  // copy them): the fake kernel in milora_ext/ops.py reports exactly these layouts.
  at::Tensor da = need_da ? at::zeros(lora_a.sizes(), lora_a.options()) : empty();          // [P, E, R, K]
  at::Tensor dbl = need_db_lora ? at::zeros(lora_b.sizes(), lora_b.options()) : empty();    // [P, E, N, R]
  at::Tensor dg = need_dg ? at::zeros(gates.sizes(), gates.options()) : at::empty({0}, gates.options());  // [S, E]

  if (need_dx || need_da || need_db_lora || need_dg) {
    const auto offsets_cpu = seq_offsets.to(at::kCPU);
    const auto ids_cpu = adapter_ids.to(at::kCPU);
    check_index_values(op, offsets_cpu, ids_cpu, sh.T, sh.P);
    // Sequences whose gates are all zero contribute nothing unless dgates is wanted.
    const auto gates_cpu = gates.detach().to(at::kCPU);
    const bool keep_all = need_dg || keep_zero_gate_seqs;
    const LoraPlan plan = plan_by_adapter(offsets_cpu, ids_cpu, keep_all ? nullptr : &gates_cpu);

    const auto acc = accumulate_type(x.scalar_type());
    const auto dev_long = x.options().dtype(at::kLong);
    at::Tensor dx_lora = need_dx ? at::zeros({sh.T, sh.K}, x.options().dtype(acc)) : at::Tensor();
    const auto gates_acc = gates.to(acc);  // [S, E]
    const int64_t E = sh.E, R = sh.R;
    for (const auto& grp : plan.groups) {
      std::vector<int64_t> tok, tok_seq;
      for (int64_t s : grp.seqs) {
        for (int64_t t = plan.seq_begin(s); t < plan.seq_end(s); ++t) {
          tok.push_back(t);
          tok_seq.push_back(s);
        }
      }
      const int64_t Tp = static_cast<int64_t>(tok.size());
      const auto idx = at::tensor(tok, at::kLong).to(dev_long.device());            // [Tp]
      const auto sidx = at::tensor(tok_seq, at::kLong).to(dev_long.device());       // [Tp]
      const int64_t p = grp.adapter;
      const auto xs = x2.index_select(0, idx).to(acc);                              // [Tp, K]
      const auto dys = dy.index_select(0, idx).to(acc);                             // [Tp, N]
      const auto a = lora_a[p].to(acc).reshape({E * R, sh.K});                      // [E*R, K]
      const auto b = lora_b[p].to(acc).permute({1, 0, 2}).reshape({sh.N, E * R});  // [N, E*R]
      const auto g = gates_acc.index_select(0, sidx).repeat_interleave(R, 1);       // [Tp, E*R]
      const auto u = at::mm(xs, a.t());                                             // [Tp, E*R]
      const auto v = at::mm(dys, b);                                                // [Tp, E*R]
      const auto gv = v * g;
      if (need_dg) {
        const auto per_token = (u * v).view({Tp, E, R}).sum(-1);                    // [Tp, E]
        dg.index_add_(0, sidx, per_token.to(gates.scalar_type()));
      }
      if (need_dx) dx_lora.index_add_(0, idx, at::mm(gv, a));
      if (need_da) da[p].copy_(at::mm(gv.t(), xs).view({E, R, sh.K}));
      if (need_db_lora) dbl[p].copy_(at::mm(dys.t(), u * g).view({sh.N, E, R}).permute({1, 0, 2}));
    }
    if (need_dx && !plan.groups.empty()) dx = (dx.to(acc) + dx_lora).to(x.scalar_type());
  }
  if (need_dx) dx = dx.contiguous().view(x.sizes());
  if (need_dw) dw = dw.contiguous();
  return {dx, dw, dbias, da, dbl, dg};
}

Grads gated_lora_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& seq_offsets, const at::Tensor& adapter_ids, const at::Tensor& gates,
    std::array<bool, 6> output_mask) {
  return backward_impl(grad_y, x, weight, lora_a, lora_b, seq_offsets, adapter_ids, gates, output_mask, false);
}

// Autograd of the backward op itself, i.e. double backward (torch.autograd.grad(...,
// create_graph=True), gradient penalties, Hessian-vector products). With grad mode on and an
// input that requires grad, the ATen implementation above runs here, above the Autograd
// key, so autograd records its ops and differentiates them (every sequence kept, see
// backward_impl). Otherwise (the ordinary backward, torch.compile's traced backward) the
// call goes down to the device kernel / fake unchanged.
Grads gated_lora_linear_backward_autograd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& seq_offsets, const at::Tensor& adapter_ids, const at::Tensor& gates,
    std::array<bool, 6> output_mask) {
  const bool record = at::GradMode::is_enabled() &&
                      (grad_y.requires_grad() || x.requires_grad() || weight.requires_grad() ||
                       lora_a.requires_grad() || lora_b.requires_grad() || gates.requires_grad());
  if (record) {
    return backward_impl(grad_y, x, weight, lora_a, lora_b, seq_offsets, adapter_ids, gates, output_mask, true);
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("milora_ext::gated_lora_linear_backward", "")
                       .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    std::array<bool, 6>)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(grad_y, x, weight, lora_a, lora_b, seq_offsets, adapter_ids, gates, output_mask);
}

void check_indices(const at::Tensor& seq_offsets, const at::Tensor& adapter_ids, int64_t num_tokens, int64_t num_slots) {
  constexpr const char* op = "check_indices";
  TORCH_CHECK_VALUE(seq_offsets.dim() == 1 && seq_offsets.size(0) >= 1, op, ": seq_offsets must have shape [S + 1], got ",
                    seq_offsets.sizes());
  TORCH_CHECK_VALUE(adapter_ids.dim() == 1 && adapter_ids.size(0) == seq_offsets.size(0) - 1, op,
                    ": adapter_ids must have shape [S] = [", seq_offsets.size(0) - 1, "], got ", adapter_ids.sizes());
  TORCH_CHECK_TYPE(seq_offsets.scalar_type() == at::kInt || seq_offsets.scalar_type() == at::kLong, op,
                   ": seq_offsets must be int32 or int64, got ", seq_offsets.scalar_type());
  TORCH_CHECK_TYPE(adapter_ids.scalar_type() == at::kInt || adapter_ids.scalar_type() == at::kLong, op,
                   ": adapter_ids must be int32 or int64, got ", adapter_ids.scalar_type());
  check_index_values(op, seq_offsets.to(at::kCPU), adapter_ids.to(at::kCPU), num_tokens, num_slots);
}

}  // namespace

// Device-generic: the same code serves CPU and CUDA tensors.
TORCH_LIBRARY_IMPL(milora_ext, CompositeExplicitAutograd, m) {
  m.impl("gated_lora_linear_backward", &gated_lora_linear_backward);
  m.impl("check_indices", &check_indices);
}

TORCH_LIBRARY_IMPL(milora_ext, Autograd, m) {
  m.impl("gated_lora_linear_backward", &gated_lora_linear_backward_autograd);
}

}  // namespace milora
