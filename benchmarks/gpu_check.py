"""Device check of the CUDA kernels of milora_ext.gated_lora_linear: a correctness pass and
timings against cuBLAS and plain-PyTorch LoRA. Run by scripts/gpu_check.sh; standalone:

    python benchmarks/gpu_check.py --out OUTDIR [--iters 30] [--no-flush] [--quick]

Writes OUTDIR/bench.json (GPU, date, versions, D2D bandwidth, one record per shape x dtype x
method) and OUTDIR/bench_table.md after every case (a timeout keeps what was measured;
"complete": true once the run ends), and prints the table. Decode shapes come in two adapter
mixes: "distinct" (each token its own adapter) and "shared" (all tokens one adapter).

Methods (all produce the same y):
  base          F.linear(x, W, b): cuBLAS, the floor every LoRA method is compared with
  milora        milora_ext.gated_lora_linear, index checks off (as under CUDA graphs)
  milora_graph  the same op replayed from a CUDA graph (no CPU launch overhead)
  milora_nopdl  decode only: MILORA_PDL=0 (shrink and fused kernel serialised)
  milora_rows16 decode, T > 16 only: MILORA_DECODE_ROW_TILES=1 (16 rows per CTA, not 32)
  milora_rmw    prefill only: MILORA_PREFILL_EPILOGUE=rmw (GEMM first, expand adds into y)
  lora_torch    F.linear + the LoRA term by batched torch ops (decode: per-token gathered
                A/B and bmm; prefill: one matmul pair per sequence and expert)
  peft_loop     F.linear + a PEFT-style loop over the adapters present (rows of each
                adapter gathered, every expert of it, gated per row), host-side indexing

Timing: CUDA events around one call, after 3 warm-ups, median over --iters calls; by default
a 256 MiB buffer is rewritten before each call so W does not sit in the 60 MB L2 (--no-flush
to skip). floor_ratio = median / byte floor, the byte floor being (bytes of W + bias + the
active lora_a / lora_b slabs + x + y) / the measured device-to-device copy rate (bytes read
plus bytes written per second, torch copy_ of 1 GiB).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import milora_ext  # noqa: E402
from milora_ext import workloads as wl  # noqa: E402
from milora_ext.accuracy import check_against_reference, max_err, reference64  # noqa: E402

DEV = "cuda"


# ---- timing ------------------------------------------------------------------------------


class Timer:
    def __init__(self, iters: int, flush: bool):
        self.iters = iters
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEV) if flush else None

    def __call__(self, fn) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        events = []
        for _ in range(self.iters):
            if self.flush is not None:
                self.flush.fill_(1)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def d2d_traffic_bytes_per_s(timer_iters: int = 10) -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    t = Timer(timer_iters, flush=False)(lambda: b.copy_(a))
    del a, b
    return 2 * n / (t * 1e-3)


# ---- methods -----------------------------------------------------------------------------


def lora_torch(case, host):
    x, W, bias, A, B = case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"]
    y = F.linear(x, W, bias)
    if host["decode"]:
        tok_ad = host["tok_adapter"]  # [T] device long, -1 -> slot 0 with gate 0
        g = host["tok_gates"]  # [T, E] (0 for tokens without an adapter)
        Ag = A[tok_ad]  # [T, E, R, K]
        Bg = B[tok_ad]  # [T, E, N, R]
        u = torch.einsum("tk,terk->ter", x, Ag) * g[:, :, None].to(x.dtype)
        y = y + torch.einsum("ter,tenr->tn", u, Bg)
        return y
    for s, (lo, hi) in enumerate(host["spans"]):
        p = host["ids"][s]
        if p < 0 or hi == lo:
            continue
        for e in range(A.shape[1]):
            ge = host["gates"][s][e]
            if ge == 0:
                continue
            y[lo:hi] += ge * ((x[lo:hi] @ A[p, e].t()) @ B[p, e].t())
    return y


def peft_loop(case, host_unused):
    """PEFT's mixed-batch style: read ids on the host, gather each adapter's rows, run every
    expert of that adapter on them, scatter back."""
    x, W, bias, A, B = case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"]
    offsets = case["seq_offsets"].tolist()
    ids = case["adapter_ids"].tolist()
    gates = case["gates"]
    y = F.linear(x, W, bias)
    tok_seq = torch.repeat_interleave(
        torch.arange(len(ids), device=DEV), torch.tensor([offsets[s + 1] - offsets[s] for s in range(len(ids))], device=DEV)
    )
    tok_ad = torch.tensor(ids, device=DEV)[tok_seq]
    for p in sorted(set(i for i in ids if i >= 0)):
        rows = (tok_ad == p).nonzero().squeeze(1)
        sub = x[rows]
        g = gates[tok_seq[rows]].to(x.dtype)  # [rows, E]
        acc = torch.zeros(rows.numel(), W.shape[0], device=DEV, dtype=x.dtype)
        for e in range(A.shape[1]):
            acc += g[:, e : e + 1] * ((sub @ A[p, e].t()) @ B[p, e].t())
        y.index_add_(0, rows, acc)
    return y


def host_info(case):
    offsets = case["seq_offsets"].tolist()
    ids = case["adapter_ids"].tolist()
    gates = case["gates"].tolist()
    spans = [(offsets[s], offsets[s + 1]) for s in range(len(ids))]
    tok_seq = [s for s, (lo, hi) in enumerate(spans) for _ in range(hi - lo)]
    tok_ad = torch.tensor([max(ids[s], 0) for s in tok_seq], device=DEV)
    tok_g = torch.tensor([gates[s] if ids[s] >= 0 else [0.0] * len(gates[s]) for s in tok_seq], device=DEV)
    return dict(spans=spans, ids=ids, gates=gates, tok_adapter=tok_ad, tok_gates=tok_g, decode=len(tok_seq) <= 64)


def with_env(fn, **env):
    def run():
        with wl.env_vars(**env):
            return fn()

    return run


def graph_of(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


# ---- shapes ------------------------------------------------------------------------------


def shapes(quick: bool):
    """Decode: every token its own sequence, each with its own adapter (P = T, "distinct") and
    all sharing one adapter (P = 1, "shared": one slab of lora_b serves every token); prefill:
    4 sequences of 1024 tokens."""
    K = N = 4096
    out = []
    for mix in ("distinct", "shared"):
        for T in (1, 8, 32, 64):
            if mix == "shared" and T == 1:
                continue  # one token: the same problem as distinct
            for E, active in ((1, 1), (4, 2)):
                out.append(dict(phase="decode", mix=mix, T=T, S=T, P=T if mix == "distinct" else 1, K=K, N=N, E=E,
                                E_active=active, R=16))
    for E, active in ((1, 1), (4, 2)):
        out.append(dict(phase="prefill", mix="distinct", T=4096, S=4, P=4, K=K, N=N, E=E, E_active=active, R=16))
    if quick:
        out = [s for s in out if s["T"] in (1, 64, 4096) and s["E"] == 4]
    return out


def build_case(sh, dtype):
    S, E, A = sh["S"], sh["E"], sh["E_active"]
    lens = [sh["T"] // S] * S
    gates = torch.zeros(S, E)
    gates[:, :A] = torch.rand(S, A) + 0.5  # E_active non-zero gates per sequence
    ids = [s % sh["P"] for s in range(S)]
    return wl.make_case(K=sh["K"], N=sh["N"], E=E, R=sh["R"], seq_lens=lens, adapter_ids=ids, P=sh["P"], gates=gates,
                        dtype=dtype, device=DEV, seed=sh["T"] * 10 + E)


def floor_bytes(sh, dtype):
    es = torch.finfo(dtype).bits // 8
    K, N, R, T = sh["K"], sh["N"], sh["R"], sh["T"]
    active_slabs = min(sh["P"], sh["S"]) * sh["E_active"]  # distinct slabs read (shared: one adapter)
    return es * (N * K + N + active_slabs * (R * K + N * R) + T * K + T * N)


def check_case(case) -> dict:
    """The accuracy rule (milora_ext.accuracy); the float64 reference is computed once."""
    y = milora_ext.gated_lora_linear(*wl.case_args(case), check_indices=True)
    y64 = reference64(case)
    try:
        check_against_reference(y, case, "gpu_check", y64=y64)
        ok, msg = True, ""
    except AssertionError as e:  # recorded, the run goes on
        ok, msg = False, str(e)
    return dict(ok=ok, max_abs_err=max_err(y, y64), message=msg)


# ---- main --------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-flush", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    prop = torch.cuda.get_device_properties(0)
    traffic = d2d_traffic_bytes_per_s()
    meta = dict(
        gpu=prop.name,
        sms=prop.multi_processor_count,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        d2d_traffic_GBps=traffic / 1e9,
        flush_l2=not args.no_flush,
        iters=args.iters,
        cuda_kernels=milora_ext.has_cuda_kernels(),
    )
    print(json.dumps(meta, indent=1), flush=True)
    timer = Timer(args.iters, flush=not args.no_flush)
    records, checks = [], []
    for sh in shapes(args.quick):
        for dtype in (torch.bfloat16, torch.float16):
            write_results(args.out, meta, records, checks, traffic)  # what is measured so far survives a timeout
            name = f"{sh['phase']} {sh['mix']} T={sh['T']} E={sh['E']}/{sh['E_active']} {str(dtype)[6:]}"
            try:
                case = build_case(sh, dtype)
                chk = check_case(case)
                checks.append(dict(shape=sh, dtype=str(dtype), **chk))
                host = host_info(case)
                op = lambda c=case: milora_ext.gated_lora_linear(*wl.case_args(c), check_indices=False)  # noqa: E731
                methods = {
                    "base": lambda c=case: F.linear(c["x"], c["weight"], c["bias"]),
                    "milora": op,
                    "milora_graph": graph_of(op),
                    "lora_torch": lambda c=case, h=host: lora_torch(c, h),
                    "peft_loop": lambda c=case: peft_loop(c, None),
                }
                if sh["phase"] == "decode":
                    methods["milora_nopdl"] = with_env(op, MILORA_PDL="0")
                    if sh["T"] > 16:
                        methods["milora_rows16"] = with_env(op, MILORA_DECODE_ROW_TILES="1")
                else:
                    methods["milora_rmw"] = with_env(op, MILORA_PREFILL_EPILOGUE="rmw")
                floor_ms = floor_bytes(sh, dtype) / traffic * 1e3
                base_ms = None
                for m, fn in methods.items():
                    try:
                        ms = timer(fn)
                    except Exception as e:  # one method failing does not stop the others
                        print(f"  {name} {m}: FAILED {e!r}", flush=True)
                        records.append(dict(shape=sh, dtype=str(dtype), method=m, error=repr(e)))
                        continue
                    if m == "base":
                        base_ms = ms
                    records.append(dict(shape=sh, dtype=str(dtype), method=m, median_ms=ms,
                                        ratio_to_base=ms / base_ms if base_ms else None,
                                        floor_ms=floor_ms, floor_ratio=ms / floor_ms))
                    print(f"  {name:34s} {m:13s} {ms * 1e3:9.1f} us  x{ms / base_ms:5.2f} base"
                          f"  x{ms / floor_ms:5.2f} floor", flush=True)
                print(f"  {name:34s} check {'ok' if chk['ok'] else 'FAILED'} (max err {chk['max_abs_err']:.3g})", flush=True)
                del case, methods
                torch.cuda.empty_cache()
            except Exception:
                print(f"  {name}: FAILED\n{traceback.format_exc()}", flush=True)
                records.append(dict(shape=sh, dtype=str(dtype), method="*", error=traceback.format_exc()))
    table = write_results(args.out, meta, records, checks, traffic, complete=True)
    print(table)
    bad = [c for c in checks if not c["ok"]]
    return 1 if bad or any("error" in r for r in records) else 0


def write_results(out: str, meta: dict, records: list, checks: list, traffic: float, complete: bool = False) -> str:
    """(Re)writes OUT/bench.json and OUT/bench_table.md with everything measured so far
    (atomically: a temporary file renamed), so a timeout loses at most the current case."""
    result = dict(meta=meta, complete=complete, records=records, checks=checks)
    lines = ["| phase | mix | T | E/active | dtype | method | median us | x base | x floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "median_ms" not in r:
            continue
        s = r["shape"]
        ratio = f"{r['ratio_to_base']:.2f}" if r["ratio_to_base"] is not None else "-"
        lines.append(
            f"| {s['phase']} | {s['mix']} | {s['T']} | {s['E']}/{s['E_active']} | {r['dtype'][6:]} | {r['method']} | "
            f"{r['median_ms'] * 1e3:.1f} | {ratio} | {r['floor_ratio']:.2f} |"
        )
    bad = [c for c in checks if not c["ok"]]
    lines.append("")
    lines.append(f"D2D traffic {traffic / 1e9:.0f} GB/s (read + write); correctness checks: "
                 f"{len(checks) - len(bad)}/{len(checks)} ok{'' if complete else ' (incomplete run)'}")
    table = "\n".join(lines)
    for name, text in (("bench.json", json.dumps(result, indent=1)), ("bench_table.md", table + "\n")):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))
    return table


if __name__ == "__main__":
    sys.exit(main())
