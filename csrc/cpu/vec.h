// Fixed-width SIMD vectors of the CPU LoRA kernels, one set per instruction-set level.
// Included only by cpu/lora_kernels.h, inside namespace milora::cpu::MILORA_ISA_NS, so every
// level's copy of these inline functions has its own symbols (see cpu/isa.h).
//
// Loads from float / bfloat16 / half / double storage widen to the accumulation type (float32,
// or float64 for float64 inputs); every product and sum runs in the accumulation type, and a
// result is rounded once when it is added to an output row.
//
//   MILORA_ISA_LEVEL 0: VecGeneric (plain arrays the compiler vectorises as it can)
//   MILORA_ISA_LEVEL 1: VecAvx2, 8 floats in a __m256 (AVX2 + FMA + F16C)
//   MILORA_ISA_LEVEL 2: Vec512, 16 floats in a __m512 (AVX-512 F/BW/VL/DQ)
//   MILORA_ISA_LEVEL 3: Vec512 with AVX-512-BF16 conversions
// float64 accumulation always uses VecGeneric (vectorised by the compiler at each level).

// ---- scalar conversions ------------------------------------------------------------------

inline float half_to_float(uint16_t h) {
#if MILORA_ISA_LEVEL >= 1
  return _cvtsh_ss(h);
#else
  // IEEE binary16 -> binary32 (exact), as in the FP16 library c10 uses.
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  float exp_scale;
  const uint32_t scale_bits = 0x7800000u;
  std::memcpy(&exp_scale, &scale_bits, 4);
  uint32_t nbits = (two_w >> 4) + exp_offset;
  float normalized;
  std::memcpy(&normalized, &nbits, 4);
  normalized *= exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  uint32_t dbits = (two_w >> 17) | magic_mask;
  float denormalized;
  std::memcpy(&denormalized, &dbits, 4);
  denormalized -= magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  uint32_t out;
  if (two_w < denormalized_cutoff) {
    std::memcpy(&out, &denormalized, 4);
  } else {
    std::memcpy(&out, &normalized, 4);
  }
  out |= sign;
  float f;
  std::memcpy(&f, &out, 4);
  return f;
#endif
}

