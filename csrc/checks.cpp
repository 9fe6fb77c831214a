#include "checks.h"

#include <c10/util/Exception.h>

namespace milora {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

bool is_index_dtype(at::ScalarType t) {
  return t == at::kInt || t == at::kLong;
}

void check_same_device(const char* op, const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(
      t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
}

}  // namespace

at::ScalarType accumulate_type(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

GatedLoraShape check_gated_lora_args(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_a,
    const at::Tensor& lora_b,
    const at::Tensor& seq_offsets,
    const at::Tensor& adapter_ids,
    const at::Tensor& gates) {
  // ---- ranks and sizes -------------------------------------------------------------
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have shape [T, K] or [..., K], got a 0-dim tensor");
  const int64_t K = x.size(-1);
  const int64_t T = K == 0 ? 0 : x.numel() / K;
  TORCH_CHECK_VALUE(K >= 1, op, ": x must have at least one input feature (K >= 1), got shape ", x.sizes());
  TORCH_CHECK_VALUE(
      weight.dim() == 2 && weight.size(1) == K,
      op, ": weight must have shape [N, K] = [N, ", K, "] (K = x.size(-1)), got ", weight.sizes());
  const int64_t N = weight.size(0);
  TORCH_CHECK_VALUE(N >= 1, op, ": weight must have at least one output feature (N >= 1), got ", weight.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(
        bias->dim() == 1 && bias->size(0) == N,
        op, ": bias must have shape [N] = [", N, "] or be None, got ", bias->sizes());
  }
  TORCH_CHECK_VALUE(
      lora_a.dim() == 4 && lora_a.size(3) == K,
      op, ": lora_a must have shape [P, E, R, K] = [P, E, R, ", K, "], got ", lora_a.sizes());
  const int64_t P = lora_a.size(0), E = lora_a.size(1), R = lora_a.size(2);
  TORCH_CHECK_VALUE(E >= 1 && R >= 1, op, ": lora_a must have E >= 1 experts and rank R >= 1, got ", lora_a.sizes());
  TORCH_CHECK_VALUE(
      lora_b.dim() == 4 && lora_b.size(0) == P && lora_b.size(1) == E && lora_b.size(2) == N && lora_b.size(3) == R,
      op, ": lora_b must have shape [P, E, N, R] = [", P, ", ", E, ", ", N, ", ", R,
      "] (P, E, R from lora_a, N from weight), got ", lora_b.sizes());
  TORCH_CHECK_VALUE(
      seq_offsets.dim() == 1 && seq_offsets.size(0) >= 1,
      op, ": seq_offsets must have shape [S + 1] (S >= 0 sequences), got ", seq_offsets.sizes());
  const int64_t S = seq_offsets.size(0) - 1;
  TORCH_CHECK_VALUE(
      adapter_ids.dim() == 1 && adapter_ids.size(0) == S,
      op, ": adapter_ids must have shape [S] = [", S, "] (S = seq_offsets.size(0) - 1), got ", adapter_ids.sizes());
  TORCH_CHECK_VALUE(
      gates.dim() == 2 && gates.size(0) == S && gates.size(1) == E,
      op, ": gates must have shape [S, E] = [", S, ", ", E, "] (S sequences, E experts of lora_a), got ",
      gates.sizes());

  // ---- dtypes ----------------------------------------------------------------------
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(
      is_supported_float(dt), op, ": x must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK_TYPE(weight.scalar_type() == dt, op, ": weight must have x's dtype ", dt, ", got ", weight.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == dt, op, ": bias must have x's dtype ", dt, ", got ", bias->scalar_type());
  }
  TORCH_CHECK_TYPE(lora_a.scalar_type() == dt, op, ": lora_a must have x's dtype ", dt, ", got ", lora_a.scalar_type());
  TORCH_CHECK_TYPE(lora_b.scalar_type() == dt, op, ": lora_b must have x's dtype ", dt, ", got ", lora_b.scalar_type());
  TORCH_CHECK_TYPE(
      is_index_dtype(seq_offsets.scalar_type()),
      op, ": seq_offsets must be int32 or int64, got ", seq_offsets.scalar_type());
  TORCH_CHECK_TYPE(
      is_index_dtype(adapter_ids.scalar_type()),
      op, ": adapter_ids must be int32 or int64, got ", adapter_ids.scalar_type());
  // gates hold router probabilities: float32 always; float64 is accepted with float64
  // inputs so that gradcheck can perturb them precisely.
  TORCH_CHECK_TYPE(
      gates.scalar_type() == at::kFloat || (dt == at::kDouble && gates.scalar_type() == at::kDouble),
      op, ": gates must be float32 (or float64 when x is float64), got ", gates.scalar_type());

  // ---- devices ---------------------------------------------------------------------
  check_same_device(op, x, weight, "weight");
  if (bias.has_value()) check_same_device(op, x, *bias, "bias");
  check_same_device(op, x, lora_a, "lora_a");
  check_same_device(op, x, lora_b, "lora_b");
  check_same_device(op, x, seq_offsets, "seq_offsets");
  check_same_device(op, x, adapter_ids, "adapter_ids");
  check_same_device(op, x, gates, "gates");

  return GatedLoraShape{T, K, N, P, E, R, S};
}

IndexReader::IndexReader(const at::Tensor& t) : owned_(t.contiguous()), size_(t.numel()) {
  if (owned_.scalar_type() == at::kLong) {
    p64_ = owned_.data_ptr<int64_t>();
  } else {
    p32_ = owned_.data_ptr<int32_t>();
  }
}

void check_index_values(
    const char* op,
    const at::Tensor& seq_offsets_cpu,
    const at::Tensor& adapter_ids_cpu,
    int64_t num_tokens,
    int64_t num_slots) {
  TORCH_CHECK(seq_offsets_cpu.is_cpu() && adapter_ids_cpu.is_cpu(), op, ": index values are checked on the host");
  const IndexReader o(seq_offsets_cpu);  // [S + 1]
  const IndexReader a(adapter_ids_cpu);  // [S]
  const int64_t S = o.size() - 1;
  TORCH_CHECK_VALUE(o[0] == 0, op, ": seq_offsets must start at 0, got seq_offsets[0] = ", o[0]);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(
        o[s + 1] >= o[s], op, ": seq_offsets must not decrease, got seq_offsets[", s, "] = ", o[s],
        " > seq_offsets[", s + 1, "] = ", o[s + 1]);
  }
  TORCH_CHECK_VALUE(
      o[S] == num_tokens, op, ": seq_offsets must end at T = ", num_tokens,
      " (the number of tokens in x), got seq_offsets[", S, "] = ", o[S]);
  for (int64_t s = 0; s < a.size(); ++s) {
    TORCH_CHECK_INDEX(
        a[s] >= -1 && a[s] < num_slots, op, ": adapter_ids[", s, "] = ", a[s],
        " is out of range: expected -1 (base only) or a slot in [0, P = ", num_slots, ")");
  }
}

}  // namespace milora
