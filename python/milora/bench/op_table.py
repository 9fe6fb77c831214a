"""The foundation benchmark of milora_ext.gated_lora_linear: one table, op vs base vs PEFT-style loop.

    python -m milora.bench.op_table [--dtypes float32 bfloat16] [--repeats 7] [--json out.json]

Shapes: K = N = 4096, R = 16; decode with T = S in {1, 8, 32}, one adapter per sequence
(P = S), E = 1 and E = 4 with 2 non-zero gates; prefill T = 2048 in 4 sequences.
Columns: F.linear alone (base), the fused op, a PEFT-style Python loop over adapters,
op / base, and the byte floor = (bytes of W + bytes of the active adapters' A and B) / bytes
of W, the ratio a purely memory-bound op could reach.
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List

import torch
import torch.nn.functional as F

import milora_ext
from milora_ext.workloads import Problem, make_problem

from .timing import environment, format_env, time_interleaved


def peft_style_loop(p: Problem) -> torch.Tensor:
    """How PEFT serves a mixed batch: base output, then per adapter in the batch, gather its
    rows, run its LoRA (here: its experts with a non-zero gate), scatter-add the result."""
    y = F.linear(p.x, p.weight, p.bias)
    lens = p.seq_offsets.diff()
    token_adapter = torch.repeat_interleave(p.adapter_ids, lens, output_size=p.x.shape[0])
    token_gates = torch.repeat_interleave(p.gates, lens, dim=0, output_size=p.x.shape[0])
    for adapter in torch.unique(p.adapter_ids).tolist():
        if adapter < 0:
            continue
        rows = (token_adapter == adapter).nonzero().squeeze(1)
        xs = p.x.index_select(0, rows)
        gs = token_gates.index_select(0, rows)
        delta = None
        for e in range(p.gates.shape[1]):
            if not bool(gs[:, e].any()):
                continue
            term = ((xs @ p.lora_a[adapter, e].t()) @ p.lora_b[adapter, e].t()) * gs[:, e : e + 1].to(xs.dtype)
            delta = term if delta is None else delta + term
        if delta is not None:
            y.index_add_(0, rows, delta)
    return y


def byte_floor(p: Problem) -> float:
    w_bytes = p.weight.numel() * p.weight.element_size()
    return (w_bytes + p.active_adapter_bytes()) / w_bytes


def cases(K: int, N: int, R: int) -> List[Dict]:
    out = []
    for T in (1, 8, 32):
        for E, active in ((1, None), (4, 2)):
            out.append(dict(bench="decode", seq_lens=[1] * T, ids=list(range(T)), P=T, E=E, active=active))
    for E, active in ((1, None), (4, 2)):
        out.append(dict(bench="prefill", seq_lens=[512] * 4, ids=[0, 1, 2, 3], P=4, E=E, active=active))
    return out


def run(dtypes, repeats: int, K: int = 4096, N: int = 4096, R: int = 16, prefill_repeats: int = 3) -> List[Dict]:
    records = []
    for dtype in dtypes:
        for c in cases(K, N, R):
            p = make_problem(c["seq_lens"], c["ids"], K=K, N=N, P=c["P"], E=c["E"], R=R,
                             active_experts=c["active"], dtype=dtype, bias=False)
            torch.testing.assert_close(milora_ext.gated_lora_linear(*p.args()), peft_style_loop(p),
                                       rtol=5e-2, atol=5e-2)
            t = time_interleaved(
                {
                    "base": lambda: F.linear(p.x, p.weight, p.bias),
                    "op": lambda: milora_ext.gated_lora_linear(*p.args()),
                    "peft_loop": lambda: peft_style_loop(p),
                },
                "cpu",
                warmup=1,
                repeats=prefill_repeats if c["bench"] == "prefill" else repeats,
            )
            rec = dict(
                bench=c["bench"], dtype=str(dtype).replace("torch.", ""), tokens=sum(c["seq_lens"]),
                seqs=len(c["seq_lens"]), adapters=c["P"], experts=c["E"], active_experts=c["active"] or c["E"],
                rank=R, K=K, N=N,
                base_ms=t["base"].median_ms, op_ms=t["op"].median_ms, peft_loop_ms=t["peft_loop"].median_ms,
                op_over_base=t["op"].median_ms / t["base"].median_ms,
                peft_loop_over_base=t["peft_loop"].median_ms / t["base"].median_ms,
                byte_floor=byte_floor(p),
            )
            records.append(rec)
            print(format_row(rec), flush=True)
    return records


HEADER = ("| bench | dtype | T | S=P | E (active) | base ms | op ms | PEFT loop ms | op/base | loop/base | byte floor |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: Dict) -> str:
    floor = f"{r['byte_floor']:.3f}" if r["bench"] == "decode" else "-"
    return (f"| {r['bench']} | {r['dtype']} | {r['tokens']} | {r['seqs']} | {r['experts']} ({r['active_experts']}) | "
            f"{r['base_ms']:.2f} | {r['op_ms']:.2f} | {r['peft_loop_ms']:.2f} | {r['op_over_base']:.3f} | "
            f"{r['peft_loop_over_base']:.2f} | {floor} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--prefill-repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    env = environment(torch.device("cpu"))
    print(format_env(env))
    print(HEADER)
    records = run(dtypes, args.repeats, prefill_repeats=args.prefill_repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
