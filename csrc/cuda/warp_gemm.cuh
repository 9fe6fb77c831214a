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
// 8 contiguous elements kc + 8q .. kc + 8q + 7 of each of its rows (kc: the chunk's first k):
//     elements 0,1 -> step 0 slots 2q,2q+1    elements 2,3 -> step 0 slots 2q+8,2q+9
//     elements 4,5 -> step 1 slots 2q,2q+1    elements 6,7 -> step 1 slots 2q+8,2q+9
// which is one 16-byte load per row and chunk, and a bijection between the 32 physical k
// and the 2 x 16 slots, the same for A and B (it depends on q only).
//
// Alignment. The 16-byte loads need every A row + kc + 8q on a 16-byte boundary. When the A
// rows are a weight whose rows start off the boundary (K % 8 != 0, or a view at an odd
// offset), the caller gives the warp rows that all start at the same offset from it and the
// chunks start at their first boundary (KChunks below): A keeps its 16-byte loads in every
// chunk but the two at the row ends, and B (x, small, its rows padded to 16 bytes) is read at
// the same k with two aligned loads and a shift.
//
// Accumulator layout (mma C fragment): acc[i][j][c] is C[16 i + g + 8 (c >> 1)][8 j + 2 q + (c & 1)].
#pragma once

#include "cuda/common.cuh"

namespace milora::cuda {

// The k range [0, K) of a row as chunks of 32: chunk c holds k0 + 32 c .. k0 + 32 c + 31.
// k0 = head - 32 when the rows start `head` (1..7) elements before a 16-byte boundary, so that
// lane q's 8 elements k0 + 32 c + 8 q .. + 7 are 16-byte aligned in every row (chunk 0 then
// holds the head, with k < 0 counting as zero); k0 = 0 otherwise. Chunks [fast_begin,
// fast_end) lie inside [0, K) entirely and need no bounds checks.
struct KChunks {
  int64_t k0, count, fast_begin, fast_end;
};

__host__ __device__ __forceinline__ KChunks k_chunks(int64_t K, int head) {
  KChunks c;
  c.k0 = head > 0 ? head - 32 : 0;
  c.count = (K - c.k0 + 31) / 32;
  c.fast_begin = c.k0 < 0 ? 1 : 0;
  const int64_t whole = (K - c.k0) / 32;  // chunks that end at or before K
  c.fast_end = whole > c.fast_begin ? whole : c.fast_begin;
  return c;
}

// MT m16 tiles (A rows) x NB n8 tiles (B rows). kStreamA: A is read once (a weight streamed
// from HBM) and bypasses L1. kShiftB: B may sit off the 16-byte grid of A (see run).
template <typename T, int MT, int NB, bool kStreamA, bool kShiftB = false>
struct WarpGemm {
  // Chunks in flight per lane: 4 while a lane has few 16-byte loads per chunk, fewer when
  // they (and their registers) grow; a shifted B costs two loads per row.
  __host__ __device__ static constexpr int unroll(bool shifted) {
    return 2 * MT + NB * (shifted ? 2 : 1) <= 4 ? 4 : (2 * MT + NB * (shifted ? 2 : 1) <= 12 ? 2 : 1);
  }

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

