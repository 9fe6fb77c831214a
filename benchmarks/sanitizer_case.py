"""Small calls through every CUDA path of gated_lora_linear, for compute-sanitizer
(scripts/gpu_check.sh): decode (aligned and odd K), prefill preinit / rmw, float32, misaligned
views, a tenant-isolation batch with non-finite adapters, and garbage indices with the host
checks off. --quick: one small call per path (racecheck / synccheck are slow). Prints
SANITIZER_CASE_OK at the end."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import milora_ext  # noqa: E402
from milora_ext import workloads as wl  # noqa: E402

PATHS = [{}, {"MILORA_DECODE_MAX_TOKENS": "0"}, {"MILORA_DECODE_MAX_TOKENS": "0", "MILORA_PREFILL_EPILOGUE": "rmw"},
         {"MILORA_PDL": "0"}]


def run(case, **env):
    with wl.env_vars(**env):
        return milora_ext.gated_lora_linear(*wl.case_args(case))


def misaligned(case):
    """x, weight, lora_a, lora_b as views one element past a 16-byte boundary."""
    out = dict(case)
    for key in ("x", "weight", "lora_a", "lora_b"):
        t = case[key]
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        out[key] = buf[1:].view(t.shape)
        out[key].copy_(t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one small call per path")
    quick = ap.parse_args().quick
    shapes = [(128, 96, [1] * 5), (96, 72, [70, 1, 30])] if quick else \
        [(128, 96, [1] * 5), (257, 129, [3, 0, 9]), (96, 72, [70, 1, 30]), (33, 17, [64])]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for K, N, lens in shapes:
            case = wl.make_case(K=K, N=N, E=3, R=16, seq_lens=lens, dtype=dtype, device="cuda")
            for env in PATHS:
                run(case, **env)
            if not quick:
                for env in PATHS:
                    run(misaligned(case), **env)
        if dtype == torch.float32 and quick:
            continue
        bad, _, _ = wl.tenant_isolation_problem([5, 7, 3, 40, 9, 2, 13, 1, 20, 30], poison=float("inf"), dtype=dtype,
                                                device="cuda")
        for env in PATHS:
            run(bad.as_dict(), **env)

    milora_ext.set_index_checks(False)
    for dtype, T in ((torch.bfloat16, 5), (torch.float16, 100), (torch.float32, 9)):
        case = wl.make_case(K=40, N=24, E=2, R=8, seq_lens=[T], P=3, dtype=dtype, device="cuda")
        case["seq_offsets"] = torch.tensor([2**40, -5, 3, T + 7, 1], device="cuda")
        case["adapter_ids"] = torch.tensor([1, 2**40, -9, 0], device="cuda")
        case["gates"] = torch.rand(4, 2, device="cuda")
        run(case)
    torch.cuda.synchronize()
    print("SANITIZER_CASE_OK")


if __name__ == "__main__":
    main()
