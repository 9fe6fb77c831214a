// The CPU LoRA work items (shrink and expand, dot and packed), compiled once per ISA level by
// cpu/isa_<level>.cpp, which defines before including this file:
//   MILORA_ISA_NS     the namespace of that level's copy (milora::cpu::MILORA_ISA_NS)
//   MILORA_ISA_LEVEL  0 default, 1 AVX2, 2 AVX-512, 3 AVX-512-BF16, 4 AMX (selects the vector types)
//   MILORA_ISA_TABLE  the name of the function that returns the level's kernel table
// and switches the compiler's target for the rest of the unit. Only <cstdint>, <cstring>,
// <immintrin.h> and plain-data headers are included here: no standard-library or c10 inline
// function may be compiled with a level's instructions (cpu/isa.h).
#include <cstdint>
#include <cstring>

#if MILORA_ISA_LEVEL >= 1
#if defined(__GNUC__) && !defined(__clang__)
// GCC's own intrinsic headers self-initialise undefined vectors (`__m512i __Y = __Y;`).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
#endif

#include "cpu/isa.h"

namespace milora::cpu::MILORA_ISA_NS {

#include "cpu/vec.h"
#include "cpu/lora_tiles.h"

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t round_up64(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

template <typename S, typename A>
void shrink_dot(const ShrinkJob<S, A>& j) {
  const int64_t e = j.experts[0], K = j.K, klen = j.k1 - j.k0;
  const S* a_rows = j.a + e * j.R * K + j.k0;
  A dots[4 * 2];
  for (int64_t i = j.i0; i < j.i1; i += 4) {
    const int tm = static_cast<int>(min64(4, j.i1 - i));
    const S* xr[4];
    A* out[4];
    for (int q = 0; q < tm; ++q) {
      xr[q] = j.x + j.tokens[i + q] * K + j.k0;
      out[q] = j.out + (j.tokens[i + q] * j.E + e) * j.Rpad;
    }
    for (int64_t r = j.r0; r < j.r1; r += 2) {
      const int tj = static_cast<int>(min64(2, j.r1 - r));
      const S* ar[2] = {a_rows + r * K, a_rows + (r + tj - 1) * K};
      dot_tile_any<S, A>(tm, tj, xr, ar, klen, dots, 2);
      for (int q = 0; q < tm; ++q)
        for (int c = 0; c < tj; ++c) out[q][r + c] = dots[q * 2 + c];
    }
  }
}

template <typename S, typename A>
void shrink_packed(const ShrinkJob<S, A>& j) {
  using V = Vec<A>;
  const int64_t K = j.K, R = j.R, Rpad = j.Rpad, klen = j.k1 - j.k0;
  // A^T of every expert of the item over [k0, k1): panel q is [klen][Rpad], zero beyond R.
  for (int64_t q = 0; q < j.ne; ++q) {
    const S* a_rows = j.a + j.experts[q] * R * K + j.k0;
    A* panel = j.scratch + q * klen * Rpad;
    pack_transposed(a_rows, K, R, klen, panel, Rpad);
  }
  for (int64_t i = j.i0; i < j.i1; i += kPackedRows) {
    const int mr = static_cast<int>(min64(kPackedRows, j.i1 - i));
    const S* xr[kPackedRows];
    A* out[kPackedRows];
    for (int q = 0; q < mr; ++q) xr[q] = j.x + j.tokens[i + q] * K + j.k0;
    for (int64_t q = 0; q < j.ne; ++q) {
      const int64_t e = j.experts[q];
      for (int64_t r0 = 0; r0 < Rpad; r0 += 2 * V::size) {
        for (int c = 0; c < mr; ++c) out[c] = j.out + (j.tokens[i + c] * j.E + e) * Rpad + r0;
        const A* panel = j.scratch + q * klen * Rpad + r0;
        if (Rpad - r0 >= 2 * V::size) {
          packed_shrink_any<2>(mr, xr, panel, Rpad, klen, out);
        } else {
          packed_shrink_any<1>(mr, xr, panel, Rpad, klen, out);
        }
      }
    }
  }
}

template <typename S, typename A>
void expand_packed(const ExpandJob<S, A>& j) {
  using V = Vec<A>;
  const int64_t E = j.E, R = j.R, Rpad = j.Rpad, N = j.N;
  const int64_t cols = j.n1 - j.n0;
  const int64_t ld = round_up64(cols, 2 * V::size);
  // B^T of every expert some sequence of the item uses: panel e is [R][ld], zero padded.
  const A* panel_of[64];
  const A* at_col[64];
  for (int64_t e0 = 0; e0 < E; e0 += 64) {
    // Experts are taken 64 at a time so the panel pointers live on the stack.
    const int64_t e1 = min64(E, e0 + 64);
    for (int64_t e = e0; e < e1; ++e) {
      panel_of[e - e0] = nullptr;
      if (!j.used[e]) continue;
      A* panel = j.scratch + (e - e0) * R * ld;
      const S* b_rows = j.b + (e * N + j.n0) * R;
      pack_transposed(b_rows, R, cols, R, panel, ld);
      panel_of[e - e0] = panel;
    }
    for (int64_t si = 0; si < j.nseqs; ++si) {
      const int64_t s = j.seqs[si];
      // this sequence's experts within [e0, e1), shifted to the panel block
      int64_t experts[64];
      int64_t na = 0;
      for (int64_t q = 0; q < j.seq_nexp[s]; ++q) {
        const int64_t e = j.seq_experts[s * E + q];
        if (e >= e0 && e < e1) experts[na++] = e - e0;
      }
      if (na == 0) continue;
      const int64_t t_end = j.offsets[s + 1];
      for (int64_t t = j.offsets[s]; t < t_end; t += kPackedRows) {
        const int mr = static_cast<int>(min64(kPackedRows, t_end - t));
        const A* u_rows[kPackedRows];
        S* y_rows[kPackedRows];
        for (int q = 0; q < mr; ++q) u_rows[q] = j.u + ((t + q) * E + e0) * Rpad;
        for (int64_t c = 0; c < cols; c += 2 * V::size) {
          const int n_valid = static_cast<int>(min64(2 * V::size, cols - c));
          for (int64_t e = 0; e < e1 - e0; ++e) at_col[e] = panel_of[e] == nullptr ? nullptr : panel_of[e] + c;
          for (int q = 0; q < mr; ++q) y_rows[q] = j.y + (t + q) * N + j.n0 + c;
          if (n_valid > V::size) {
            packed_expand_any<2>(mr, u_rows, experts, na, at_col, ld, R, Rpad, y_rows, n_valid);
          } else {
            packed_expand_any<1>(mr, u_rows, experts, na, at_col, ld, R, Rpad, y_rows, n_valid);
          }
        }
      }
    }
  }
}

// y[t, n0:n1] += sum over experts[0 .. na) of B[e] @ U[t, e] for one token (dot tiles: B rows
// read as stored, one lane-reduction per V::size columns).
template <typename S, typename A>
void expand_dot_token(const ExpandJob<S, A>& j, int64_t t, const int64_t* experts, int64_t na) {
  using V = Vec<A>;
  const int64_t E = j.E, R = j.R, Rpad = j.Rpad, N = j.N;
  S* yrow = j.y + t * N;
  for (int64_t n = j.n0; n < j.n1; n += V::size) {
    const int nv = static_cast<int>(min64(V::size, j.n1 - n));
    V acc[V::size];
    for (int c = 0; c < V::size; ++c) acc[c] = V::zero();
    for (int64_t q = 0; q < na; ++q) {
      const S* b_rows = j.b + (experts[q] * N + n) * R;
      const char* ahead = reinterpret_cast<const char*>(b_rows) + kPrefetchAhead;  // as in the dot tiles
      for (int64_t off = 0; off < static_cast<int64_t>(V::size * R * sizeof(S)); off += 64) __builtin_prefetch(ahead + off, 0, 3);
      const A* u = j.u + (t * E + experts[q]) * Rpad;
      for (int64_t r = 0; r < Rpad; r += V::size) {
        const V uv = V::load(u + r);
        const int rem = static_cast<int>(min64(V::size, R - r));
        if (rem == V::size) {
          for (int c = 0; c < nv; ++c) acc[c] = fma(V::load(b_rows + c * R + r), uv, acc[c]);
        } else {
          for (int c = 0; c < nv; ++c) acc[c] = fma(V::load(b_rows + c * R + r, rem), uv, acc[c]);
        }
      }
    }
    V::transpose_sum(acc).add_to(yrow + n, nv);
  }
}

template <typename S, typename A>
void expand_dot(const ExpandJob<S, A>& j) {
  for (int64_t si = 0; si < j.nseqs; ++si) {
    const int64_t s = j.seqs[si];
    for (int64_t t = j.offsets[s]; t < j.offsets[s + 1]; ++t) expand_dot_token(j, t, j.seq_experts + s * j.E, j.seq_nexp[s]);
  }
}

// The expand of one token list (tokens of one adapter sharing one set of active experts) with
// the float32 tiles: a token or two through the dot tiles; more through B^T of the chunk packed
// once to float32 panels and register tiles of up to kPackedRows tokens across the list's
// sequences (decode batches that share an adapter have one token per sequence).
template <typename S, typename A>
void expand_list_f32(const ExpandJob<S, A>& j) {
  using V = Vec<A>;
  const int64_t E = j.E, R = j.R, Rpad = j.Rpad, N = j.N, nexp = j.nexperts;
  if (j.ntokens <= 2 || E > 64) {
    for (int64_t i = 0; i < j.ntokens; ++i) expand_dot_token(j, j.tokens[i], j.experts, nexp);
    return;
  }
  const int64_t cols = j.n1 - j.n0, ld = round_up64(cols, 2 * V::size);
  const A* panel_of[64];  // by expert index e (< E <= 64); only the list's experts are set
  const A* at_col[64];
  for (int64_t q = 0; q < nexp; ++q) {
    const int64_t e = j.experts[q];
    A* panel = j.scratch + q * R * ld;
    const S* b_rows = j.b + (e * N + j.n0) * R;
    pack_transposed(b_rows, R, cols, R, panel, ld);
    panel_of[e] = panel;
  }
  for (int64_t i0 = 0; i0 < j.ntokens; i0 += kPackedRows) {
    const int mr = static_cast<int>(min64(kPackedRows, j.ntokens - i0));
    const A* u_rows[kPackedRows];
    S* y_rows[kPackedRows];
    for (int64_t c = 0; c < cols; c += 2 * V::size) {
      const int n_valid = static_cast<int>(min64(2 * V::size, cols - c));
      for (int64_t q = 0; q < nexp; ++q) at_col[j.experts[q]] = panel_of[j.experts[q]] + c;
      for (int q = 0; q < mr; ++q) {
        const int64_t t = j.tokens[i0 + q];
        u_rows[q] = j.u + t * E * Rpad;
        y_rows[q] = j.y + t * N + j.n0 + c;
      }
      if (n_valid > V::size) {
        packed_expand_any<2>(mr, u_rows, j.experts, nexp, at_col, ld, R, Rpad, y_rows, n_valid);
      } else {
        packed_expand_any<1>(mr, u_rows, j.experts, nexp, at_col, ld, R, Rpad, y_rows, n_valid);
      }
    }
  }
}

#if MILORA_ISA_LEVEL >= 3
// bfloat16 expand with AVX-512-BF16, one token list (tokens of one adapter sharing one set of
// active experts) per item (expand_list). vdpbf16ps multiplies bfloat16 B as stored by the
// token's U row split into bfloat16 hi + lo halves (u = hi + lo to about 2^-16 relative, so
// nearly float32) and adds the products in pairs into float32 lanes; the float32 tiles
// (expand_dot / expand_packed) spend most of their time widening B and, in the dot tiles,
// reducing across lanes. Dot form (expand_list_dot, a token or two, R | 32 or 32 | R): B rows
// are read as they lie, 32 values per load, every expert adds into the same lanes, and one
// pairwise-add tree per 16-column block gives the block's sums. Packed form
// (expand_list_packed): see there.
constexpr int kDotExpandMaxZmm = 64;  // hi + lo vectors of a token's experts kept on the stack

// The 16 lanes i of the result: lane pair (2i, 2i + 1) of a (i < 8) or of b (i >= 8), summed.
inline __m512 pair_sum(__m512 a, __m512 b) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
}

// NACC vectors holding 16 rows x NACC partial sums (rows in lane order) -> the 16 row sums
// (acc is overwritten).
template <int NACC>
inline __m512 row_sums(__m512* acc) {
  for (int width = NACC; width > 1; width /= 2)
    for (int v = 0; v < width / 2; ++v) acc[v] = pair_sum(acc[2 * v], acc[2 * v + 1]);
  return acc[0];
}

// u[0 .. R) (float32) as bfloat16 hi and lo vectors of 32 lanes: lane j holds u[z * 32 + j]
// when R >= 32 (vector z of R / 32), and u[j % R] when R < 32 (the row repeated).
inline void split_u_bf16(const float* u, int64_t R, __m512bh* hi, __m512bh* lo) {
  const int64_t nz = R >= 32 ? R / 32 : 1;
  for (int64_t z = 0; z < nz; ++z) {
    alignas(64) float f[32];
    for (int j = 0; j < 32; ++j) f[j] = R >= 32 ? u[z * 32 + j] : u[j % R];
    const __m512 f0 = _mm512_load_ps(f), f1 = _mm512_load_ps(f + 16);
    const __m512bh h = _mm512_cvtne2ps_pbh(f1, f0);  // lanes 0-15 from f0, 16-31 from f1
    const __m512i hb = (__m512i)h;
    const __m512 h0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hb)), 16));
    const __m512 h1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hb, 1)), 16));
    hi[z] = h;
    lo[z] = _mm512_cvtne2ps_pbh(_mm512_sub_ps(f1, h1), _mm512_sub_ps(f0, h0));
  }
}

