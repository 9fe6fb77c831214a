// Runtime CPU-capability dispatch of the hand-written LoRA kernels, the way ATen does it:
// one kernel source (cpu/lora_kernels.h) is compiled once per instruction-set level, each
// copy in its own namespace and translation unit (cpu/isa_*.cpp), and the level is chosen
// once per process from cpuid (MILORA_CPU_CAPABILITY can force a lower one).
//
// This header is shared by code compiled for the baseline ISA and by the per-level units, so
// it holds only plain data and declarations: an inline function here could be emitted with
// AVX-512 instructions by one unit and picked by the linker for all of them.
#pragma once

#include <cstdint>

namespace milora::cpu {

// Storage of the 16-bit dtypes as seen by the kernels (layout of c10::BFloat16 / c10::Half;
// the kernel units convert without c10 so that no c10 inline function is compiled per level).
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

enum class CpuCapability : int {
  kDefault = 0,     // no ISA extension beyond x86-64 (SSE2), or a non-x86 machine
  kAvx2 = 1,        // AVX2 + FMA + F16C
  kAvx512 = 2,      // AVX-512 F/BW/VL/DQ
  kAvx512Bf16 = 3,  // + AVX-512-BF16 (bfloat16 dot products and conversions)
  kAmx = 4,         // + AMX-TILE and AMX-BF16, with the OS's permission for the tile state
};
constexpr int kNumCapabilities = 5;

// One shrink work item: raw dot products, no gate (applied when the U rows are finalised),
//   out[t * E * Rpad + e * Rpad + r] = sum_{k0 <= k < k1} x[t, k] * A[e, r, k]
// for the tokens t = tokens[i0 .. i1) and
//   packed items: every expert e of experts[0 .. ne) and every r < Rpad (lanes r >= R get 0);
//   dot items:    the one expert experts[0] and the rank rows r0 <= r < r1.
template <typename S, typename A>
struct ShrinkJob {
  const S* x;              // [T, K]
  const S* a;              // [E, R, K]: the adapter's experts
  A* out;                  // [T, E, Rpad]
  A* scratch;              // packed: room for ne * (k1 - k0) * Rpad values
  const int64_t* tokens;   // token indices
  const int64_t* experts;  // expert indices
  int64_t K, E, R, Rpad;
  int64_t i0, i1, ne, r0, r1, k0, k1;
};

// One expand work item: for each sequence s of seqs, each of its tokens t and the columns
// n0 <= n < n1,  y[t, n] += sum over s's active experts e of sum_{r < R} B[e, n, r] * u[t, e, r].
template <typename S, typename A>
struct ExpandJob {
  const S* b;                   // [E, N, R]: the adapter's experts
  const A* u;                   // [T, E, Rpad], pad lanes 0
  S* y;                         // [T, N]
  A* scratch;                   // packed: room for E * R * round_up(n1 - n0, 32) values
  const int64_t* seqs;          // the sequences of the item
  const int64_t* offsets;       // [S + 1]
  const int64_t* seq_experts;   // [S, E]: active experts of sequence s first, ascending
  const int64_t* seq_nexp;      // [S]: how many
  const char* used;             // [E]: whether some sequence of seqs uses expert e
  int64_t nseqs, N, E, R, Rpad;
  int64_t n0, n1;
  // expand_list items instead name one token list (tokens of one adapter sharing one set of
  // active experts) and leave seqs .. used unset.
  const int64_t* tokens;        // the list's tokens
  int64_t ntokens;
  const int64_t* experts;       // its active experts, ascending
  int64_t nexperts;
};

// Scratch (in accumulation-type elements) an expand_list item needs.
// (float32 panels of the B^T chunk, R rows of the chunk rounded up to 32 columns, per expert;
// this also holds the bfloat16 pair-packed chunk plus the U pairs of 4 tokens, twice over;
// and, for the AMX tiles, up to 15 zero rows of pairs beyond the experts' and the U pairs of
// 16 tokens)
static constexpr int64_t expand_list_scratch(int64_t nexperts, int64_t R, int64_t cols) {
  return nexperts * (R + 1) * ((cols + 31) / 32 * 32) + 2 * 4 * nexperts * ((R + 31) / 32 * 16) +
         16 * ((cols + 31) / 32 * 32) + 16 * (nexperts * ((R + 1) / 2) + 16);
}

template <typename S, typename A>
struct LoraKernels {
  void (*shrink_dot)(const ShrinkJob<S, A>&);
  void (*shrink_packed)(const ShrinkJob<S, A>&);
  void (*expand_dot)(const ExpandJob<S, A>&);
  void (*expand_packed)(const ExpandJob<S, A>&);
  // Optional (nullptr where the level has none): the whole expand of one token list over
  // columns [n0, n1), whatever its length; scratch: expand_list_scratch values.
  void (*expand_list)(const ExpandJob<S, A>&);
  // Shrink token lists this long take shrink_packed, shorter ones shrink_dot.
  int64_t shrink_packed_min_tokens;
  // Runs of batch-adjacent sequences of one adapter and expert set this long take the ATen
  // GEMM route instead of the kernels above (not float64).
  int64_t gemm_min_tokens;
  // Token lists this long take their expand in column chunks of N / threads (at least), not
  // 256 columns (see expand_wide_min_of in cpu/lora_kernels.h).
  int64_t expand_wide_min_tokens;
};

// Ranks the AVX-512-BF16 dot expand handles (B rows read 32 bfloat16 at a time: R | 32 or
// 32 | R, and R even for the pairs of vdpbf16ps). Internal linkage (static), so each unit that
// uses it has its own copy whatever that unit's target ISA.
static constexpr bool bf16_dot_expand_rank(int64_t R) {
  return R >= 2 && R % 2 == 0 && (32 % R == 0 || R % 32 == 0);
}

// The base product y = x @ W^T (+ bias) of bfloat16 calls, where the level has one of its own
// (AMX: cpu/base_amx.h; every other level leaves it to ATen). One work item:
//   pack_x:  token blocks [b0, b1) of 16 tokens of x into xt, the tiles' layout;
//   product: column blocks [b0, b1) of 16 output columns, every token, from xt.
struct BaseJob {
  const bf16_t* x;     // [T, K]
  const bf16_t* w;     // [N, K]
  const bf16_t* bias;  // [N], or nullptr
  bf16_t* y;           // [T, N]
  uint32_t* xt;        // [ceil(T / 16), K / 32, 16, 16]: x's bfloat16 pairs, 16 tokens per row
  int64_t T, K, N;
  int64_t b0, b1;
};

struct BaseKernels {
  void (*pack_x)(const BaseJob&);   // nullptr: the level has no base product of its own
  void (*product)(const BaseJob&);
  int64_t max_tokens;  // calls with more tokens use ATen's product; K % 32 == 0, N % 16 == 0 too
};

struct KernelTable {
  CpuCapability level;
  int lanes32;  // float32 vector lanes: Rpad is a multiple of this for float accumulation
  int lanes64;  // float64 vector lanes
  LoraKernels<float, float> f32;
  LoraKernels<double, double> f64;
  LoraKernels<bf16_t, float> bf16;
  LoraKernels<f16_t, float> f16;
  BaseKernels base_bf16;
};

// Defined by cpu/isa_<level>.cpp; nullptr where the level is not compiled (non-x86).
const KernelTable* kernels_default();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx512_bf16();
const KernelTable* kernels_amx();

// cpu/dispatch.cpp
const KernelTable& active_kernels();          // the table of the level in use
CpuCapability cpu_capability();               // the level in use
CpuCapability best_cpu_capability();          // the highest level this machine and build run
const char* capability_name(CpuCapability c);

}  // namespace milora::cpu
