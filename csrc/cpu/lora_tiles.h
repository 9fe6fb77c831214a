// Register-tile micro-kernels of the CPU LoRA shrink and expand (see gated_lora_linear_cpu.cpp).
//
// Two shapes of each:
//   dot tiles    read A rows / B rows straight from the adapter (both contiguous along the
//                reduced dimension) and reduce across vector lanes at the end; no packing, so
//                they suit adapters with few tokens (decode), which are bound by reading A and B;
//   packed tiles read a float32 panel of A^T / B^T packed once per work item, and keep
//                MR tokens x (NVEC * lanes) outputs in registers, broadcasting one scalar per
//                token per step: GEMM-like throughput for adapters with many tokens (prefill).
#pragma once

#include <cstdint>

#include "cpu/vec.h"

namespace milora::cpu {

// y[0:n] += v[0:n], rounding once to y's dtype.
template <typename scalar_t, typename V>
inline void add_to_row(scalar_t* y, const V& v, int n) {
  using acc_t = std::remove_reference_t<decltype(v.sum())>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (n == V::size) {
      (v + V::load(y)).store(y);
      return;
    }
  }
  alignas(64) acc_t tmp[V::size];
  v.store(tmp);
  for (int j = 0; j < n; ++j) y[j] = static_cast<scalar_t>(static_cast<acc_t>(y[j]) + tmp[j]);
}

// out[i * out_stride + j] = dot(x_rows[i], a_rows[j]) over K, for TM tokens x TJ rank rows.
template <int TM, int TJ, typename scalar_t, typename acc_t>
void dot_tile(const scalar_t* const* x_rows, const scalar_t* const* a_rows, int64_t K, acc_t* out, int64_t out_stride) {
  using V = Vec<acc_t>;
  V acc[TM][TJ];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TJ; ++j) acc[i][j] = V::zero();
  int64_t k = 0;
  for (; k + V::size <= K; k += V::size) {
    V xv[TM];
    for (int i = 0; i < TM; ++i) xv[i] = V::load(x_rows[i] + k);
    for (int j = 0; j < TJ; ++j) {
      const V av = V::load(a_rows[j] + k);
      for (int i = 0; i < TM; ++i) acc[i][j] = fma(xv[i], av, acc[i][j]);
    }
  }
  if (k < K) {
    const int rem = static_cast<int>(K - k);
    V xv[TM];
    for (int i = 0; i < TM; ++i) xv[i] = V::load(x_rows[i] + k, rem);
    for (int j = 0; j < TJ; ++j) {
      const V av = V::load(a_rows[j] + k, rem);
      for (int i = 0; i < TM; ++i) acc[i][j] = fma(xv[i], av, acc[i][j]);
    }
  }
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TJ; ++j) out[i * out_stride + j] = acc[i][j].sum();
}

template <typename scalar_t, typename acc_t>
void dot_tile_any(int tm, int tj, const scalar_t* const* xr, const scalar_t* const* ar, int64_t K, acc_t* out, int64_t stride) {
  switch (tm * 4 + tj) {
    case 1 * 4 + 1: return dot_tile<1, 1>(xr, ar, K, out, stride);
    case 1 * 4 + 2: return dot_tile<1, 2>(xr, ar, K, out, stride);
    case 2 * 4 + 1: return dot_tile<2, 1>(xr, ar, K, out, stride);
    case 2 * 4 + 2: return dot_tile<2, 2>(xr, ar, K, out, stride);
    case 3 * 4 + 1: return dot_tile<3, 1>(xr, ar, K, out, stride);
    case 3 * 4 + 2: return dot_tile<3, 2>(xr, ar, K, out, stride);
    case 4 * 4 + 1: return dot_tile<4, 1>(xr, ar, K, out, stride);
    default: return dot_tile<4, 2>(xr, ar, K, out, stride);
  }
}

// Tokens per packed tile: MR x NVEC accumulators plus NVEC panel loads and one broadcast
// fit the 16 AVX2 registers at MR = 6, NVEC = 2.
constexpr int kPackedRows = 6;