inline uint16_t float_to_half(float f) {
#if MILORA_ISA_LEVEL >= 1
  return static_cast<uint16_t>(_cvtss_sh(f, 0));  // round to nearest even
#else
  // IEEE binary32 -> binary16, round to nearest even (the FP16 library's algorithm).
  float scale_to_inf, scale_to_zero;
  const uint32_t inf_bits = 0x77800000u, zero_bits = 0x08800000u;
  std::memcpy(&scale_to_inf, &inf_bits, 4);
  std::memcpy(&scale_to_zero, &zero_bits, 4);
  const float af = f < 0 ? -f : f;
  float base = (af * scale_to_inf) * scale_to_zero;
  uint32_t w;
  std::memcpy(&w, &f, 4);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  const uint32_t bias_bits = (bias >> 1) + 0x07800000u;
  float bias_f;
  std::memcpy(&bias_f, &bias_bits, 4);
  base = bias_f + base;
  uint32_t bits;
  std::memcpy(&bits, &base, 4);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (f != f) return 0x7FC0;  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(bf16_t v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float widen(f16_t v) { return half_to_float(v.bits); }

inline void narrow_to(float v, float* p) { *p = v; }
inline void narrow_to(double v, double* p) { *p = v; }
inline void narrow_to(float v, bf16_t* p) { p->bits = float_to_bf16(v); }
inline void narrow_to(float v, f16_t* p) { p->bits = float_to_half(v); }

// ---- portable vector -----------------------------------------------------------------------

template <typename acc_t, int W>
struct VecGeneric {
  static constexpr int size = W;
  acc_t v[W];

  static VecGeneric zero() { return broadcast(acc_t(0)); }
  static VecGeneric broadcast(acc_t a) {
    VecGeneric r;
    for (int i = 0; i < W; ++i) r.v[i] = a;
    return r;
  }
  template <typename T>
  static VecGeneric load(const T* p) {
    VecGeneric r;
    for (int i = 0; i < W; ++i) r.v[i] = widen(p[i]);
    return r;
  }
  // First n (< W) lanes from p, the rest zero; never reads past p + n.
  template <typename T>
  static VecGeneric load(const T* p, int n) {
    VecGeneric r;
    for (int i = 0; i < W; ++i) r.v[i] = i < n ? static_cast<acc_t>(widen(p[i])) : acc_t(0);
    return r;
  }
  void store(acc_t* p) const {
    for (int i = 0; i < W; ++i) p[i] = v[i];
  }
  // y[0:n] += this, rounding once to y's dtype.
  template <typename T>
  void add_to(T* y, int n) const {
    for (int i = 0; i < n; ++i) narrow_to(static_cast<acc_t>(widen(y[i]) + v[i]), y + i);
  }
  acc_t sum() const {
    acc_t s = acc_t(0);
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
  }
  // Lane j of the result is the sum of all lanes of a[j].
  static VecGeneric transpose_sum(const VecGeneric* a) {
    VecGeneric r;
    for (int j = 0; j < W; ++j) r.v[j] = a[j].sum();
    return r;
  }
};

// (Free functions, not in-class friends: GCC does not apply `#pragma GCC target` to those.)
template <typename acc_t, int W>
inline VecGeneric<acc_t, W> fma(const VecGeneric<acc_t, W>& a, const VecGeneric<acc_t, W>& b, const VecGeneric<acc_t, W>& c) {
  VecGeneric<acc_t, W> r;
  for (int i = 0; i < W; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
  return r;
}

#if MILORA_ISA_LEVEL >= 1

// Lane j of the result is the sum of the 8 lanes of a[j].
inline __m256 transpose_sum8(const __m256* a) {
  // Three rounds of pairwise horizontal adds, then fold the two 128-bit halves.
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]);
  const __m256 t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]);
  const __m256 t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  const __m256 lo = _mm256_permute2f128_ps(u0, u1, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(u0, u1, 0x31);
  return _mm256_add_ps(lo, hi);
}

// 8 float32 -> 8 bfloat16, round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16).
inline __m128i bf16_from_ps(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_packus_epi32(r, r);  // 16-bit lanes 0-3 | 0-3 | 4-7 | 4-7 per 128
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

struct VecAvx2 {
  static constexpr int size = 8;
  __m256 v;

  static VecAvx2 zero() { return {_mm256_setzero_ps()}; }
  static VecAvx2 broadcast(float a) { return {_mm256_set1_ps(a)}; }
  static VecAvx2 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static VecAvx2 load(const bf16_t* p) {
    // bfloat16 is the top half of a float32: widen to 32 bits and shift.
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
  }
  static VecAvx2 load(const f16_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  template <typename T>
  static VecAvx2 load(const T* p, int n) {
    T tmp[8];
    std::memset(static_cast<void*>(tmp), 0, sizeof(tmp));
    std::memcpy(static_cast<void*>(tmp), p, sizeof(T) * n);
    return load(static_cast<const T*>(tmp));
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void add_to(float* y, int n) const {
    if (n == size) {
      _mm256_storeu_ps(y, _mm256_add_ps(v, _mm256_loadu_ps(y)));
      return;
    }
    alignas(32) float tmp[8];
    store(tmp);
    for (int i = 0; i < n; ++i) y[i] += tmp[i];
  }
  void add_to(bf16_t* y, int n) const {
    if (n == size) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y), bf16_from_ps(_mm256_add_ps(v, load(y).v)));
      return;
    }
    alignas(32) float tmp[8];
    store(tmp);
    for (int i = 0; i < n; ++i) narrow_to(widen(y[i]) + tmp[i], y + i);
  }
  void add_to(f16_t* y, int n) const {
    if (n == size) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y), _mm256_cvtps_ph(_mm256_add_ps(v, load(y).v), _MM_FROUND_TO_NEAREST_INT));
      return;
    }
    alignas(32) float tmp[8];
    store(tmp);
    for (int i = 0; i < n; ++i) narrow_to(widen(y[i]) + tmp[i], y + i);
  }
  float sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
  }
  static VecAvx2 transpose_sum(const VecAvx2* a) {
    __m256 r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j].v;
    return {transpose_sum8(r)};
  }
};

