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

#if MILORA_ISA_LEVEL == 1 || MILORA_ISA_LEVEL == 2
// bfloat16 inputs without vdpbf16ps. A 32-bit word holding bfloat16 k and k + 1 widens to two
// float32 vectors by one integer op each: a shift left by 16 (value k) and a mask of the low
// half (value k + 1). x and A split the same way, so the products of k and of k + 1 meet in
// the same lane and one accumulator takes both: a dot product does not care in which lane a
// term is added. That is one integer op per widened vector, where the generic widening load
// spends a zero-extending move (port 5) and a shift.
#if MILORA_ISA_LEVEL == 2
struct Bf16Pairs {
  static constexpr int values = 32;  // bfloat16 per load
  using V = __m512;
  static V lo(__m512i w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); }
  static V hi(__m512i w) { return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xFFFF0000u)))); }
  static __m512i load(const bf16_t* p) { return _mm512_loadu_si512(p); }
  static V zero() { return _mm512_setzero_ps(); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#else
struct Bf16Pairs {
  static constexpr int values = 16;
  using V = __m256;
  static V lo(__m256i w) { return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)); }
  static V hi(__m256i w) { return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(int(0xFFFF0000u)))); }
  static __m256i load(const bf16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static V zero() { return _mm256_setzero_ps(); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) { return VecAvx2{v}.sum(); }
};
#endif

template <int TM, int TJ>
void dot_tile(const bf16_t* const* x_rows, const bf16_t* const* a_rows, int64_t K, float* out, int64_t out_stride) {
  using P = Bf16Pairs;
  typename P::V acc[TM][TJ];
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TJ; ++j) acc[i][j] = P::zero();
  int64_t k = 0;
  for (; k + P::values <= K; k += P::values) {
    // A's rows split once per step (2 TJ registers); each token's x split as it is used, so
    // 16 AVX2 registers hold the tile (TM = 4, TJ = 2: 8 sums + 4 A halves + 2 x halves).
    typename P::V alo[TJ], ahi[TJ];
    for (int j = 0; j < TJ; ++j) {
      __builtin_prefetch(reinterpret_cast<const char*>(a_rows[j] + k) + kPrefetchAhead, 0, 3);
      const auto w = P::load(a_rows[j] + k);
      alo[j] = P::lo(w);
      ahi[j] = P::hi(w);
    }
    for (int i = 0; i < TM; ++i) {
      const auto w = P::load(x_rows[i] + k);
      const typename P::V xlo = P::lo(w), xhi = P::hi(w);
      for (int j = 0; j < TJ; ++j) acc[i][j] = P::fma(xhi, ahi[j], P::fma(xlo, alo[j], acc[i][j]));
    }
  }
  float tail[TM][TJ] = {};
  for (; k < K; ++k)
    for (int i = 0; i < TM; ++i)
      for (int j = 0; j < TJ; ++j) tail[i][j] += widen(x_rows[i][k]) * widen(a_rows[j][k]);
  for (int i = 0; i < TM; ++i)
    for (int j = 0; j < TJ; ++j) out[i * out_stride + j] = P::sum(acc[i][j]) + tail[i][j];
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

// dst[c * dst_ld + r] = widen(src[r * src_ld + c]) for r < rows, c < cols, and 0 for
// rows <= r < dst_ld (the panel's padding, written here so it never holds another tenant's
// values): the float32 panels of the packed tiles (A^T and B^T) from the adapter as stored. With AVX2, 8 x 8 blocks of
// 32-bit words go through registers (a float32 value, or a pair of bfloat16 split as in the
// dot tiles); the rest, and other storage types, element by element.
#if MILORA_ISA_LEVEL >= 1
inline void transpose8x8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Rows [0, rows8) (a multiple of 8) x the leading columns in blocks; returns the columns done.
inline int64_t pack_transposed_blocks(const float* src, int64_t src_ld, int64_t rows8, int64_t cols, float* dst, int64_t dst_ld) {
  const int64_t cols8 = cols / 8 * 8;
  for (int64_t r0 = 0; r0 < rows8; r0 += 8)
    for (int64_t c0 = 0; c0 < cols8; c0 += 8) {
      __m256 v[8];
      for (int q = 0; q < 8; ++q) v[q] = _mm256_loadu_ps(src + (r0 + q) * src_ld + c0);
      transpose8x8(v);
      for (int m = 0; m < 8; ++m) _mm256_storeu_ps(dst + (c0 + m) * dst_ld + r0, v[m]);
    }
  return cols8;
}

inline int64_t pack_transposed_blocks(const bf16_t* src, int64_t src_ld, int64_t rows8, int64_t cols, float* dst, int64_t dst_ld) {
  const int64_t cols16 = cols / 16 * 16;
  const __m256i hi_mask = _mm256_set1_epi32(int(0xFFFF0000u));
  for (int64_t r0 = 0; r0 < rows8; r0 += 8)
    for (int64_t c0 = 0; c0 < cols16; c0 += 16) {
      __m256 v[8];  // word m of a row: bfloat16 c0 + 2m (low half) and c0 + 2m + 1 (high half)
      for (int q = 0; q < 8; ++q) v[q] = _mm256_loadu_ps(reinterpret_cast<const float*>(src + (r0 + q) * src_ld + c0));
      transpose8x8(v);
      for (int m = 0; m < 8; ++m) {
        const __m256i w = _mm256_castps_si256(v[m]);
        _mm256_storeu_ps(dst + (c0 + 2 * m) * dst_ld + r0, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
        _mm256_storeu_ps(dst + (c0 + 2 * m + 1) * dst_ld + r0, _mm256_castsi256_ps(_mm256_and_si256(w, hi_mask)));
      }
    }
  return cols16;
}
#endif

// Storage types without a block path: nothing done by blocks.
template <typename scalar_t, typename acc_t>
int64_t pack_transposed_blocks(const scalar_t*, int64_t, int64_t, int64_t, acc_t*, int64_t) {
  return 0;
}

template <typename scalar_t, typename acc_t>
void pack_transposed(const scalar_t* src, int64_t src_ld, int64_t rows, int64_t cols, acc_t* dst, int64_t dst_ld) {
  const int64_t rows_done = MILORA_ISA_LEVEL >= 1 ? rows / 8 * 8 : 0;
  const int64_t cols_done = rows_done > 0 ? pack_transposed_blocks(src, src_ld, rows_done, cols, dst, dst_ld) : 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < rows_done ? cols_done : 0; c < cols; ++c) dst[c * dst_ld + r] = widen(src[r * src_ld + c]);
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = rows; r < dst_ld; ++r) dst[c * dst_ld + r] = acc_t(0);
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
  // The y rows this tile adds to (one per token, a row of N apart): fetched while the
  // multiply-adds run, instead of stalling the epilogue on each row.
  const bool two_lines = n_valid * sizeof(scalar_t) > 64;
  for (int i = 0; i < MR; ++i) {
    __builtin_prefetch(y_rows[i], 1, 3);
    if (two_lines) __builtin_prefetch(y_rows[i] + n_valid - 1, 1, 3);
  }
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
