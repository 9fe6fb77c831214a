// Fused decode kernel (float16 / bfloat16, 1 <= T <= 64 tokens):
//
//   y[t, n] = W[n, :] . x[t, :] + bias[n] + sum_e gates[s,e] * B[p,e][n, :] . U[t, e, :]
//
// with U = A x from the SIMT shrink kernel launched just before (shrink_simt.cu).
//
// Work split. Decode is bound by reading W once (N*K*2 bytes); x (T*K*2) is small. Each CTA
// owns BN = 16 * RT output rows over ALL of K, so y is written once, by one CTA, with no
// atomics and no workspace: 8 warps split K into contiguous ranges, each warp runs the
// tensor-core loop of warp_gemm.cuh (W rows as the m16 operand, token rows of x as the n8
// operand: NT tiles of 8 tokens), a fixed-order tree in shared memory sums the 8 partial
// tiles, and the epilogue adds bias and the gated expand and rounds once. With N = 4096
// there are 256 CTAs (T <= 16, BN = 16) or 128 (T > 16, BN = 32: every CTA reads all of x
// from L2, so a larger row block halves that traffic when x grows) for 132 SMs, all resident
// at once. The alternative, split-K across CTAs, would need a second pass or atomics on y.
//
// Alignment. W is read with 16-byte loads whatever K is: with K % 8 != 0 (or a weight view
// at an odd offset) a CTA takes rows that all start at the same offset from a 16-byte
// boundary, every row's 16-byte loads start at its first boundary, and only the <= 7 elements
// before it and after its last whole 16 bytes are read one at a time. x, padded by the host
// packing to aligned rows of a multiple of 8 elements, is read at the same k with two aligned
// 16-byte loads and a shift (it stays in L1/L2). A lora_b with R % 8 != 0 or misaligned rows
// is read with scalar loads in the epilogue (a few rows per CTA, L2-resident).
//
// Overlap. On sm_90 this kernel is a programmatic dependent of the shrink kernel (when its
// own code has griddepcontrol: kernel_waits_for_pdl below): it starts
// streaming W while the shrink still runs and waits (griddepcontrol.wait) only before it
// reads U and the routes. The shrink also prefetches the active lora_b slabs into L2 (evict
// last) and W is read with an evict-first hint, so the epilogue's lora_b reads hit L2.
#include "cuda/common.cuh"
#include "cuda/warp_gemm.cuh"

#include <atomic>

namespace milora::cuda {
namespace {

constexpr int kDecodeWarps = 8;
constexpr int kMaxDevices = 64;
constexpr int kDecodeThreads = kDecodeWarps * 32;

struct DecodeArgs {
  LoraArgs l;
  const void* weight;  // [N, K], 2-byte aligned (any tensor's data is)
  const void* bias;    // [N] or nullptr
  void* y;             // [T, N]
  int row_step;        // 1: a CTA's rows are consecutive (K % 8 == 0); 8: every 8th row (below)
  bool vec_b;          // lora_b rows 16-byte aligned, R % 8 == 0
};

// Adds b[0..7] . u[0..7] to acc (b: 8 packed 16-bit values, u: 8 floats).
template <typename scalar_t>
__device__ __forceinline__ float dot8(uint4 b, const float* u, float acc) {
  const float4 u0 = load_vec<float4>(u);
  const float4 u1 = load_vec<float4>(u + 4);
  const float2 b0 = unpack2<scalar_t>(b.x), b1 = unpack2<scalar_t>(b.y), b2 = unpack2<scalar_t>(b.z),
               b3 = unpack2<scalar_t>(b.w);
  acc = fmaf(b0.x, u0.x, acc);
  acc = fmaf(b0.y, u0.y, acc);
  acc = fmaf(b1.x, u0.z, acc);
  acc = fmaf(b1.y, u0.w, acc);
  acc = fmaf(b2.x, u1.x, acc);
  acc = fmaf(b2.y, u1.y, acc);
  acc = fmaf(b3.x, u1.z, acc);
  return fmaf(b3.y, u1.w, acc);
}

template <typename scalar_t, int NT, int RT>
__global__ void __launch_bounds__(kDecodeThreads) milora_decode_fused_kernel(const DecodeArgs d) {
  constexpr int BN = 16 * RT;   // output rows per CTA
  constexpr int NT8 = 8 * NT;   // token columns of the tile (>= T)
  constexpr int LD = NT8 + 1;   // row stride of the reduced tile
  __shared__ float buf[reduce_floats<RT, NT, kDecodeWarps>()];
  __shared__ Route routes[NT8];

  const LoraArgs& a = d.l;
  const int64_t T = a.T, K = a.K, N = a.N, E = a.E, R = a.R;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, q = lane & 3;

  // ---- the CTA's rows: n0 + step * m, m in [0, BN) -------------------------------------
  // Row n of W starts at byte 2 n K from its base: with K % 8 == 0 every row sits at the same
  // offset from a 16-byte boundary, so a CTA takes BN consecutive rows. Otherwise rows n and
  // n + 8 share that offset (16 K bytes apart) and no two of n .. n + 7 need to: a CTA then
  // takes every 8th row (the 8 CTAs of a group of 8 BN rows, one per residue), so all of its
  // rows start `head` elements before a boundary and W keeps its 16-byte loads (KChunks).
  const int64_t step = d.row_step;
  const int64_t n0 = step == 1 ? static_cast<int64_t>(blockIdx.x) * BN
                               : static_cast<int64_t>(blockIdx.x / 8) * 8 * BN + blockIdx.x % 8;
  if (n0 >= N) return;  // row_step 8 and N small: no row of this residue (CTA-uniform exit)
  const int64_t rows = (N - 1 - n0) / step + 1 < BN ? (N - 1 - n0) / step + 1 : BN;  // valid rows, >= 1

  // ---- base: this warp's share of K for the CTA's BN rows and all tokens --------------
  const scalar_t* W = static_cast<const scalar_t*>(d.weight);
  const scalar_t* X = static_cast<const scalar_t*>(a.x);
  const scalar_t* a_rows[RT][2];
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = 16 * i + g + 8 * h;
      a_rows[i][h] = W + (n0 + step * (m < rows ? m : rows - 1)) * K;  // rows past N: a valid row of this CTA, result dropped
    }
  const scalar_t* b_rows[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int64_t t = 8 * j + g;
    b_rows[j] = X + (t < T ? t : T - 1) * a.ldx;  // tokens past T: a valid row, result dropped
  }
  float acc[RT][NT][4];
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

