// CPU emulation of the few CUDA device features the milora kernels use, so that the kernel
// sources themselves run, unchanged, on a machine without a GPU (compiled as C++ with
// -DMILORA_CUDA_EMULATION; see tests/cuda_emulation/ and tests/test_cuda_emulated.py).
//
// Model: CTAs run one after the other; the threads of a CTA are fibers (ucontext) on one OS
// thread, switched only at barriers, so a run is deterministic; __shared__ becomes `static`
// (one CTA at a time, so one copy suffices); __syncthreads and the warp collectives
// (shuffles, ballots, mma.sync) are barriers over the CTA / the 32 lanes of a warp.
// mma.sync follows the PTX fragment layout of m16n8k16 (float32 accumulation).
// It checks the kernels' logic (indexing, fragment layouts, routing, masking, tails), not
// their speed or memory-model subtleties; it is never part of the real build.
#pragma once

#ifndef MILORA_CUDA_EMULATION
#error "emulation.h is only for -DMILORA_CUDA_EMULATION builds"
#endif

#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

// The builtin variables, set by the scheduler before it resumes a fiber.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace milora::emu {

void yield();

// A misaligned vector access faults on a GPU; here it stops the process with a message.
inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    std::fprintf(stderr, "milora CUDA emulation: misaligned %zu-byte access at %p\n", bytes, p);
    std::abort();
  }
}

// Load accounting, for tests that check which load width a kernel uses on an operand: the
// bytes read by vector / __ldg loads (not plain dereferences) inside a few watched address
// ranges, by access width. The driver (tests/cuda_emulation/emu_ext.cpp) watches the op's
// operands for each run.
struct LoadStats {
  static constexpr int kRanges = 4;
  static constexpr int kWidths = 5;  // 1, 2, 4, 8, 16 bytes
  const char* begin[kRanges] = {};
  const char* end[kRanges] = {};
  uint64_t bytes[kRanges][kWidths] = {};
};
inline LoadStats load_stats;

// Starts counting loads inside [p, p + bytes) as range `slot` (and clears its counts).
inline void watch(int slot, const void* p, size_t bytes) {
  load_stats.begin[slot] = static_cast<const char*>(p);
  load_stats.end[slot] = static_cast<const char*>(p) + bytes;
  for (uint64_t& b : load_stats.bytes[slot]) b = 0;
}

inline void note_load(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  const int w = bytes == 16 ? 4 : bytes == 8 ? 3 : bytes == 4 ? 2 : bytes == 2 ? 1 : 0;
  for (int i = 0; i < LoadStats::kRanges; ++i)
    if (c >= load_stats.begin[i] && c < load_stats.end[i]) load_stats.bytes[i][w] += bytes;
}

// A reusable barrier whose party count shrinks when a thread exits early.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    const unsigned gen = gen_;
    if (++waiting_ == count_) {
      release();
      return;
    }
    while (gen_ == gen) yield();
  }
  void drop() {
    --count_;
    if (waiting_ > 0 && waiting_ == count_) release();
  }

 private:
  void release() {
    waiting_ = 0;
    ++gen_;
  }
  int count_;
  int waiting_ = 0;
  unsigned gen_ = 0;
};

struct Warp {
  explicit Warp(int lanes) : bar(lanes) {}
  Barrier bar;
  uint64_t slot[32] = {};
  uint32_t a[32][4] = {}, b[32][2] = {};
};

