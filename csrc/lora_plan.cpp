#include "lora_plan.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "checks.h"

#include <map>

namespace milora {

LoraPlan plan_by_adapter(
    const at::Tensor& seq_offsets_cpu,
    const at::Tensor& adapter_ids_cpu,
    const at::Tensor* gates_cpu) {
  LoraPlan plan;
  const IndexReader off(seq_offsets_cpu);  // [S + 1]
  const IndexReader ids(adapter_ids_cpu);  // [S]
  const int64_t S = ids.size();
  plan.offsets.resize(S + 1);
  for (int64_t s = 0; s <= S; ++s) plan.offsets[s] = off[s];

  // Whether each sequence has a non-zero gate, read in place from the [S, E] gates.
  std::vector<char> has_gate(S, 1);
  if (gates_cpu != nullptr && S > 0) {
    const auto g = gates_cpu->contiguous();
    const int64_t E = g.size(1);
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "plan_by_adapter", [&] {
      const scalar_t* gp = g.data_ptr<scalar_t>();
      for (int64_t s = 0; s < S; ++s) {
        has_gate[s] = 0;
        for (int64_t e = 0; e < E; ++e) has_gate[s] |= gp[s * E + e] != scalar_t(0);
      }
    });
  }

  std::map<int64_t, std::vector<int64_t>> by_adapter;
  for (int64_t s = 0; s < S; ++s) {
    if (ids[s] < 0 || plan.offsets[s + 1] == plan.offsets[s] || !has_gate[s]) continue;
    by_adapter[ids[s]].push_back(s);
  }
  plan.groups.reserve(by_adapter.size());
  for (auto& [adapter, seqs] : by_adapter) {
    plan.groups.push_back(AdapterGroup{adapter, std::move(seqs)});
  }
  return plan;
}

}  // namespace milora