// The dot form, for lists of a few tokens: NACC accumulators per 16-column block (a
// compile-time count, so they stay in registers): NACC = R / 2 when R <= 32 (32 / R rows per
// 32-value load), 16 when R >= 32 (one row per accumulator, R / 32 loads each).
template <int NACC>
void expand_list_dot(const ExpandJob<bf16_t, float>& j) {
  constexpr int64_t rows_per_vec = 16 / NACC;
  const int64_t E = j.E, R = j.R, Rpad = j.Rpad, N = j.N;
  const int64_t nz = R >= 32 ? R / 32 : 1;  // 32-value loads per accumulator
  __m512bh hi[kDotExpandMaxZmm], lo[kDotExpandMaxZmm];
  const bf16_t* b_of[kDotExpandMaxZmm];
  const int64_t na = j.nexperts;
  for (int64_t q = 0; q < na; ++q) b_of[q] = j.b + j.experts[q] * N * R;
  for (int64_t i = 0; i < j.ntokens; ++i) {
    const int64_t t = j.tokens[i];
    bf16_t* yrow = j.y + t * N;
    for (int64_t q = 0; q < na; ++q) split_u_bf16(j.u + (t * E + j.experts[q]) * Rpad, R, hi + q * nz, lo + q * nz);
    int64_t n = j.n0;
    for (; n + 16 <= j.n1; n += 16) {
      __m512 acc[NACC];
      for (int v = 0; v < NACC; ++v) acc[v] = _mm512_setzero_ps();
      for (int64_t q = 0; q < na; ++q) {
        const bf16_t* rows = b_of[q] + n * R;
        // This block's rows are 16 R contiguous values; ask for the block kPrefetchAhead bytes on.
        const char* ahead = reinterpret_cast<const char*>(rows) + kPrefetchAhead;
        for (int64_t off = 0; off < 16 * R * 2; off += 64) __builtin_prefetch(ahead + off, 0, 3);
        for (int64_t z = 0; z < nz; ++z) {
          const __m512bh h = hi[q * nz + z], l = lo[q * nz + z];
          for (int v = 0; v < NACC; ++v) {
            const __m512bh bv = (__m512bh)_mm512_loadu_si512(rows + v * rows_per_vec * R + z * 32);
            acc[v] = _mm512_dpbf16_ps(acc[v], bv, h);
            acc[v] = _mm512_dpbf16_ps(acc[v], bv, l);
          }
        }
      }
      Vec512{row_sums<NACC>(acc)}.add_to(yrow + n, 16);
    }
    if (n < j.n1) {  // the last, partial block: rows past n1 read as 0, never from memory
      const int64_t cols = j.n1 - n;
      __m512 acc[NACC];
      for (int v = 0; v < NACC; ++v) acc[v] = _mm512_setzero_ps();
      for (int64_t q = 0; q < na; ++q) {
        const bf16_t* rows = b_of[q] + n * R;
        for (int64_t z = 0; z < nz; ++z)
          for (int v = 0; v < NACC; ++v) {
            const int64_t row0 = v * rows_per_vec;
            const int64_t valid = row0 >= cols ? 0 : (cols - row0 >= rows_per_vec ? 32 : (cols - row0) * R);
            const __mmask32 m = static_cast<__mmask32>(valid == 32 ? ~uint64_t(0) : (uint64_t(1) << valid) - 1);
            const __m512bh bv = (__m512bh)_mm512_maskz_loadu_epi16(m, rows + row0 * R + z * 32);
            acc[v] = _mm512_dpbf16_ps(acc[v], bv, hi[q * nz + z]);
            acc[v] = _mm512_dpbf16_ps(acc[v], bv, lo[q * nz + z]);
          }
      }
      Vec512{row_sums<NACC>(acc)}.add_to(yrow + n, static_cast<int>(cols));
    }
  }
}