// out[i][0 : NVEC*lanes] = gate[i] * sum_k x_rows[i][k] * panel[k][0 : NVEC*lanes]
// panel: [K][ld] float32 (A^T for a block of rank rows, zero beyond R).
template <int MR, int NVEC, typename scalar_t, typename acc_t>
void packed_shrink_tile(const scalar_t* const* x_rows, const acc_t* gate, const acc_t* panel, int64_t ld, int64_t K,
                        acc_t* const* out) {
  using V = Vec<acc_t>;
  V acc[MR][NVEC];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NVEC; ++v) acc[i][v] = V::zero();
  for (int64_t k = 0; k < K; ++k) {
    V a[NVEC];
    for (int v = 0; v < NVEC; ++v) a[v] = V::load(panel + k * ld + v * V::size);
    for (int i = 0; i < MR; ++i) {
      const V xb = V::broadcast(static_cast<acc_t>(x_rows[i][k]));
      for (int v = 0; v < NVEC; ++v) acc[i][v] = fma(xb, a[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    const V g = V::broadcast(gate[i]);
    for (int v = 0; v < NVEC; ++v) (acc[i][v] * g).store(out[i] + v * V::size);
  }
}

template <int NVEC, typename scalar_t, typename acc_t>
void packed_shrink_any(int mr, const scalar_t* const* xr, const acc_t* gate, const acc_t* panel, int64_t ld, int64_t K,
                       acc_t* const* out) {
  switch (mr) {
    case 1: return packed_shrink_tile<1, NVEC>(xr, gate, panel, ld, K, out);
    case 2: return packed_shrink_tile<2, NVEC>(xr, gate, panel, ld, K, out);
    case 3: return packed_shrink_tile<3, NVEC>(xr, gate, panel, ld, K, out);
    case 4: return packed_shrink_tile<4, NVEC>(xr, gate, panel, ld, K, out);
    case 5: return packed_shrink_tile<5, NVEC>(xr, gate, panel, ld, K, out);
    default: return packed_shrink_tile<6, NVEC>(xr, gate, panel, ld, K, out);
  }
}

// y_rows[i][0 : n_valid] += sum over active experts e, r < R of u_rows[i][e * Rpad + r] * panels[e][r][0 : ...]
// panels[e]: [Rpad][ld] float32 (B^T for a chunk of columns, zero beyond the chunk), already
// offset to this tile's first column.
template <int MR, int NVEC, typename scalar_t, typename acc_t>
void packed_expand_tile(const acc_t* const* u_rows, const int64_t* experts, int64_t num_experts,
                        const acc_t* const* panels, int64_t ld, int64_t R, int64_t Rpad, scalar_t* const* y_rows,
                        int n_valid) {
  using V = Vec<acc_t>;
  V acc[MR][NVEC];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NVEC; ++v) acc[i][v] = V::zero();
  for (int64_t q = 0; q < num_experts; ++q) {
    const int64_t e = experts[q];
    const acc_t* panel = panels[e];
    for (int64_t r = 0; r < R; ++r) {
      V b[NVEC];
      for (int v = 0; v < NVEC; ++v) b[v] = V::load(panel + r * ld + v * V::size);
      for (int i = 0; i < MR; ++i) {
        const V ub = V::broadcast(u_rows[i][e * Rpad + r]);
        for (int v = 0; v < NVEC; ++v) acc[i][v] = fma(ub, b[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NVEC; ++v) {
      const int n = n_valid - v * V::size;
      if (n > 0) add_to_row(y_rows[i] + v * V::size, acc[i][v], n < V::size ? n : V::size);
    }
}

template <int NVEC, typename scalar_t, typename acc_t>
void packed_expand_any(int mr, const acc_t* const* u_rows, const int64_t* experts, int64_t num_experts,
                       const acc_t* const* panels, int64_t ld, int64_t R, int64_t Rpad, scalar_t* const* y_rows,
                       int n_valid) {
  switch (mr) {
    case 1: return packed_expand_tile<1, NVEC>(u_rows, experts, num_experts, panels, ld, R, Rpad, y_rows, n_valid);
    case 2: return packed_expand_tile<2, NVEC>(u_rows, experts, num_experts, panels, ld, R, Rpad, y_rows, n_valid);
    case 3: return packed_expand_tile<3, NVEC>(u_rows, experts, num_experts, panels, ld, R, Rpad, y_rows, n_valid);
    case 4: return packed_expand_tile<4, NVEC>(u_rows, experts, num_experts, panels, ld, R, Rpad, y_rows, n_valid);
    case 5: return packed_expand_tile<5, NVEC>(u_rows, experts, num_experts, panels, ld, R, Rpad, y_rows, n_valid);
    default: return packed_expand_tile<6, NVEC>(u_rows, experts, num_experts, panels, ld, R, Rpad, y_rows, n_valid);
  }
}

}  // namespace milora::cpu