  // W rows: 16-byte loads from their first 16-byte boundary on (k = head), scalar before it
  // and after the last whole 16 bytes; x rows (16-byte aligned, padded to a multiple of 8
  // elements by the packing) are read at the same k, shifted by head within 16 bytes.
  const int head = head_elems(W + n0 * K);
  const KChunks kc = k_chunks(K, head);
  const int64_t c_begin = kc.count * warp / kDecodeWarps, c_end = kc.count * (warp + 1) / kDecodeWarps;
  WarpGemm<scalar_t, RT, NT, true, true>::run(a_rows, b_rows, c_begin, c_end, kc, K, true, true, head, q, acc);

  // ---- U and the routes come from the shrink kernel ------------------------------------
  pdl_wait();
  if (tid < T) routes[tid] = load_route(a.routes, tid);
  cta_reduce<RT, NT, kDecodeWarps>(acc, buf, warp, lane);  // ends with __syncthreads()

  // ---- epilogue: bias + gated expand, one rounding, y written once ---------------------
  // Each thread owns kItems (token, row) items, item = tid + i * kDecodeThreads with
  // consecutive threads on consecutive rows n (coalesced y stores, contiguous lora_b rows).
  // The lora_b loads of all its items are issued together (they hit L2: the shrink kernel
  // prefetched the slabs), so their latency is paid once per expert and 16 ranks, not per item.
  constexpr int kItems = (BN * NT8 + kDecodeThreads - 1) / kDecodeThreads;
  const scalar_t* bias = static_cast<const scalar_t*>(d.bias);
  const scalar_t* B = static_cast<const scalar_t*>(a.lora_b);
  scalar_t* y = static_cast<scalar_t*>(d.y);
  float v[kItems];
  int tok[kItems];
  int64_t row[kItems];
  bool ok[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int item = tid + i * kDecodeThreads;
    tok[i] = item / BN;
    const int nl = item % BN;
    row[i] = n0 + step * nl;
    ok[i] = tok[i] < T && nl < rows;
    v[i] = ok[i] ? buf[nl * LD + tok[i]] : 0.f;
    if (ok[i] && bias != nullptr) v[i] += to_float(bias[row[i]]);
  }
  for (int64_t e = 0; e < E; ++e) {
    float gate[kItems], dot[kItems];
    const scalar_t* brow[kItems];
    const float* urow[kItems];
    bool any = false;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const Route rt = routes[ok[i] ? tok[i] : 0];
      gate[i] = ok[i] && rt.p >= 0 ? a.gates[rt.s * E + e] : 0.f;  // 0: no work for this item
      brow[i] = B + ((static_cast<int64_t>(rt.p < 0 ? 0 : rt.p) * E + e) * N + row[i]) * R;
      urow[i] = a.U + (tok[i] * E + e) * R;
      dot[i] = 0.f;
      any |= gate[i] != 0.f;
    }
    if (!any) continue;
    if (d.vec_b) {  // R % 8 == 0, rows 16-byte aligned
      for (int64_t r = 0; r < R; r += 8) {
        uint4 bv[kItems];
#pragma unroll
        for (int i = 0; i < kItems; ++i)
          if (gate[i] != 0.f) bv[i] = ldg16(brow[i] + r);
#pragma unroll
        for (int i = 0; i < kItems; ++i)
          if (gate[i] != 0.f) dot[i] = dot8<scalar_t>(bv[i], urow[i] + r, dot[i]);
      }
    } else {
      for (int64_t r = 0; r < R; ++r) {
#pragma unroll
        for (int i = 0; i < kItems; ++i)
          if (gate[i] != 0.f) dot[i] = fmaf(to_float(brow[i][r]), urow[i][r], dot[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (gate[i] != 0.f) v[i] = fmaf(gate[i], dot[i], v[i]);
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i)
    if (ok[i]) y[tok[i] * N + row[i]] = from_float<scalar_t>(v[i]);
}

// Whether the code of this kernel that runs on the current device has griddepcontrol.wait,
// i.e. was compiled from PTX for sm_90+ (pdl_wait is empty below __CUDA_ARCH__ 900). The
// device's compute capability does not say so: an "8.0+PTX" build runs on an H200 as
// compute_80 PTX JIT-compiled to sm_90 (binaryVersion 90, ptxVersion 80) with no wait, and a
// programmatic launch would then read U and the routes before the shrink kernel wrote them.
// Read once per device from cudaFuncGetAttributes (its ptxVersion / binaryVersion).
template <typename Kernel>
bool kernel_waits_for_pdl(Kernel kernel, std::atomic<int> (&cache)[kMaxDevices]) {
#ifdef MILORA_CUDA_EMULATION
  (void)kernel;
  (void)cache;
  return false;  // the emulator runs grids one after the other
#else
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return false;
  int v = cache[dev].load(std::memory_order_relaxed);  // 0 unknown, 1 no, 2 yes
  if (v == 0) {
    cudaFuncAttributes attr{};
    v = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.ptxVersion >= 90 && attr.binaryVersion >= 90 ? 2 : 1;
    cache[dev].store(v, std::memory_order_relaxed);
  }
  return v == 2;
#endif
}

template <typename scalar_t, int NT, int RT>
cudaError_t launch_one(const DecodeArgs& d, bool pdl, cudaStream_t stream) {
  static std::atomic<int> pdl_cache[kMaxDevices] = {};  // one per kernel instantiation
  auto* kernel = milora_decode_fused_kernel<scalar_t, NT, RT>;
  pdl = pdl && kernel_waits_for_pdl(kernel, pdl_cache);
  const int64_t rows_per_cta = 16 * RT;
  const unsigned blocks = static_cast<unsigned>(
      d.row_step == 1 ? ceil_div<int64_t>(d.l.N, rows_per_cta) : 8 * ceil_div<int64_t>(d.l.N, 8 * rows_per_cta));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(kDecodeThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, d);
}

template <typename scalar_t>
cudaError_t launch_typed(const DecodeArgs& d, int row_tiles, bool pdl, cudaStream_t stream) {
  // NT token tiles of 8 (power of two >= T); RT row tiles of 16 per CTA: 1 up to 16 tokens,
  // 2 above (row_tiles = 1 or 2 forces it for T > 16; a tuning switch).
  const int64_t tokens = d.l.T;
  if (tokens <= 8) return launch_one<scalar_t, 1, 1>(d, pdl, stream);
  if (tokens <= 16) return launch_one<scalar_t, 2, 1>(d, pdl, stream);
  if (tokens <= 32) {
    return row_tiles == 1 ? launch_one<scalar_t, 4, 1>(d, pdl, stream) : launch_one<scalar_t, 4, 2>(d, pdl, stream);
  }
  return row_tiles == 1 ? launch_one<scalar_t, 8, 1>(d, pdl, stream) : launch_one<scalar_t, 8, 2>(d, pdl, stream);
}

}  // namespace

cudaError_t launch_decode_fused(const LoraArgs& a, const void* weight, const void* bias, void* y, int row_tiles,
                                bool pdl, cudaStream_t stream) {
  if (a.T < 1 || a.T > kDecodeMaxTokens || a.dtype == DType::kFloat32) return cudaErrorInvalidValue;
  // x: rows 16-byte aligned and padded to a multiple of 8 elements (lora_args.h packs it so).
  if (!host_aligned(a.x, 16) || a.ldx % 8 != 0 || a.ldx < a.K || !host_aligned(weight, 2)) return cudaErrorInvalidValue;
  DecodeArgs d;
  d.l = a;
  d.weight = weight;
  d.bias = bias;
  d.y = y;
  d.row_step = a.K % 8 == 0 ? 1 : 8;
  d.vec_b = a.R % 8 == 0 && host_aligned(a.lora_b, 16);
  if (a.dtype == DType::kFloat16) return launch_typed<__half>(d, row_tiles, pdl, stream);
  return launch_typed<__nv_bfloat16>(d, row_tiles, pdl, stream);
}

}  // namespace milora::cuda