// The packed form, for lists of several tokens (B read once for all of them): B^T of the
// chunk is packed in vdpbf16ps' pair layout, panel[q][r2][c] = (B[e, n0 + c, 2 r2],
// B[e, n0 + c, 2 r2 + 1]) as one 32-bit word (an odd R's last pair padded with 0), so one
// 64-byte load holds 16 columns of a rank pair and no reduction across lanes is needed:
// MT tokens x 32 columns of float32 sums stay in registers, each step broadcasting a
// token's (u[2 r2], u[2 r2 + 1]) pair. Here the products are the work (the dot form waits on
// memory instead), so U is rounded once to bfloat16, as PyTorch rounds x @ A^T in that dtype,
// rather than split into hi + lo: half the vdpbf16ps.
constexpr int kListTokens = 4;  // tokens per register tile

template <int MT>
void expand_list_tile(const uint32_t* panel, int64_t nexp, int64_t R2, int64_t ld, int64_t us, const uint32_t* uh,
                      bf16_t* const* y_rows, int64_t cols) {
  // uh: [MT][nexp][us] bfloat16 pairs of the tile's tokens' U rows
  for (int64_t c = 0; c < cols; c += 32) {
    __m512 acc[MT][2];
    for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t q = 0; q < nexp; ++q) {
      const uint32_t* pq = panel + q * R2 * ld + c;
      for (int64_t r2 = 0; r2 < R2; ++r2) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(pq + r2 * ld);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(pq + r2 * ld + 16);
        for (int i = 0; i < MT; ++i) {
          const int64_t w = (i * nexp + q) * us + r2;
          const __m512bh h = (__m512bh)_mm512_set1_epi32(static_cast<int>(uh[w]));
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], b0, h);
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], b1, h);
        }
      }
    }
    const int64_t n0 = min64(16, cols - c), n1 = min64(16, cols - c - 16);
    for (int i = 0; i < MT; ++i) {
      Vec512{acc[i][0]}.add_to(y_rows[i] + c, static_cast<int>(n0));
      if (n1 > 0) Vec512{acc[i][1]}.add_to(y_rows[i] + c + 16, static_cast<int>(n1));
    }
  }
}

