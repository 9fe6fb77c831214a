// The CPU LoRA work items (shrink and expand, dot and packed), compiled once per ISA level by
// cpu/isa_<level>.cpp, which defines before including this file:
//   MILORA_ISA_NS     the namespace of that level's copy (milora::cpu::MILORA_ISA_NS)
//   MILORA_ISA_LEVEL  0 default, 1 AVX2, 2 AVX-512, 3 AVX-512-BF16 (selects the vector types)
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
    for (int64_t k = 0; k < klen; ++k) {
      for (int64_t r = 0; r < R; ++r) panel[k * Rpad + r] = widen(a_rows[r * K + k]);
      for (int64_t r = R; r < Rpad; ++r) panel[k * Rpad + r] = A(0);
    }
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
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t c = 0; c < cols; ++c) panel[r * ld + c] = widen(b_rows[c * R + r]);
        for (int64_t c = cols; c < ld; ++c) panel[r * ld + c] = A(0);
      }
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

template <typename S, typename A>
void expand_dot(const ExpandJob<S, A>& j) {
  using V = Vec<A>;
  const int64_t E = j.E, R = j.R, Rpad = j.Rpad, N = j.N;
  for (int64_t si = 0; si < j.nseqs; ++si) {
    const int64_t s = j.seqs[si];
    const int64_t* experts = j.seq_experts + s * E;
    const int64_t na = j.seq_nexp[s];
    for (int64_t t = j.offsets[s]; t < j.offsets[s + 1]; ++t) {
      S* yrow = j.y + t * N;
      for (int64_t n = j.n0; n < j.n1; n += V::size) {
        const int nv = static_cast<int>(min64(V::size, j.n1 - n));
        V acc[V::size];
        for (int c = 0; c < V::size; ++c) acc[c] = V::zero();
        for (int64_t q = 0; q < na; ++q) {
          const S* b_rows = j.b + (experts[q] * N + n) * R;
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
  }
}

template <typename S, typename A>
constexpr LoraKernels<S, A> kernels_for() {
  return LoraKernels<S, A>{&shrink_dot<S, A>, &shrink_packed<S, A>, &expand_dot<S, A>, &expand_packed<S, A>};
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
};

}  // namespace milora::cpu::MILORA_ISA_NS

const milora::cpu::KernelTable* milora::cpu::MILORA_ISA_TABLE() {
  return &MILORA_ISA_NS::kTable;
}