struct Cta {
  explicit Cta(int threads) : bar(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(new Warp(threads - 32 * w < 32 ? threads - 32 * w : 32));
  }
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline Cta* tls_cta = nullptr;  // the running CTA

inline Warp& warp() { return *tls_cta->warps[threadIdx.x / 32]; }
inline int lane() { return static_cast<int>(threadIdx.x % 32); }

template <typename V>
inline uint64_t to_bits(V v) {
  static_assert(sizeof(V) <= 8, "");
  uint64_t r = 0;
  std::memcpy(&r, &v, sizeof(V));
  return r;
}
template <typename V>
inline V from_bits(uint64_t r) {
  V v;
  std::memcpy(&v, &r, sizeof(V));
  return v;
}

template <typename V>
inline V shfl(V v, int src) {
  Warp& w = warp();
  w.slot[lane()] = to_bits(v);
  w.bar.wait();
  const V r = from_bits<V>(w.slot[src & 31]);
  w.bar.wait();
  return r;
}

inline uint32_t ballot(bool pred) {
  Warp& w = warp();
  w.slot[lane()] = pred ? 1 : 0;
  w.bar.wait();
  uint32_t bits = 0;
  for (int i = 0; i < 32; ++i) bits |= static_cast<uint32_t>(w.slot[i] & 1u) << i;
  w.bar.wait();
  return bits;
}

// mma.sync.m16n8k16.row.col, float32 accumulation, PTX fragment layout:
//   A reg j of lane (g, q): row g + 8 (j & 1), cols 2q + 8 (j >> 1) + {0, 1}
//   B reg j: rows (k) 2q + 8 j + {0, 1}, col g;   C c: row g + 8 (c >> 1), col 2q + (c & 1)
inline float to_f32(__half v) { return __half2float(v); }
inline float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
inline float half_at(uint32_t reg, int h) {
  const uint16_t bits = static_cast<uint16_t>(h ? reg >> 16 : reg & 0xffffu);
  T v;
  std::memcpy(&v, &bits, 2);
  return to_f32(v);
}

template <typename T>
inline void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  Warp& w = warp();
  const int l = lane();
  w.a[l][0] = a0, w.a[l][1] = a1, w.a[l][2] = a2, w.a[l][3] = a3;
  w.b[l][0] = b0, w.b[l][1] = b1;
  w.bar.wait();
  const int g = l >> 2, q = l & 3;
  for (int c = 0; c < 4; ++c) {
    const int row = g + 8 * (c >> 1), col = 2 * q + (c & 1);
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) {
      const int la = (row % 8) * 4 + (k % 8) / 2, ra = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
      const int lb = col * 4 + (k % 8) / 2, rb = k >= 8 ? 1 : 0;
      sum += half_at<T>(w.a[la][ra], k & 1) * half_at<T>(w.b[lb][rb], k & 1);
    }
    d[c] += sum;
  }
  w.bar.wait();
}

// The fibers of the running CTA and the scheduler that resumes them in turn.
struct Scheduler {
  static constexpr size_t kStack = 256 * 1024;
  struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    bool done = true;
  };
  ucontext_t main;
  std::vector<Fiber> fibers;
  int current = -1;
  const std::function<void()>* job = nullptr;

  static Scheduler& get() {
    static Scheduler s;
    return s;
  }
  static void entry() {
    Scheduler& s = get();
    const int id = s.current;
    (*s.job)();
    tls_cta->warps[id / 32]->bar.drop();  // a thread that returned no longer takes part
    tls_cta->bar.drop();
    s.fibers[id].done = true;
  }  // returns to `main` through uc_link

  void run_cta(int threads, const std::function<void()>& fn) {
    Cta cta(threads);
    if (static_cast<int>(fibers.size()) < threads) fibers.resize(threads);
    job = &fn;
    for (int i = 0; i < threads; ++i) {
      Fiber& f = fibers[i];
      if (!f.stack) f.stack.reset(new char[kStack]);
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &main;
      makecontext(&f.ctx, &Scheduler::entry, 0);
      f.done = false;
    }
    for (bool left = true; left;) {  // round robin until every thread has returned
      left = false;
      for (int i = 0; i < threads; ++i) {
        if (fibers[i].done) continue;
        current = i;
        tls_cta = &cta;
        threadIdx = make_uint3(static_cast<unsigned>(i), 0, 0);
        swapcontext(&main, &fibers[i].ctx);
        left |= !fibers[i].done;
      }
    }
    current = -1;
    tls_cta = nullptr;
  }
};

// Called by a fiber waiting at a barrier: lets the others run.
inline void yield() {
  Scheduler& s = Scheduler::get();
  swapcontext(&s.fibers[s.current].ctx, &s.main);
}

// Runs fn for every thread of every CTA of the grid; CTAs in order, threads interleaved.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& fn) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = make_uint3(x, y, z);
        Scheduler::get().run_cta(threads, fn);
      }
}

}  // namespace milora::emu

// ---- the device builtins the kernels use --------------------------------------------

inline void __syncthreads() { milora::emu::tls_cta->bar.wait(); }
template <typename V>
inline V __ldg(const V* p) {
  milora::emu::check_aligned(p, alignof(V));
  milora::emu::note_load(p, sizeof(V));
  return *p;
}
template <typename V>
inline V __shfl_sync(unsigned, V v, int src) {
  return milora::emu::shfl(v, src);
}
template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int mask) {
  return milora::emu::shfl(v, milora::emu::lane() ^ mask);
}
inline unsigned __ballot_sync(unsigned, bool pred) { return milora::emu::ballot(pred); }
inline bool __any_sync(unsigned, bool pred) { return milora::emu::ballot(pred) != 0; }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(static_cast<int>(v)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline float __uint_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, sizeof f);
  return f;
}
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }

// cudaLaunchKernelEx (the runtime's C++ template) runs the kernel in the emulator; launch
// attributes (programmatic dependent launch) do not apply to sequential execution.
template <typename... Params, typename... Args>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  milora::emu::launch(config->gridDim, config->blockDim, [&] { kernel(args...); });
  return cudaSuccess;
}
