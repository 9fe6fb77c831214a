"""Tenant isolation of gated_lora_linear on CPU: a token's output depends only on x[t], the
base weights and its own adapter's experts with a non-zero gate. NaN / Inf in another
tenant's adapter (and input rows), in an unused slot, or in an expert whose gate is 0 for the
token never reach it (milora_ext.workloads.tenant_isolation_problem builds the batch; the
CUDA paths are checked by test_cuda_emulated.py and test_cuda_gated_lora_linear.py)."""
import pytest
import torch

import milora_ext
from milora_ext.workloads import tenant_isolation_problem

from milora_ext.accuracy import check_against_reference

POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
LENS = {
    "decode": [1] * 10,
    "mixed": [5, 7, 3, 40, 9, 2, 13, 1, 20, 30],
    "long": [70, 3, 65, 1, 140, 33],  # 140: the ATen GEMM route (runs of 128+ tokens)
}


@pytest.mark.parametrize("lens", list(LENS))
@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_poisoned_tenants_do_not_reach_others(dtype, poison, lens):
    bad, clean, protected = tenant_isolation_problem(LENS[lens], poison=POISONS[poison], dtype=dtype, seed=len(lens))
    assert protected and len(protected) < bad.x.shape[0]
    y_clean = milora_ext.gated_lora_linear(*clean.args())
    check_against_reference(y_clean, clean.args())
    y_bad = milora_ext.gated_lora_linear(*bad.args())
    assert torch.equal(y_bad[protected], y_clean[protected]), "a poisoned adapter changed another token's output"
    unprotected = sorted(set(range(bad.x.shape[0])) - set(protected))
    assert not torch.isfinite(y_bad[unprotected]).all(), "the poison must reach the tokens that read it"


def test_isolation_holds_under_autograd():
    # The autograd kernel runs the same forward; dx of another tenant's tokens is unaffected
    # too (the backward groups tokens by adapter).
    bad, clean, protected = tenant_isolation_problem([4, 6, 2, 9, 3, 5], poison=float("inf"), seed=3)
    ys, dxs = [], []
    for p in (clean, bad):
        x = p.x.detach().clone().requires_grad_(True)
        y = milora_ext.gated_lora_linear(x, *p.args()[1:])
        y.backward(torch.ones_like(y))
        ys.append(y.detach())
        dxs.append(x.grad)
    assert torch.equal(ys[1][protected], ys[0][protected])
    offs, ids = bad.seq_offsets.tolist(), bad.adapter_ids.tolist()
    other = [t for s, p in enumerate(ids) if p in (-1, 2) for t in range(offs[s], offs[s + 1])]
    assert torch.equal(dxs[1][other], dxs[0][other])