  // U chunks from c, all inside [0, K): every load a full 16 bytes (two for a shifted B).
  template <int U, bool kShifted>
  __device__ static __forceinline__ void fast_chunks(const T* const (&a_rows)[MT][2], const T* const (&b_rows)[NB],
                                                     int64_t c, int64_t k0, int b_shift, int q,
                                                     float (&acc)[MT][NB][4]) {
    uint4 a[U][MT][2];
    uint4 b[U][NB];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + (c + u) * 32 + 8 * q;
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) a[u][i][h] = kStreamA ? ldg16_stream(a_rows[i][h] + k) : ldg16(a_rows[i][h] + k);
      }
#pragma unroll
      for (int j = 0; j < NB; ++j) b[u][j] = kShifted ? ldg16_at(b_rows[j] + k, b_shift) : ldg16(b_rows[j] + k);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) mma_chunk(a[u], b[u], acc);
  }

  // Chunks [begin, end) of the fast range, kUnroll at a time, then one at a time.
  template <bool kShifted>
  __device__ static __forceinline__ void fast_range(const T* const (&a_rows)[MT][2], const T* const (&b_rows)[NB],
                                                    int64_t begin, int64_t end, int64_t k0, int b_shift, int q,
                                                    float (&acc)[MT][NB][4]) {
    constexpr int kUnroll = unroll(kShifted);
    int64_t c = begin;
    for (; c + kUnroll <= end; c += kUnroll) fast_chunks<kUnroll, kShifted>(a_rows, b_rows, c, k0, b_shift, q, acc);
    for (; c < end; ++c) fast_chunks<1, kShifted>(a_rows, b_rows, c, k0, b_shift, q, acc);
  }

  // A chunk that may reach outside [0, K): elements there are zero, loads bounds-checked.
  __device__ static __forceinline__ void checked_chunk(const T* const (&a_rows)[MT][2], const T* const (&b_rows)[NB],
                                                      int64_t c, int64_t k0, int64_t K, bool vec_a, bool vec_b,
                                                      int q, float (&acc)[MT][NB][4]) {
    const int64_t k = k0 + c * 32 + 8 * q;
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

  // Chunks [c_begin, c_end) of kc (k_chunks). a_rows[i][h]: this lane's A row 16 i + g + 8 h;
  // b_rows[j]: its B row 8 j + g (callers clamp rows past the end to a valid row and drop
  // those results).
  //   vec_a: every A row + k0 + 32 c + 8 q is 16-byte aligned (for k >= 0);
  //   vec_b, b_shift = 0: the same holds for B;
  //   vec_b, b_shift = m > 0 (kShiftB only): B rows + k0 + 32 c + 8 q lie m elements past a
  //     16-byte boundary (x read at the k of weight rows that start off the boundary) and B
  //     rows are padded to a multiple of 8 elements: two aligned loads and a shift;
  //   !vec_b: B is read with scalar loads.
  // Each operand keeps its 16-byte loads when only the other one is misaligned (a weight
  // stream must not fall back to 2-byte loads because of a small operand); a shifted B is
  // read element-wise only in the chunks that reach outside [0, K).
  __device__ static __forceinline__ void run(const T* const (&a_rows)[MT][2], const T* const (&b_rows)[NB],
                                             int64_t c_begin, int64_t c_end, const KChunks& kc, int64_t K,
                                             bool vec_a, bool vec_b, int b_shift, int q, float (&acc)[MT][NB][4]) {
    const bool fast = vec_a && vec_b;
    const int64_t fb = fast ? kc.fast_begin : c_end, fe = fast ? kc.fast_end : c_end;
    const int64_t mid_begin = c_begin > fb ? c_begin : fb;  // [mid_begin, mid_end): this warp's fast chunks
    const int64_t mid_end = c_end < fe ? c_end : fe;
    const bool vec_b_checked = vec_b && b_shift == 0;
    int64_t c = c_begin;
    for (; c < c_end && c < mid_begin; ++c) checked_chunk(a_rows, b_rows, c, kc.k0, K, vec_a, vec_b_checked, q, acc);
    if (mid_begin < mid_end) {
      if (kShiftB && b_shift != 0) {
        fast_range<kShiftB>(a_rows, b_rows, mid_begin, mid_end, kc.k0, b_shift, q, acc);
      } else {
        fast_range<false>(a_rows, b_rows, mid_begin, mid_end, kc.k0, 0, q, acc);
      }
      c = mid_end;
    }
    for (; c < c_end; ++c) checked_chunk(a_rows, b_rows, c, kc.k0, K, vec_a, vec_b_checked, q, acc);
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