inline VecAvx2 fma(const VecAvx2& a, const VecAvx2& b, const VecAvx2& c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }

#endif  // MILORA_ISA_LEVEL >= 1

#if MILORA_ISA_LEVEL >= 2

inline __mmask16 first_lanes(int n) { return static_cast<__mmask16>((1u << n) - 1u); }

// 16 float32 -> 16 bfloat16, round to nearest even.
inline __m256i bf16_from_ps(__m512 v) {
#if MILORA_ISA_LEVEL >= 3
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
#endif
}

struct Vec512 {
  static constexpr int size = 16;
  __m512 v;

  static Vec512 zero() { return {_mm512_setzero_ps()}; }
  static Vec512 broadcast(float a) { return {_mm512_set1_ps(a)}; }
  static Vec512 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec512 load(const bf16_t* p) { return from_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static Vec512 load(const f16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
  // Masked loads never touch memory past p + n.
  static Vec512 load(const float* p, int n) { return {_mm512_maskz_loadu_ps(first_lanes(n), p)}; }
  static Vec512 load(const bf16_t* p, int n) { return from_bf16(_mm256_maskz_loadu_epi16(first_lanes(n), p)); }
  static Vec512 load(const f16_t* p, int n) { return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(n), p))}; }
  static Vec512 from_bf16(__m256i h) { return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void add_to(float* y, int n) const {
    if (n == size) {
      _mm512_storeu_ps(y, _mm512_add_ps(v, _mm512_loadu_ps(y)));
    } else {
      _mm512_mask_storeu_ps(y, first_lanes(n), _mm512_add_ps(v, load(y, n).v));
    }
  }
  void add_to(bf16_t* y, int n) const {
    if (n == size) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), bf16_from_ps(_mm512_add_ps(v, load(y).v)));
    } else {
      _mm256_mask_storeu_epi16(y, first_lanes(n), bf16_from_ps(_mm512_add_ps(v, load(y, n).v)));
    }
  }
  void add_to(f16_t* y, int n) const {
    const __m256i h = _mm512_cvtps_ph(_mm512_add_ps(v, load(y, n).v), _MM_FROUND_TO_NEAREST_INT);
    _mm256_mask_storeu_epi16(y, first_lanes(n), h);
  }
  float sum() const { return _mm512_reduce_add_ps(v); }
  static Vec512 transpose_sum(const Vec512* a) {
    // Fold each vector to 8 lanes, then two 8 x 8 transposed sums.
    __m256 h[16];
    for (int j = 0; j < 16; ++j)
      h[j] = _mm256_add_ps(_mm512_castps512_ps256(a[j].v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[j].v), 1)));
    const __m256 lo = transpose_sum8(h), hi = transpose_sum8(h + 8);
    return {_mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1))};
  }
};

inline Vec512 fma(const Vec512& a, const Vec512& b, const Vec512& c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }

#endif  // MILORA_ISA_LEVEL >= 2

template <typename acc_t>
struct VecSelect {
  using type = VecGeneric<acc_t, 4>;
};
template <>
struct VecSelect<float> {
#if MILORA_ISA_LEVEL >= 2
  using type = Vec512;
#elif MILORA_ISA_LEVEL >= 1
  using type = VecAvx2;
#else
  using type = VecGeneric<float, 8>;
#endif
};

// The vector type of the kernels for accumulation type acc_t.
template <typename acc_t>
using Vec = typename VecSelect<acc_t>::type;
