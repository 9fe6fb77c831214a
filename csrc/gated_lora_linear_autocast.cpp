// Autocast of milora_ext::gated_lora_linear: under torch.autocast the op casts like F.linear
// (a "lower precision fp" op): x, weight, bias, lora_a and lora_b are cast to the autocast
// dtype (bf16 / fp16) through autocast's weight cache, so float32 master weights and float32
// adapters train under bf16/fp16 compute. The gates stay float32, as the op's contract wants
// (they are coefficients accumulated in float32, not operands of a matmul). float64 inputs are
// left alone, as F.linear leaves them. Index tensors are never floating point.
//
// The casts are ordinary differentiable ops recorded by autograd before the Autograd kernel
// (csrc/gated_lora_linear_autograd.cpp) runs, so gradients reach the float32 Parameters in
// float32, exactly as with F.linear under autocast.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace milora {
namespace {

template <c10::DeviceType device_type>
at::Tensor gated_lora_linear_autocast(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& seq_offsets, const at::Tensor& adapter_ids, const at::Tensor& gates) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("milora_ext::gated_lora_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&)>();
  const auto to = at::autocast::get_lower_precision_fp_from_device_type(device_type);
  return op.call(at::autocast::cached_cast(to, x, device_type), at::autocast::cached_cast(to, weight, device_type),
                 at::autocast::cached_cast(to, bias, device_type), at::autocast::cached_cast(to, lora_a, device_type),
                 at::autocast::cached_cast(to, lora_b, device_type), seq_offsets, adapter_ids, gates);
}

}  // namespace

TORCH_LIBRARY_IMPL(milora_ext, AutocastCPU, m) {
  m.impl("gated_lora_linear", &gated_lora_linear_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(milora_ext, AutocastCUDA, m) {
  m.impl("gated_lora_linear", &gated_lora_linear_autocast<c10::DeviceType::CUDA>);
}

}  // namespace milora