// The list's B over columns [n0, n1) in vdpbf16ps' pair layout: panel[q][r2][c] (rows of all
// experts stacked, ld = cols rounded up to 32, zero beyond the chunk).
inline void pack_b_pairs(const ExpandJob<bf16_t, float>& j, uint32_t* panel, int64_t ld) {
  const int64_t R = j.R, N = j.N, R2 = (R + 1) / 2, nexp = j.nexperts;
  const int64_t cols = j.n1 - j.n0;
  for (int64_t q = 0; q < nexp; ++q) {
    const uint16_t* b_rows = reinterpret_cast<const uint16_t*>(j.b + (j.experts[q] * N + j.n0) * R);
    uint32_t* pq = panel + q * R2 * ld;
    int64_t c = 0;
    if (R % 2 == 0) {
      // An even R's pairs are whole 32-bit words of B: gather 16 columns' word r2 at once.
      const int* words = reinterpret_cast<const int*>(b_rows);
      const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int>(R2)));
      for (; c + 16 <= cols; c += 16)
        for (int64_t r2 = 0; r2 < R2; ++r2)
          _mm512_storeu_si512(pq + r2 * ld + c, _mm512_i32gather_epi32(idx, words + c * R2 + r2, 4));
    }
    for (; c < cols; ++c)
      for (int64_t r2 = 0; r2 < R2; ++r2) {
        const uint32_t lo16 = b_rows[c * R + 2 * r2];
        const uint32_t hi16 = 2 * r2 + 1 < R ? b_rows[c * R + 2 * r2 + 1] : 0u;
        pq[r2 * ld + c] = lo16 | (hi16 << 16);
      }
    for (int64_t r2 = 0; r2 < R2; ++r2)
      for (int64_t cc = cols; cc < ld; ++cc) pq[r2 * ld + cc] = 0u;
  }
}

