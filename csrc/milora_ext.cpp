// The one place the milora_ext operator schemas live. Kernels register against these
// names from csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (CUDA) and csrc/*_backward.cpp.
#include <Python.h>
#include <torch/library.h>

#include "cpu/dispatch.h"

// `import milora_ext._C` only needs to load this shared library: loading it runs the
// static TORCH_LIBRARY registrations below. The module itself is empty, so it can be
// built against the limited (abi3) Python API. PyMODINIT_FUNC exports the symbol despite
// -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(milora_ext, m) {
  // y[t] = weight @ x[t] + bias + sum_e gates[s,e] * lora_b[p,e] @ (lora_a[p,e] @ x[t]),
  // s = the sequence holding token t, p = adapter_ids[s] (no LoRA term when p == -1).
  // Full contract: milora_ext/ops.py (gated_lora_linear).
  m.def(
      "gated_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "Tensor seq_offsets, Tensor adapter_ids, Tensor gates) -> Tensor");
  // Gradients of gated_lora_linear w.r.t. (x, weight, bias, lora_a, lora_b, gates).
  // output_mask[i] == false returns an empty tensor in slot i and skips its work.
  m.def(
      "gated_lora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, "
      "Tensor lora_b, Tensor seq_offsets, Tensor adapter_ids, Tensor gates, bool[6] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Validates the values of the index tensors (copies them to the host): offsets start at 0,
  // never decrease and end at num_tokens; adapter ids lie in [-1, num_slots).
  m.def("check_indices(Tensor seq_offsets, Tensor adapter_ids, int num_tokens, int num_slots) -> ()");
  // The ISA level of the CPU LoRA kernels (csrc/cpu/isa.h): in use, the highest this machine
  // runs, and an in-process switch to a level at or below that (returns the previous one).
  m.def("cpu_capability() -> str", &milora::cpu::cpu_capability_op);
  m.def("max_cpu_capability() -> str", &milora::cpu::max_cpu_capability_op);
  m.def("set_cpu_capability(str level) -> str", &milora::cpu::set_cpu_capability_op);
}
