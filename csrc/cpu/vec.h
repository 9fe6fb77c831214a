// A small fixed-width SIMD vector for the CPU LoRA kernels: loads from float / bfloat16 /
// half / double storage widen to the accumulation type (float32, or float64 for float64
// inputs), so every product and sum runs in the accumulation type.
//
// With AVX2 + FMA + F16C (the default `-march=native` build on x86-64) Vec<float> is one
// __m256; otherwise it is a plain array that the compiler vectorises as it can.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MILORA_CPU_AVX2 1
#endif

namespace milora::cpu {

// Portable W-lane vector of acc_t.
template <typename acc_t, int W>
struct VecGeneric {
  static constexpr int size = W;
  acc_t v[W];

  static VecGeneric zero() {
    VecGeneric r;
    for (int i = 0; i < W; ++i) r.v[i] = acc_t(0);
    return r;
  }
  static VecGeneric broadcast(acc_t a) {
    VecGeneric r;
    for (int i = 0; i < W; ++i) r.v[i] = a;
    return r;
  }
  template <typename T>
  static VecGeneric load(const T* p) {
    VecGeneric r;
    for (int i = 0; i < W; ++i) r.v[i] = static_cast<acc_t>(p[i]);
    return r;
  }
  // First n (< W) lanes from p, the rest zero; never reads past p + n.
  template <typename T>
  static VecGeneric load(const T* p, int n) {
    VecGeneric r;
    for (int i = 0; i < W; ++i) r.v[i] = i < n ? static_cast<acc_t>(p[i]) : acc_t(0);
    return r;
  }
  void store(acc_t* p) const {
    for (int i = 0; i < W; ++i) p[i] = v[i];
  }
  friend VecGeneric fma(const VecGeneric& a, const VecGeneric& b, const VecGeneric& c) {
    VecGeneric r;
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  friend VecGeneric operator*(const VecGeneric& a, const VecGeneric& b) {
    VecGeneric r;
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
  friend VecGeneric operator+(const VecGeneric& a, const VecGeneric& b) {
    VecGeneric r;
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  acc_t sum() const {
    acc_t s = acc_t(0);
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
  }
  // Lane j of the result is the sum of all lanes of acc[j].
  static VecGeneric transpose_sum(const VecGeneric* acc) {
    VecGeneric r;
    for (int j = 0; j < W; ++j) r.v[j] = acc[j].sum();
    return r;
  }
};

#ifdef MILORA_CPU_AVX2

struct VecAvx2 {
  static constexpr int size = 8;
  __m256 v;

  static VecAvx2 zero() { return {_mm256_setzero_ps()}; }
  static VecAvx2 broadcast(float a) { return {_mm256_set1_ps(a)}; }
  static VecAvx2 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static VecAvx2 load(const c10::BFloat16* p) {
    // bfloat16 is the top half of a float32: widen to 32 bits and shift.
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
  }
  static VecAvx2 load(const c10::Half* p) {
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
  friend VecAvx2 fma(const VecAvx2& a, const VecAvx2& b, const VecAvx2& c) {
    return {_mm256_fmadd_ps(a.v, b.v, c.v)};
  }
  friend VecAvx2 operator*(const VecAvx2& a, const VecAvx2& b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend VecAvx2 operator+(const VecAvx2& a, const VecAvx2& b) { return {_mm256_add_ps(a.v, b.v)}; }
  float sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
  }
  static VecAvx2 transpose_sum(const VecAvx2* a) {
    // Three rounds of pairwise horizontal adds, then fold the two 128-bit halves.
    const __m256 t0 = _mm256_hadd_ps(a[0].v, a[1].v);
    const __m256 t1 = _mm256_hadd_ps(a[2].v, a[3].v);
    const __m256 t2 = _mm256_hadd_ps(a[4].v, a[5].v);
    const __m256 t3 = _mm256_hadd_ps(a[6].v, a[7].v);
    const __m256 u0 = _mm256_hadd_ps(t0, t1);  // lanes: sums of a0..a3 (low half), a0..a3 (high half)
    const __m256 u1 = _mm256_hadd_ps(t2, t3);
    const __m256 lo = _mm256_permute2f128_ps(u0, u1, 0x20);
    const __m256 hi = _mm256_permute2f128_ps(u0, u1, 0x31);
    return {_mm256_add_ps(lo, hi)};
  }
};

template <typename acc_t>
struct VecSelect {
  using type = VecGeneric<acc_t, 4>;
};
template <>
struct VecSelect<float> {
  using type = VecAvx2;
};

#else

template <typename acc_t>
struct VecSelect {
  using type = VecGeneric<acc_t, 8>;
};

#endif

// The vector type the kernels use for accumulation type acc_t.
template <typename acc_t>
using Vec = typename VecSelect<acc_t>::type;

}  // namespace milora::cpu
