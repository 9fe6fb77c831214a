// Input validation shared by every implementation of the milora_ext ops (CPU, CUDA,
// backward). Errors surface in Python as ValueError / TypeError / IndexError with a
// message that names the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace milora {

// Problem sizes of one gated_lora_linear call, read off validated shapes.
struct GatedLoraShape {
  int64_t T;  // tokens (x's leading dims flattened)
  int64_t K;  // input features
  int64_t N;  // output features
  int64_t P;  // adapter slots
  int64_t E;  // experts per adapter
  int64_t R;  // LoRA rank
  int64_t S;  // sequences
};

// Shapes, dtypes, devices and layouts of every argument (no values are read, so this
// never synchronises a device). `op` names the op in error messages.
GatedLoraShape check_gated_lora_args(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_a,
    const at::Tensor& lora_b,
    const at::Tensor& seq_offsets,
    const at::Tensor& adapter_ids,
    const at::Tensor& gates);

// Element i of a CPU int32 / int64 index tensor as int64, read in place (a contiguous copy
// only when the tensor is not contiguous): no ATen op per call on the hot path.
class IndexReader {
 public:
  explicit IndexReader(const at::Tensor& t);
  int64_t operator[](int64_t i) const { return p64_ != nullptr ? p64_[i] : static_cast<int64_t>(p32_[i]); }
  int64_t size() const { return size_; }

 private:
  at::Tensor owned_;
  const int64_t* p64_ = nullptr;
  const int32_t* p32_ = nullptr;
  int64_t size_ = 0;
};

// Values of the index tensors, which must be CPU tensors (int32 or int64):
// 0 = offsets[0] <= ... <= offsets[S] = num_tokens, -1 <= adapter_ids[s] < num_slots.
void check_index_values(
    const char* op,
    const at::Tensor& seq_offsets_cpu,
    const at::Tensor& adapter_ids_cpu,
    int64_t num_tokens,
    int64_t num_slots);

// The accumulation dtype of a call: float64 for float64 inputs, float32 otherwise.
at::ScalarType accumulate_type(at::ScalarType input_dtype);

}  // namespace milora
