// Host-side grouping of a batch's sequences by adapter slot. The CPU forward and the
// backward use it so that each active adapter's A and B are streamed once per call,
// however its sequences are spread through the batch.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace milora {

struct AdapterGroup {
  int64_t adapter = 0;            // slot p in [0, P)
  std::vector<int64_t> seqs;      // sequences s with adapter_ids[s] == p, in batch order
};

struct LoraPlan {
  std::vector<int64_t> offsets;   // [S + 1] seq_offsets as int64
  std::vector<AdapterGroup> groups;  // ascending adapter slot, only slots with work

  int64_t seq_begin(int64_t s) const { return offsets[s]; }
  int64_t seq_end(int64_t s) const { return offsets[s + 1]; }
};

// Groups the non-empty sequences with an adapter (id >= 0). With `gates` given (a CPU
// [S, E] tensor), sequences whose gates are all zero are left out: they cost no LoRA work.
// Index tensors must already be validated (check_index_values).
LoraPlan plan_by_adapter(
    const at::Tensor& seq_offsets_cpu,
    const at::Tensor& adapter_ids_cpu,
    const at::Tensor* gates_cpu);

}  // namespace milora
