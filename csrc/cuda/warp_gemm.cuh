// The tensor-core core shared by the fused decode kernel and the prefill shrink kernel:
// one warp accumulates C[m, n] = sum_k A[m, k] * B[n, k] over a range of K, where both A
// and B are row-major with K contiguous (weight rows and x rows, x rows and lora_a rows),
// loading its mma fragments straight from global memory with 16-byte loads (no shared
// memory staging: every element is used by exactly one warp of the CTA).
//
// The k-permutation. mma.m16n8k16 wants, in lane (g = lane / 4, q = lane % 4), the A
// elements (rows g and g+8; k slots 2q, 2q+1, 2q+8, 2q+9) and the B elements (column g;
// the same k slots). A dot product does not care which physical k sits in which slot as
// long as A and B agree, so over a chunk of 32 physical k (two k16 steps) lane q takes the
// 8 contiguous elements k0 + 8q .. k0 + 8q + 7 of each of its rows:
//     elements 0,1 -> step 0 slots 2q,2q+1    elements 2,3 -> step 0 slots 2q+8,2q+9
//     elements 4,5 -> step 1 slots 2q,2q+1    elements 6,7 -> step 1 slots 2q+8,2q+9
// which is one 16-byte load per row and chunk, and a bijection between the 32 physical k
// and the 2 x 16 slots, the same for A and B (it depends on q only).
//
// Accumulator layout (mma C fragment): acc[i][j][c] is C[16 i + g + 8 (c >> 1)][8 j + 2 q + (c & 1)].
#pragma once

#include "cuda/common.cuh"

namespace milora::cuda {

// MT m16 tiles (A rows) x NB n8 tiles (B rows). kStreamA: A is read once (a weight streamed
// from HBM) and bypasses L1.
template <typename T, int MT, int NB, bool kStreamA>
struct WarpGemm {
  static constexpr int kLoads = 2 * MT + NB;               // 16-byte loads per lane per chunk
  static constexpr int kUnroll = kLoads <= 4 ? 4 : 2;      // chunks in flight per lane

  __device__ static __forceinline__ void mma_chunk(const uint4 (&a)[MT][2], const uint4 (&b)[NB],
                                                   float (&acc)[MT][NB][4]) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        // step 0: A regs (row g, slots 2q..), (row g+8, 2q..), (row g, 2q+8..), (row g+8, 2q+8..)
        mma16816<T>(acc[i][j], a[i][0].x, a[i][1].x, a[i][0].y, a[i][1].y, b[j].x, b[j].y);
        mma16816<T>(acc[i][j], a[i][0].z, a[i][1].z, a[i][0].w, a[i][1].w, b[j].z, b[j].w);
      }
    }
  }

  // Chunks [c_begin, c_end) of 32 k each. a_rows[i][h]: this lane's A row 16 i + g + 8 h;
  // b_rows[j]: its B row 8 j + g (callers clamp rows past the end to a valid row and drop
  // those results). vec_a / vec_b: all A / B rows 16-byte aligned and K % 8 == 0. Each
  // operand keeps its 16-byte loads when only the other one is misaligned (a weight stream
  // must not fall back to 2-byte loads because of a small operand).
  __device__ static __forceinline__ void run(const T* const (&a_rows)[MT][2], const T* const (&b_rows)[NB],
                                             int64_t c_begin, int64_t c_end, int64_t K, bool vec_a, bool vec_b,
                                             int q, float (&acc)[MT][NB][4]) {
    const int64_t full = vec_a && vec_b ? K / 32 : 0;  // chunks that need no bounds checks
    const int64_t fast_end = c_end < full ? c_end : full;
    int64_t c = c_begin;
    for (; c + kUnroll <= fast_end; c += kUnroll) {
      uint4 a[kUnroll][MT][2];
      uint4 b[kUnroll][NB];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = (c + u) * 32 + 8 * q;
#pragma unroll
        for (int i = 0; i < MT; ++i) {
#pragma unroll
          for (int h = 0; h < 2; ++h) a[u][i][h] = kStreamA ? ldg16_stream(a_rows[i][h] + k) : ldg16(a_rows[i][h] + k);
        }
#pragma unroll
        for (int j = 0; j < NB; ++j) b[u][j] = ldg16(b_rows[j] + k);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mma_chunk(a[u], b[u], acc);
    }
    for (; c < c_end; ++c) {  // the rest: fewer than kUnroll fast chunks, or checked ones
      const int64_t k = c * 32 + 8 * q;
      uint4 a[MT][2];
      uint4 b[NB];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) a[i][h] = load8<T, kStreamA>(a_rows[i][h], k, K, vec_a);
      }
#pragma unroll
      for (int j = 0; j < NB; ++j) b[j] = load8<T>(b_rows[j], k, K, vec_b);
      mma_chunk(a, b, acc);
    }
  }
};

// Deterministic sum of the accumulators of the NW warps of a CTA (a fixed tree: warp w
// adds warp w + NW/2, then w + NW/4, ...), left in smem as a row-major tile
// out[row * (NB * 8 + 1) + col] (padded by one float against bank conflicts), rows
// 0 .. 16 MT - 1, cols 0 .. 8 NB - 1. buf must hold reduce_floats<MT, NB, NW>() floats.
// Every thread of the CTA must call it; it ends with __syncthreads().
template <int MT, int NB, int NW>
__host__ __device__ constexpr int reduce_floats() {
  return (NW / 2) * MT * NB * 4 * 32 > 16 * MT * (NB * 8 + 1) ? (NW / 2) * MT * NB * 4 * 32
                                                                : 16 * MT * (NB * 8 + 1);
}

template <int MT, int NB, int NW>
__device__ __forceinline__ void cta_reduce(float (&acc)[MT][NB][4], float* buf, int warp, int lane) {
  static_assert(NW >= 2 && (NW & (NW - 1)) == 0, "NW must be a power of two");
  constexpr int kFrag = MT * NB * 4 * 32;
#pragma unroll
  for (int half = NW / 2; half >= 1; half /= 2) {
    if (warp >= half && warp < 2 * half) {
      float* dst = buf + (warp - half) * kFrag;
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NB; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) dst[((i * NB + j) * 4 + c) * 32 + lane] = acc[i][j][c];
    }
    __syncthreads();
    if (warp < half) {
      const float* src = buf + warp * kFrag;
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NB; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[i][j][c] += src[((i * NB + j) * 4 + c) * 32 + lane];
    }
    __syncthreads();
  }
  if (warp == 0) {
    constexpr int ld = NB * 8 + 1;
    const int g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NB; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) buf[(16 * i + g + 8 * (c >> 1)) * ld + 8 * j + 2 * q + (c & 1)] = acc[i][j][c];
  }
  __syncthreads();
}

}  // namespace milora::cuda
