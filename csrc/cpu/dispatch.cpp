// Chooses the ISA level of the CPU LoRA kernels once per process, like ATen's CPU_CAPABILITY:
// the highest level cpuid reports (and the OS enables: __builtin_cpu_supports checks XCR0),
// lowered by MILORA_CPU_CAPABILITY=default|avx2|avx512|avx512_bf16|amx when that is set.
// Only kernel tables of levels this machine runs are ever touched.
#include "cpu/dispatch.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

#include "cpu/isa.h"

namespace milora::cpu {
namespace {

constexpr const char* kNames[kNumCapabilities] = {"default", "avx2", "avx512", "avx512_bf16", "amx"};

const KernelTable* table_of(CpuCapability c) {
  switch (c) {
    case CpuCapability::kAvx2: return kernels_avx2();
    case CpuCapability::kAvx512: return kernels_avx512();
    case CpuCapability::kAvx512Bf16: return kernels_avx512_bf16();
    case CpuCapability::kAmx: return kernels_amx();
    default: return kernels_default();
  }
}

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
// AMX-TILE and AMX-BF16 (cpuid leaf 7: EDX bits 24 and 22), the tile state enabled by the OS
// (XCR0 bits 17 and 18), and, on Linux, this process's permission to use it, asked for once
// (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; without it the first tile
// instruction faults). oneDNN asks for the same permission when it uses AMX.
bool amx_usable() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!(d & (1u << 24)) || !(d & (1u << 22))) return false;
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  if (!__get_cpuid(1, &a1, &b1, &c1, &d1) || !(c1 & (1u << 27))) return false;  // OSXSAVE: xgetbv is allowed
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const uint64_t xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
  if ((xcr0 & (uint64_t(3) << 17)) != (uint64_t(3) << 17)) return false;
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;  // other kernels' permission schemes are not handled: no AMX level there
#endif
}
#endif

CpuCapability detect() {
  CpuCapability best = CpuCapability::kDefault;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    best = CpuCapability::kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")) {
      best = CpuCapability::kAvx512;
      if (__builtin_cpu_supports("avx512bf16")) {
        best = CpuCapability::kAvx512Bf16;
        if (amx_usable()) best = CpuCapability::kAmx;
      }
    }
  }
#endif
  // A level this build did not compile (non-x86) is skipped.
  while (best != CpuCapability::kDefault && table_of(best) == nullptr)
    best = static_cast<CpuCapability>(static_cast<int>(best) - 1);
  return best;
}

int parse(const std::string& name) {
  for (int i = 0; i < kNumCapabilities; ++i)
    if (name == kNames[i]) return i;
  return -1;
}

std::string known_names() {
  std::string s;
  for (int i = 0; i < kNumCapabilities; ++i) s += std::string(i ? ", " : "") + kNames[i];
  return s;
}

std::atomic<int> g_level{-1};
std::once_flag g_init;

void init_level() {
  std::call_once(g_init, [] {
    const CpuCapability best = detect();
    int level = static_cast<int>(best);
    if (const char* env = std::getenv("MILORA_CPU_CAPABILITY"); env != nullptr && *env != '\0') {
      const int want = parse(env);
      if (want < 0) {
        TORCH_WARN("MILORA_CPU_CAPABILITY=", env, " is not one of ", known_names(), "; using ", kNames[level]);
      } else if (want > level) {
        TORCH_WARN("MILORA_CPU_CAPABILITY=", env, " is above what this CPU runs; using ", kNames[level]);
      } else {
        level = want;
      }
    }
    g_level.store(level);
  });
}

}  // namespace

CpuCapability best_cpu_capability() {
  static const CpuCapability best = detect();
  return best;
}

CpuCapability cpu_capability() {
  init_level();
  return static_cast<CpuCapability>(g_level.load());
}

const KernelTable& active_kernels() {
  return *table_of(cpu_capability());
}

const char* capability_name(CpuCapability c) {
  return kNames[static_cast<int>(c)];
}

std::string cpu_capability_op() {
  return capability_name(cpu_capability());
}

std::string max_cpu_capability_op() {
  return capability_name(best_cpu_capability());
}

std::string set_cpu_capability_op(const std::string& level) {
  const int want = parse(level);
  TORCH_CHECK_VALUE(want >= 0, "set_cpu_capability: level '", level, "' is not one of ", known_names());
  const CpuCapability best = best_cpu_capability();
  TORCH_CHECK_VALUE(want <= static_cast<int>(best), "set_cpu_capability: level '", level,
                    "' is above what this CPU (or build) runs, which is '", capability_name(best), "'");
  init_level();
  return kNames[g_level.exchange(want)];
}

}  // namespace milora::cpu