inline void expand_list_packed(const ExpandJob<bf16_t, float>& j) {
  const int64_t E = j.E, R = j.R, Rpad = j.Rpad, N = j.N, R2 = (R + 1) / 2, nexp = j.nexperts;
  const int64_t cols = j.n1 - j.n0, ld = round_up64(cols, 32);
  const int64_t us = Rpad / 2;                                // pairs per token and expert in uh
  uint32_t* panel = reinterpret_cast<uint32_t*>(j.scratch);  // [nexp][R2][ld]
  uint32_t* uh = panel + nexp * R2 * ld;                      // [kListTokens][nexp][us]
  pack_b_pairs(j, panel, ld);
  for (int64_t i0 = 0; i0 < j.ntokens; i0 += kListTokens) {
    const int mt = static_cast<int>(min64(kListTokens, j.ntokens - i0));
    bf16_t* y_rows[kListTokens];
    for (int i = 0; i < mt; ++i) {
      const int64_t t = j.tokens[i0 + i];
      y_rows[i] = j.y + t * N + j.n0;
      // U rows (float32, pad lanes 0 up to Rpad) -> bfloat16; adjacent bfloat16 are the
      // (u[2 r2], u[2 r2 + 1]) pairs as 32-bit words.
      for (int64_t q = 0; q < nexp; ++q) {
        const float* u = j.u + (t * E + j.experts[q]) * Rpad;
        uint32_t* h = uh + (i * nexp + q) * us;
        for (int64_t r = 0; r < Rpad; r += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + r / 2), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(u + r)));
      }
    }
    switch (mt) {
      case 1: expand_list_tile<1>(panel, nexp, R2, ld, us, uh, y_rows, cols); break;
      case 2: expand_list_tile<2>(panel, nexp, R2, ld, us, uh, y_rows, cols); break;
      case 3: expand_list_tile<3>(panel, nexp, R2, ld, us, uh, y_rows, cols); break;
      default: expand_list_tile<4>(panel, nexp, R2, ld, us, uh, y_rows, cols); break;
    }
  }
}

