// Register-tile micro-kernels of the CPU LoRA shrink and expand. Included only by
// cpu/lora_kernels.h, inside namespace milora::cpu::MILORA_ISA_NS (one copy per ISA level).
//
// Two shapes of each:
//   dot tiles    read A rows / B rows straight from the adapter (both contiguous along the
//                reduced dimension) and reduce across vector lanes at the end; no packing, so
//                they suit adapters with few tokens (decode), which are bound by reading A and B;
//   packed tiles read a float32 panel of A^T / B^T packed once per work item, and keep
//                MR tokens x (NVEC * lanes) outputs in registers, broadcasting one scalar per
//                token per step: GEMM-like throughput for adapters with many tokens (prefill).

// Dot tiles stream A rows from memory (decode: the adapter is cold, each row read once): each
// step also asks for the row's line kPrefetchAhead bytes on, so a row's misses overlap instead
// of waiting for the hardware prefetcher to notice a short stream. Prefetches never fault.
constexpr int64_t kPrefetchAhead = 1024;

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
    for (int j = 0; j < TJ; ++j) __builtin_prefetch(reinterpret_cast<const char*>(a_rows[j] + k) + kPrefetchAhead, 0, 3);
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

#if MILORA_ISA_LEVEL >= 3
// bfloat16 inputs with AVX-512-BF16: vdpbf16ps multiplies pairs of bfloat16 exactly and adds
// them into float32 lanes, 32 products per instruction and no widening of x or A.
template <int TM, int TJ>
void dot_tile(const bf16_t* const* x_rows, const bf16_t* const* a_rows, int64_t K, float* out, int64_t out_stride) {
  __m512 acc[TM][TJ];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TJ; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh xv[TM];
    for (int i = 0; i < TM; ++i) xv[i] = (__m512bh)_mm512_loadu_si512(x_rows[i] + k);
    for (int j = 0; j < TJ; ++j) __builtin_prefetch(reinterpret_cast<const char*>(a_rows[j] + k) + kPrefetchAhead, 0, 3);
    for (int j = 0; j < TJ; ++j) {
      const __m512bh av = (__m512bh)_mm512_loadu_si512(a_rows[j] + k);
      for (int i = 0; i < TM; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[i], av);
    }
  }
  if (k < K) {
    const __mmask32 m = static_cast<__mmask32>((uint64_t(1) << (K - k)) - 1);  // lanes past K read as 0
    __m512bh xv[TM];
    for (int i = 0; i < TM; ++i) xv[i] = (__m512bh)_mm512_maskz_loadu_epi16(m, x_rows[i] + k);
    for (int j = 0; j < TJ; ++j) {
      const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(m, a_rows[j] + k);
      for (int i = 0; i < TM; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[i], av);
    }
  }
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TJ; ++j) out[i * out_stride + j] = _mm512_reduce_add_ps(acc[i][j]);
}
#endif

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

// out[i][0 : NVEC*lanes] = sum_k x_rows[i][k] * panel[k][0 : NVEC*lanes]
// panel: [K][ld] float32 (A^T for a block of rank rows, zero beyond R).
template <int MR, int NVEC, typename scalar_t, typename acc_t>
void packed_shrink_tile(const scalar_t* const* x_rows, const acc_t* panel, int64_t ld, int64_t K, acc_t* const* out) {
  using V = Vec<acc_t>;
  V acc[MR][NVEC];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NVEC; ++v) acc[i][v] = V::zero();
  for (int64_t k = 0; k < K; ++k) {
    V a[NVEC];
    for (int v = 0; v < NVEC; ++v) a[v] = V::load(panel + k * ld + v * V::size);
    for (int i = 0; i < MR; ++i) {
      const V xb = V::broadcast(widen(x_rows[i][k]));
      for (int v = 0; v < NVEC; ++v) acc[i][v] = fma(xb, a[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NVEC; ++v) acc[i][v].store(out[i] + v * V::size);
}

template <int NVEC, typename scalar_t, typename acc_t>
void packed_shrink_any(int mr, const scalar_t* const* xr, const acc_t* panel, int64_t ld, int64_t K, acc_t* const* out) {
  switch (mr) {
    case 1: return packed_shrink_tile<1, NVEC>(xr, panel, ld, K, out);
    case 2: return packed_shrink_tile<2, NVEC>(xr, panel, ld, K, out);
    case 3: return packed_shrink_tile<3, NVEC>(xr, panel, ld, K, out);
    case 4: return packed_shrink_tile<4, NVEC>(xr, panel, ld, K, out);
    case 5: return packed_shrink_tile<5, NVEC>(xr, panel, ld, K, out);
    default: return packed_shrink_tile<6, NVEC>(xr, panel, ld, K, out);
  }
}

// y_rows[i][0 : n_valid] += sum over active experts e, r < R of u_rows[i][e * Rpad + r] * panels[e][r][0 : ...]
// panels[e]: [R][ld] float32 (B^T for a chunk of columns, zero beyond the chunk), already
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
      if (n > 0) acc[i][v].add_to(y_rows[i] + v * V::size, n < V::size ? n : V::size);
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
