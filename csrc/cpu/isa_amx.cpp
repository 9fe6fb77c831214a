// The LoRA kernels for AVX-512 F/BW/VL/DQ + AVX-512-BF16 + AMX-TILE + AMX-BF16 (see cpu/isa.h). The target switch applies to every function
// of this unit, which includes nothing but cpu/lora_kernels.h and what it includes.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")
#endif
#define MILORA_ISA_NS isa_amx
#define MILORA_ISA_LEVEL 4
#define MILORA_ISA_TABLE kernels_amx
#include "cpu/lora_kernels.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
#include "cpu/isa.h"
const milora::cpu::KernelTable* milora::cpu::kernels_amx() { return nullptr; }
#endif