// One token list's expand: the dot form for one or two tokens when the rank suits it, the
// packed form otherwise.
inline void expand_list_bf16(const ExpandJob<bf16_t, float>& j) {
  const int64_t nz = j.R >= 32 ? j.R / 32 : 1;
  if (j.ntokens > 2 || !bf16_dot_expand_rank(j.R) || j.nexperts * nz > kDotExpandMaxZmm) return expand_list_packed(j);
  switch (j.R >= 32 ? 16 : j.R / 2) {
    case 1: return expand_list_dot<1>(j);
    case 2: return expand_list_dot<2>(j);
    case 4: return expand_list_dot<4>(j);
    case 8: return expand_list_dot<8>(j);
    default: return expand_list_dot<16>(j);
  }
}
#endif

// The level's list expand: the float32 tiles for float32 accumulation (float64, the reference
// dtype, keeps the per-adapter phases), vdpbf16ps for bfloat16 at level 3.
template <typename S, typename A>
constexpr void (*expand_list_of())(const ExpandJob<S, A>&) {
  return &expand_list_f32<S, A>;
}
template <>
constexpr void (*expand_list_of<double, double>())(const ExpandJob<double, double>&) {
  return nullptr;
}
#if MILORA_ISA_LEVEL == 3
template <>
constexpr void (*expand_list_of<bf16_t, float>())(const ExpandJob<bf16_t, float>&) {
  return &expand_list_bf16;
}
#endif

