// The LoRA kernels for any CPU: no instruction-set extension beyond the compiler's baseline
// (SSE2 on x86-64). See cpu/isa.h.
#define MILORA_ISA_NS isa_default
#define MILORA_ISA_LEVEL 0
#define MILORA_ISA_TABLE kernels_default
#include "cpu/lora_kernels.h"
