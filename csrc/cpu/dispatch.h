// Query and control of the CPU kernel level (cpu/isa.h), for the op schemas in milora_ext.cpp.
#pragma once

#include <string>

namespace milora::cpu {

// Name of the level the kernels use now: "default", "avx2", "avx512", "avx512_bf16" or "amx".
std::string cpu_capability_op();
// The highest level this machine (and build) can run.
std::string max_cpu_capability_op();
// Switches the level for the rest of the process (or until the next call); raises a
// ValueError for an unknown name or a level above max_cpu_capability. Returns the previous one.
std::string set_cpu_capability_op(const std::string& level);

}  // namespace milora::cpu