#if MILORA_ISA_LEVEL >= 4
#include "cpu/lora_amx.h"
#include "cpu/base_amx.h"
template <>
constexpr void (*expand_list_of<bf16_t, float>())(const ExpandJob<bf16_t, float>&) {
  return &expand_list_amx;
}
#endif

constexpr BaseKernels base_kernels_bf16() {
#if MILORA_ISA_LEVEL >= 4
  return BaseKernels{&pack_base_x, &base_product_amx, kAmxBaseMaxTokens};
#else
  return BaseKernels{nullptr, nullptr, 0};
#endif
}

// Where the shrink's packed items start (token list length):
//   float64 (the reference dtype): kFloat64PackedMin, the packed tiles' single accumulation
//     chain per output being what its accuracy tests were calibrated on;
//   float32: kFloat32PackedMin (shorter lists: dot tiles, whose reads of A cost less than
//     packing it);
//   16-bit storage: never before AMX. The dot tiles multiply pairs of stored values without
//     widening each one (vdpbf16ps, or the pair split of lora_tiles.h), which beat the float32
//     panels at 64 to 1024 tokens on AVX2 and AVX-512 (measured, bf16 4096 x 4096, R = 16);
//   bfloat16 with AMX: kAmxShrinkMinTokens, the tiles (lora_amx.h).
constexpr int64_t kFloat64PackedMin = 16;
constexpr int64_t kFloat32PackedMin = 128;
constexpr int64_t kNever = int64_t(1) << 62;  // a token count no call reaches

