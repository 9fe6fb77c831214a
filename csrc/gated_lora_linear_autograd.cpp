// Autograd of milora_ext::gated_lora_linear, in C++ so that a call (with or without
// gradients) never passes through Python: the op runs once per adapted linear per step, and
// a Python autograd wrapper cost about as much as the whole LoRA term of a decode step.
// The gradients come from milora_ext::gated_lora_linear_backward (all devices).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>

namespace milora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& seq_offsets, const at::Tensor& adapter_ids, const at::Tensor& gates) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("milora_ext::gated_lora_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&)>();
  return op.call(x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads call_backward(const at::Tensor& grad_y, const variable_list& saved, std::array<bool, 6> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("milora_ext::gated_lora_linear_backward", "")
                       .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    std::array<bool, 6>)>();
  return op.call(grad_y, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], mask);
}

class GatedLoraLinear : public torch::autograd::Function<GatedLoraLinear> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
      const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& seq_offsets,
      const at::Tensor& adapter_ids, const at::Tensor& gates) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto y = call_forward(x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates);
    ctx->save_for_backward({x, weight, lora_a, lora_b, seq_offsets, adapter_ids, gates});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  // Inputs, in order: x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates. A None
  // bias has no autograd edge, so the edges after it shift down by one.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t after_bias = has_bias ? 3 : 2;  // edge of lora_a
    const std::array<bool, 6> mask = {
        ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(2),
        ctx->needs_input_grad(after_bias), ctx->needs_input_grad(after_bias + 1),
        ctx->needs_input_grad(after_bias + 4)};
    auto [dx, dw, db, da, dbl, dg] = call_backward(grad_outputs[0].contiguous(), saved, mask);
    const auto pick = [](const at::Tensor& t, bool wanted) { return wanted ? t : at::Tensor(); };
    return {pick(dx, mask[0]), pick(dw, mask[1]), pick(db, mask[2]), pick(da, mask[3]),
            pick(dbl, mask[4]), at::Tensor(), at::Tensor(), pick(dg, mask[5])};
  }
};

at::Tensor gated_lora_linear_autograd(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& seq_offsets, const at::Tensor& adapter_ids, const at::Tensor& gates) {
  // Serving (no_grad, or nothing that requires grad): no graph node to build, no saved tensors;
  // straight to the kernel. Decode calls this once per active linear and step.
  if (!torch::autograd::compute_requires_grad(x, weight, bias, lora_a, lora_b, gates)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates);
  }
  return GatedLoraLinear::apply(x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates);
}

}  // namespace

TORCH_LIBRARY_IMPL(milora_ext, Autograd, m) {
  m.impl("gated_lora_linear", &gated_lora_linear_autograd);
}

}  // namespace milora
