"""Small calls through every CUDA path of gated_lora_linear, for compute-sanitizer memcheck
(scripts/gpu_check.sh): decode (aligned and odd K), prefill preinit / rmw, float32, and
garbage indices with the host checks off. Prints SANITIZER_CASE_OK at the end."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import milora_ext  # noqa: E402
import _cuda_cases as cc  # noqa: E402


def run(case, **env):
    with cc.env_vars(**env):
        return milora_ext.gated_lora_linear(*cc.args(case))


for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for K, N, lens in [(128, 96, [1] * 5), (257, 129, [3, 0, 9]), (96, 72, [70, 1, 30]), (33, 17, [64])]:
        case = cc.make_case(K=K, N=N, E=3, R=16, seq_lens=lens, dtype=dtype, device="cuda")
        run(case)
        run(case, MILORA_DECODE_MAX_TOKENS="0")
        run(case, MILORA_DECODE_MAX_TOKENS="0", MILORA_PREFILL_EPILOGUE="rmw")
        run(case, MILORA_PDL="0")

milora_ext.set_index_checks(False)
for dtype, T in ((torch.bfloat16, 5), (torch.float16, 100), (torch.float32, 9)):
    case = cc.make_case(K=40, N=24, E=2, R=8, seq_lens=[T], P=3, dtype=dtype, device="cuda")
    case["seq_offsets"] = torch.tensor([2**40, -5, 3, T + 7, 1], device="cuda")
    case["adapter_ids"] = torch.tensor([1, 2**40, -9, 0], device="cuda")
    case["gates"] = torch.rand(4, 2, device="cuda")
    run(case)
torch.cuda.synchronize()
print("SANITIZER_CASE_OK")
