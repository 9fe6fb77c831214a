// CUDA implementation of milora_ext::gated_lora_linear: validates, picks a path, launches.
//
//   decode  (float16 / bfloat16, T <= MILORA_DECODE_MAX_TOKENS, default 64):
//           shrink_simt (U = A x, routes; prefetches lora_b into L2), then the fused kernel
//           (y = W x + bias + gated expand, one pass over W, y written once), launched as a
//           programmatic dependent of the shrink on sm_90 so the two overlap.
//   prefill (float16 / bfloat16, larger T):
//           "preinit" (default): shrink_tc; expand_tc writes y = bias + delta; cuBLAS then
//           accumulates the base GEMM into it (y.addmm_(x, W^T), beta = 1), so y is written
//           by the LoRA kernel and read once by the GEMM's epilogue;
//           "rmw" (MILORA_PREFILL_EPILOGUE=rmw): y = at::linear (cuBLAS), shrink_tc, then
//           expand_tc adds delta to the rows that have an active expert.
//   float32: y = at::linear (cuBLAS, no TF32 unless PyTorch is told to), shrink_simt,
//           expand_simt: exact float32 accumulation, no tensor cores.
//
// Tuning switches (environment, read at every call): MILORA_DECODE_MAX_TOKENS (default 64),
// MILORA_DECODE_ROW_TILES=1 (16 rows per decode CTA for T > 16; default 32), MILORA_PDL=0,
// MILORA_PREFILL_EPILOGUE=rmw. docs/cuda_kernels.md has the design.
//
// Why T <= 64 for decode: the fused kernel re-reads x from L2 in every CTA (its cost grows
// with T / rows-per-CTA) and holds T/8 accumulator tiles per warp; at T = 64 it still reads
// W at close to the HBM rate, above that cuBLAS's large tiles reuse x better and the
// separate LoRA kernels cost a small fraction of the GEMM.
//
// No host synchronisation: index tensors are only read on the device (common.cuh:
// route_token sanitises them), so the op can be captured in a CUDA graph (with the Python
// wrapper's host-side index checks turned off, milora_ext.set_index_checks(False)).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdlib>
#include <cstring>

#include "checks.h"
#include "cuda/launch.h"
#include "cuda/lora_args.h"

namespace milora::cuda {
namespace {

// Tuning switches, read at each call (cheap) so benchmarks can flip them in-process.
int64_t decode_max_tokens() {
  const char* v = std::getenv("MILORA_DECODE_MAX_TOKENS");
  if (v == nullptr || *v == '\0') return kDecodeMaxTokens;
  const long long n = std::atoll(v);
  return n < 0 ? 0 : (n > kDecodeMaxTokens ? kDecodeMaxTokens : n);
}

bool env_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0 || std::strcmp(v, "false") == 0);
}

int decode_row_tiles() {
  const char* v = std::getenv("MILORA_DECODE_ROW_TILES");
  return v != nullptr && std::strcmp(v, "1") == 0 ? 1 : 2;
}

bool prefill_preinit() {
  const char* v = std::getenv("MILORA_PREFILL_EPILOGUE");
  return v == nullptr || std::strcmp(v, "rmw") != 0;
}

void check_launch(cudaError_t err) {
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gated_lora_linear_cuda(
    const at::Tensor& x,
    const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_a,
    const at::Tensor& lora_b,
    const at::Tensor& seq_offsets,
    const at::Tensor& adapter_ids,
    const at::Tensor& gates) {
  constexpr const char* op = "gated_lora_linear";
  const GatedLoraShape sh =
      check_gated_lora_args(op, x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates);
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(
      dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
      ": the CUDA kernels take float32, float16 or bfloat16 inputs, got ", dt, " (float64 runs on CPU only)");
  TORCH_CHECK_VALUE(
      sh.E <= kMaxExperts, op, ": the CUDA kernels support at most ", kMaxExperts,
      " experts per adapter, got E = ", sh.E, " (lora_a of shape ", lora_a.sizes(), ")");
  TORCH_CHECK_VALUE(
      sh.R <= kMaxRank, op, ": the CUDA kernels support LoRA rank R <= ", kMaxRank, ", got R = ", sh.R,
      " (lora_a of shape ", lora_a.sizes(), ")");
  TORCH_CHECK_VALUE(
      sh.T < INT_MAX && sh.S < INT_MAX && sh.P < INT_MAX && sh.N < (int64_t{1} << 22), op,
      ": the CUDA kernels support T, S, P < 2^31 and N < 2^22 (grid limits), got T = ", sh.T, ", S = ", sh.S,
      ", P = ", sh.P, ", N = ", sh.N);

  auto out_shape = x.sizes().vec();
  out_shape.back() = sh.N;
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  if (sh.T == 0) return at::empty(out_shape, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const PackedLora pk = pack_lora_args(sh, x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates);
  const LoraArgs& a = pk.args;
  const at::Tensor& x2 = pk.x;     // [T, K]
  const at::Tensor& w = pk.weight;  // [N, K]
  const void* bias_ptr = pk.bias_ptr;

  at::Tensor y;
  if (dt == at::kFloat) {
    y = at::linear(x2, w, bias).contiguous();                             // [T, N]
    check_launch(launch_shrink_simt(a, /*prefetch_b=*/false, stream));
    check_launch(launch_expand_simt(a, y.data_ptr(), stream));
  } else if (sh.T <= decode_max_tokens()) {
    check_launch(launch_shrink_simt(a, /*prefetch_b=*/true, stream));
    y = at::empty({sh.T, sh.N}, x.options());                             // [T, N]
    // PDL when asked for; the launcher also checks that the kernel's own code waits for it.
    const bool pdl = !env_off("MILORA_PDL");
    check_launch(launch_decode_fused(a, w.data_ptr(), bias_ptr, y.data_ptr(), decode_row_tiles(), pdl, stream));
  } else if (prefill_preinit()) {
    check_launch(launch_shrink_tc(a, stream));
    y = at::empty({sh.T, sh.N}, x.options());                             // [T, N]
    check_launch(launch_expand_tc(a, bias_ptr, y.data_ptr(), /*preinit=*/true, stream));
    y.addmm_(x2, w.t());                                                  // y += x W^T (cuBLAS, beta = 1)
  } else {
    y = at::linear(x2, w, bias).contiguous();                             // [T, N]
    check_launch(launch_shrink_tc(a, stream));
    check_launch(launch_expand_tc(a, bias_ptr, y.data_ptr(), /*preinit=*/false, stream));
  }
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(milora_ext, CUDA, m) {
  m.impl("gated_lora_linear", &gated_lora_linear_cuda);
}

}  // namespace milora::cuda
