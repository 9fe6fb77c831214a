#include "lora_plan.h"

#include <ATen/ATen.h>

#include <map>

namespace milora {

LoraPlan plan_by_adapter(
    const at::Tensor& seq_offsets_cpu,
    const at::Tensor& adapter_ids_cpu,
    const at::Tensor* gates_cpu) {
  LoraPlan plan;
  const auto off = seq_offsets_cpu.to(at::kLong).contiguous();  // [S + 1]
  const auto ids = adapter_ids_cpu.to(at::kLong).contiguous();  // [S]
  const int64_t S = ids.numel();
  plan.offsets.assign(off.data_ptr<int64_t>(), off.data_ptr<int64_t>() + S + 1);

  // Any non-zero gate per sequence, read once from a [S, E] float64 copy.
  std::vector<char> has_gate(S, 1);
  if (gates_cpu != nullptr && S > 0) {
    const auto nonzero = gates_cpu->ne(0).any(1).contiguous();  // [S] bool
    const bool* nz = nonzero.data_ptr<bool>();
    for (int64_t s = 0; s < S; ++s) has_gate[s] = nz[s];
  }

  std::map<int64_t, std::vector<int64_t>> by_adapter;
  const int64_t* a = ids.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    if (a[s] < 0 || plan.offsets[s + 1] == plan.offsets[s] || !has_gate[s]) continue;
    by_adapter[a[s]].push_back(s);
  }
  plan.groups.reserve(by_adapter.size());
  for (auto& [adapter, seqs] : by_adapter) {
    plan.groups.push_back(AdapterGroup{adapter, std::move(seqs)});
  }
  return plan;
}

}  // namespace milora