template <typename S>
constexpr int64_t shrink_packed_min_of() {
  return sizeof(S) == 8 ? kFloat64PackedMin : sizeof(S) == 4 ? kFloat32PackedMin : kNever;
}
template <typename S, typename A>
constexpr void (*shrink_packed_of())(const ShrinkJob<S, A>&) {
  return &shrink_packed<S, A>;
}
#if MILORA_ISA_LEVEL >= 4
template <>
constexpr int64_t shrink_packed_min_of<bf16_t>() {
  return kAmxShrinkMinTokens;
}
template <>
constexpr void (*shrink_packed_of<bf16_t, float>())(const ShrinkJob<bf16_t, float>&) {
  return &shrink_amx;
}
#endif

// Where a run of batch-adjacent sequences takes the ATen GEMM route (oneDNN; AMX where the CPU
// has it) instead of these kernels. Measured on a 2-core Sapphire Rapids, bf16 4096 x 4096,
// R = 16, one run of L tokens, LoRA phases in us, these kernels / GEMM route:
//   AVX-512-BF16 L=64 142/230, 128 273/348, 256 562/446; AVX2 L=64 213/238, 128 445/369
//   (the ATen route has a fixed cost, oneDNN's small-M products, the vector tiles do not);
//   AMX L=64 102/197, 256 309/461, 1024 1095/1601: the tiles win at every length, so
//   bfloat16 never takes the route there.
constexpr int64_t kGemmMinTokens = 128;

template <typename S>
constexpr int64_t gemm_min_of() {
  return kGemmMinTokens;
}
#if MILORA_ISA_LEVEL >= 4
template <>
constexpr int64_t gemm_min_of<bf16_t>() {
  return kNever;
}
#endif

// Where a token list's expand takes column chunks of N / threads instead of 256 columns. The
// AMX expand's few tile products cost little; reading and writing y is its time (perf: the y
// loads are its hottest instructions). A 256-column chunk touches each y row in one 512-byte
// piece per item, too short a run for the hardware prefetcher to follow; N / threads columns
// make it a few pages long (and round each token's U to bfloat16 pairs once per thread, not once
// per 256 columns). Measured (2 threads, bf16 4096 x 4096, R = 16, expand phase, caches flushed,
// in-process A/B): 128 tokens 161 -> 145 us, 256 tokens (2 adapters) 323 -> 270, 2048 tokens
// 2.4-2.5 -> 2.0-2.05 ms, 64 tokens level (84 / 85, 76 / 74 us). The float32 panels of the other
// levels are the opposite case: a chunk's panel must stay in L1 (AVX2, 16 tokens of one
// adapter: 76 -> 105 us with wide chunks).
template <typename S>
constexpr int64_t expand_wide_min_of() {
  return kNever;
}
#if MILORA_ISA_LEVEL >= 4
template <>
constexpr int64_t expand_wide_min_of<bf16_t>() {
  return kAmxExpandMinTokens;  // the lists on tiles (measured with them, lora_amx.h)
}
#endif

template <typename S, typename A>
constexpr LoraKernels<S, A> kernels_for() {
  return LoraKernels<S, A>{&shrink_dot<S, A>, shrink_packed_of<S, A>(), &expand_dot<S, A>, &expand_packed<S, A>,
                          expand_list_of<S, A>(), shrink_packed_min_of<S>(), gemm_min_of<S>(),
                          expand_wide_min_of<S>()};
}

}  // namespace milora::cpu::MILORA_ISA_NS

namespace milora::cpu::MILORA_ISA_NS {

// Constant-initialised: building it runs no code of this level.
constexpr KernelTable kTable{
    static_cast<CpuCapability>(MILORA_ISA_LEVEL),
    Vec<float>::size,
    Vec<double>::size,
    kernels_for<float, float>(),
    kernels_for<double, double>(),
    kernels_for<bf16_t, float>(),
    kernels_for<f16_t, float>(),
    base_kernels_bf16(),
};

}  // namespace milora::cpu::MILORA_ISA_NS

const milora::cpu::KernelTable* milora::cpu::MILORA_ISA_TABLE() {
  return &MILORA_ISA_NS::kTable;
}
