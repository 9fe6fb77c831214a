// Host-side packing of the kernels' LoraArgs from the op's tensors: the one copy used by the
// CUDA dispatcher (gated_lora_linear_cuda.cpp) and by the CPU emulator's driver
// (tests/cuda_emulation/emu_ext.cpp), so that a new field is filled, and tested, in one place.
// ATen host code (never compiled by nvcc).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks.h"
#include "cuda/launch.h"

namespace milora::cuda {

// LoraArgs plus the tensors it points into (contiguous copies where the inputs were not,
// and the workspace), which must outlive the launches.
struct PackedLora {
  at::Tensor x;        // [T, K] contiguous, for cuBLAS
  at::Tensor x_rows;   // [T, ldx] what the kernels read: 16-byte aligned rows (x itself when it has them)
  at::Tensor weight;   // [N, K] contiguous
  at::Tensor bias;     // [N] contiguous, or undefined
  at::Tensor lora_a;   // [P, E, R, K] contiguous
  at::Tensor lora_b;   // [P, E, N, R] contiguous
  at::Tensor gates;    // [S, E] contiguous float32
  at::Tensor offsets;  // [S + 1] contiguous int32 / int64
  at::Tensor ids;      // [S] contiguous int32 / int64
  at::Tensor workspace;  // routes [T][2] int32, then U [T][E][R] float32
  LoraArgs args;
  const void* bias_ptr = nullptr;
};

inline DType to_dtype(at::ScalarType t) {
  return t == at::kFloat ? DType::kFloat32 : (t == at::kHalf ? DType::kFloat16 : DType::kBFloat16);
}

// sh: the validated shapes (check_gated_lora_args); T >= 1. workspace_fill: a value to fill
// the workspace with (the emulator uses NaN so that undefined reads show), else left
// uninitialised.
inline PackedLora pack_lora_args(
    const GatedLoraShape& sh, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& seq_offsets, const at::Tensor& adapter_ids,
    const at::Tensor& gates, std::optional<float> workspace_fill = std::nullopt) {
  PackedLora pk;
  // x is small next to the weight: when its rows are not all 16-byte aligned (a view at an
  // odd offset, or K * element size not a multiple of 16) it is copied into a fresh buffer
  // whose rows are padded to a multiple of 16 bytes, so every kernel keeps its 16-byte loads
  // for x (and the decode kernel reads x at any k of W with aligned loads, warp_gemm.cuh).
  // The padding is never used as data: it holds workspace_fill (NaN in the emulator) or garbage.
  const at::Tensor x2 = x.reshape({sh.T, sh.K}).contiguous();
  const int64_t vec = 16 / static_cast<int64_t>(x2.element_size());  // elements per 16 bytes
  const int64_t ldx = (sh.K + vec - 1) / vec * vec;
  if (ldx == sh.K && reinterpret_cast<uintptr_t>(x2.data_ptr()) % 16 == 0) {
    pk.x_rows = x2;
  } else {
    pk.x_rows = workspace_fill.has_value() ? at::full({sh.T, ldx}, *workspace_fill, x2.options())
                                           : at::empty({sh.T, ldx}, x2.options());
    pk.x_rows.narrow(1, 0, sh.K).copy_(x2);
  }
  // cuBLAS gets the unpadded x (a row-strided view of x_rows would do for cuBLAS, but ATen's
  // CPU bfloat16 linear, which the emulator's driver uses, reads the padding of such a view).
  pk.x = x2;
  pk.weight = weight.contiguous();
  pk.bias = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  pk.lora_a = lora_a.contiguous();
  pk.lora_b = lora_b.contiguous();
  pk.gates = gates.contiguous();
  pk.offsets = seq_offsets.contiguous();
  pk.ids = adapter_ids.contiguous();
  // Workspace: routes [T][2] int32, then U [T][E][R] float32 (16-byte aligned).
  const int64_t route_floats = (2 * sh.T + 3) / 4 * 4;
  const auto ws_opts = x.options().dtype(at::kFloat);
  const int64_t ws_size = route_floats + sh.T * sh.E * sh.R;
  pk.workspace = workspace_fill.has_value() ? at::full({ws_size}, *workspace_fill, ws_opts) : at::empty({ws_size}, ws_opts);

  LoraArgs& a = pk.args;
  a.dtype = to_dtype(x.scalar_type());
  a.x = pk.x_rows.data_ptr();
  a.ldx = ldx;
  a.lora_a = pk.lora_a.data_ptr();
  a.lora_b = pk.lora_b.data_ptr();
  a.gates = pk.gates.data_ptr<float>();
  a.routes = reinterpret_cast<int32_t*>(pk.workspace.data_ptr<float>());
  a.U = pk.workspace.data_ptr<float>() + route_floats;
  a.T = sh.T;
  a.K = sh.K;
  a.N = sh.N;
  a.E = sh.E;
  a.R = sh.R;
  a.idx.offsets = pk.offsets.data_ptr();
  a.idx.ids = pk.ids.data_ptr();
  a.idx.offsets64 = pk.offsets.scalar_type() == at::kLong;
  a.idx.ids64 = pk.ids.scalar_type() == at::kLong;
  a.idx.S = sh.S;
  a.idx.P = sh.P;
  pk.bias_ptr = pk.bias.defined() ? pk.bias.data_ptr() : nullptr;
  return pk;
}

}  // namespace milora::cuda
