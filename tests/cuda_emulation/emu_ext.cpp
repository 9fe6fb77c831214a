// Python entry point of the CPU-emulated CUDA kernels (tests/test_cuda_emulated.py).
//
// run(...) mirrors the path logic of csrc/cuda/gated_lora_linear_cuda.cpp on CPU tensors,
// with cuBLAS replaced by ATen's CPU linear / addmm_, and calls the real kernel launchers
// (compiled with -DMILORA_CUDA_EMULATION). The workspace and y are filled with NaN first, so
// a kernel that reads U it did not define, or leaves an output element unwritten, shows.
#include <torch/extension.h>

#include <limits>
#include <string>

#include "cuda/launch.h"

namespace mc = milora::cuda;

namespace {

void ok(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "emulated launch of ", what, " failed with error ", static_cast<int>(err));
}

at::Tensor run(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
               const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& seq_offsets,
               const at::Tensor& adapter_ids, const at::Tensor& gates, const std::string& path) {
  const int64_t K = x.size(-1), T = x.numel() / K, N = weight.size(0);
  const int64_t E = lora_a.size(1), R = lora_a.size(2), P = lora_a.size(0), S = adapter_ids.size(0);
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  if (T == 0) return at::empty(out_shape, x.options());
  const auto nan = std::numeric_limits<float>::quiet_NaN();
  const auto x2 = x.reshape({T, K}).contiguous();
  const auto w = weight.contiguous();
  const auto b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const auto la = lora_a.contiguous(), lb = lora_b.contiguous();
  const auto g = gates.contiguous();
  const auto off = seq_offsets.contiguous(), ids = adapter_ids.contiguous();
  const int64_t route_floats = (2 * T + 3) / 4 * 4;
  auto ws = at::full({route_floats + T * E * R}, nan, x.options().dtype(at::kFloat));

  mc::LoraArgs a;
  const auto dt = x.scalar_type();
  a.dtype = dt == at::kFloat ? mc::DType::kFloat32 : (dt == at::kHalf ? mc::DType::kFloat16 : mc::DType::kBFloat16);
  a.x = x2.data_ptr();
  a.lora_a = la.data_ptr();
  a.lora_b = lb.data_ptr();
  a.gates = g.data_ptr<float>();
  a.routes = reinterpret_cast<int32_t*>(ws.data_ptr<float>());
  a.U = ws.data_ptr<float>() + route_floats;
  a.T = T, a.K = K, a.N = N, a.E = E, a.R = R;
  a.idx.offsets = off.data_ptr();
  a.idx.ids = ids.data_ptr();
  a.idx.offsets64 = off.scalar_type() == at::kLong;
  a.idx.ids64 = ids.scalar_type() == at::kLong;
  a.idx.S = S;
  a.idx.P = P;
  const void* bias_ptr = b.defined() ? b.data_ptr() : nullptr;
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
