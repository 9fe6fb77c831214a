// Python entry point of the CPU-emulated CUDA kernels (tests/test_cuda_emulated.py).
//
// run(...) mirrors the path logic of csrc/cuda/gated_lora_linear_cuda.cpp on CPU tensors,
// with cuBLAS replaced by ATen's CPU linear / addmm_. It validates with the op's own checks
// (csrc/checks.cpp), packs the kernels' arguments with the dispatcher's own code
// (csrc/cuda/lora_args.h: contiguous copies, a misaligned x copied to an aligned buffer) and
// calls the real kernel launchers (compiled with -DMILORA_CUDA_EMULATION). The workspace and
// y are filled with NaN first, so a kernel that reads U it did not define, or leaves an output
// element unwritten, shows.
#include <torch/extension.h>

#include <limits>
#include <string>

#include "checks.h"
#include "cuda/launch.h"
#include "cuda/lora_args.h"

namespace mc = milora::cuda;

namespace {

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
}
