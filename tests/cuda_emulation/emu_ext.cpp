// Python entry point of the CPU-emulated CUDA kernels (tests/test_cuda_emulated.py).
//
// run(...) mirrors the path logic of csrc/cuda/gated_lora_linear_cuda.cpp on CPU tensors,
// with cuBLAS replaced by ATen's CPU linear / addmm_. It validates with the op's own checks
// (csrc/checks.cpp), packs the kernels' arguments with the dispatcher's own code
// (csrc/cuda/lora_args.h: contiguous copies, x copied to aligned, padded rows when needed) and
// calls the real kernel launchers (compiled with -DMILORA_CUDA_EMULATION). The workspace and
// y (and x's row padding) are filled with NaN first, so a kernel that reads U it did not
// define or the padding as data, or leaves an output element unwritten, shows.
#include <torch/extension.h>

#include <limits>
#include <string>

#include "checks.h"
#include "cuda/launch.h"
#include "cuda/lora_args.h"

namespace mc = milora::cuda;

namespace milora::emu {  // emu_load_stats.cpp
void watch_range(int slot, const void* p, size_t bytes);
uint64_t loaded_bytes(int slot, int width_index);
}  // namespace milora::emu

namespace {

// The operands whose loads the emulator counts, in its watch slots.
const char* const kWatched[] = {"weight", "lora_a", "lora_b", "x"};

void watch(int slot, const at::Tensor& t) {
  milora::emu::watch_range(slot, t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size());
}

// Bytes read by vector / __ldg loads of each width from each watched operand, in the last run.
py::dict load_stats() {
  py::dict out;
  for (int slot = 0; slot < 4; ++slot) {
    py::dict by_width;
    for (int w = 0; w < 5; ++w) by_width[py::int_(1 << w)] = milora::emu::loaded_bytes(slot, w);
    out[kWatched[slot]] = by_width;
  }
  return out;
}

void ok(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "emulated launch of ", what, " failed with error ", static_cast<int>(err));
}

at::Tensor run(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
               const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& seq_offsets,
               const at::Tensor& adapter_ids, const at::Tensor& gates, const std::string& path) {
  const milora::GatedLoraShape sh = milora::check_gated_lora_args(
      "emulated gated_lora_linear", x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates);
  const int64_t T = sh.T, N = sh.N;
  const auto dt = x.scalar_type();
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  if (T == 0) return at::empty(out_shape, x.options());
  const auto nan = std::numeric_limits<float>::quiet_NaN();
  const mc::PackedLora pk = mc::pack_lora_args(sh, x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates, nan);
  const mc::LoraArgs& a = pk.args;
  const at::Tensor& x2 = pk.x;      // [T, K]
  const at::Tensor& w = pk.weight;  // [N, K]
  const void* bias_ptr = pk.bias_ptr;
  cudaStream_t stream = nullptr;
  watch(0, w);
  watch(1, pk.lora_a);
  watch(2, pk.lora_b);
  watch(3, pk.x_rows);

  std::string p = path;
  if (p == "auto") p = dt == at::kFloat ? "fp32" : (T <= mc::kDecodeMaxTokens ? "decode" : "preinit");
  at::Tensor y;
  if (p == "fp32") {
    y = at::linear(x2, w, bias).contiguous();
    ok(mc::launch_shrink_simt(a, false, stream), "shrink_simt");
    ok(mc::launch_expand_simt(a, y.data_ptr(), stream), "expand_simt");
  } else if (p == "decode" || p == "decode_rt1") {
    ok(mc::launch_shrink_simt(a, true, stream), "shrink_simt");
    y = at::full({T, N}, nan, x.options());
    const int row_tiles = p == "decode_rt1" ? 1 : 2;
    ok(mc::launch_decode_fused(a, w.data_ptr(), bias_ptr, y.data_ptr(), row_tiles, true, stream), "decode_fused");
  } else if (p == "preinit") {
    ok(mc::launch_shrink_tc(a, stream), "shrink_tc");
    y = at::full({T, N}, nan, x.options());
    ok(mc::launch_expand_tc(a, bias_ptr, y.data_ptr(), true, stream), "expand_tc");
    y.addmm_(x2, w.t());
  } else if (p == "rmw") {
    y = at::linear(x2, w, bias).contiguous();
    ok(mc::launch_shrink_tc(a, stream), "shrink_tc");
    ok(mc::launch_expand_tc(a, bias_ptr, y.data_ptr(), false, stream), "expand_tc");
  } else {
    TORCH_CHECK(false, "unknown path ", path);
  }
  return y.view(out_shape);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run", &run, "gated_lora_linear through the CPU-emulated CUDA kernels (path: auto, fp32, decode, "
                     "decode_rt1, preinit, rmw)");
  m.def("load_stats", &load_stats, "bytes read by vector / __ldg loads of each width from weight, lora_a, "
                                   "lora_b and x (the kernels' buffer) in the last run");
}
