// The emulator's load accounting (csrc/cuda/emulation.h: LoadStats) for the driver
// emu_ext.cpp, which cannot include emulation.h next to the ATen headers.
#include "cuda/emulation.h"

namespace milora::emu {

void watch_range(int slot, const void* p, size_t bytes) { watch(slot, p, bytes); }

uint64_t loaded_bytes(int slot, int width_index) { return load_stats.bytes[slot][width_index]; }

}  // namespace milora::emu
