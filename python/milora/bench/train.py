"""`milora-bench train`: what training costs (full steps: forward, backward, AdamW step).

Two measurements, each timed interleaved round by round (ratios are medians of per-round ratios,
robust to other tenants of the machine):

  * adapter dtype: a 16-bit base trained with float32 master adapters (the default,
    autocast_adapter_dtype=True: every training forward casts the trained adapter's float32
    Parameters into the 16-bit serving stack, per linear) against adapters kept in the model's
    dtype (autocast_adapter_dtype=False). Ratio > 1 = the cost of float32 masters.
  * several adapters at once: N adapters, B rows each. "one after another" trains each adapter
    on its own B rows (N steps); "at once" trains all of them in one step on the mixed N*B-row
    batch (set_trainable_adapters). Same data, same number of tokens; tokens/s of each.

    python -m milora.bench train --model micro --adapters 4 --rows 2 --seq-len 64
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .models import build_model, preset_dict
from .timing import environment, format_env, paired_ratio, time_interleaved

DEFAULTS = dict(model="micro", dtype=torch.bfloat16, adapters=4, rows=2, seq_len=64, rank=8, repeats=5, warmup=1, seed=0)


def _milora(name: str, dtype: torch.dtype, n_adapters: int, rank: int, seed: int, keep_dtype: bool):
    from milora import MiLoRAConfig, get_milora_model
    base = build_model(name, dtype, "cpu", seed=seed)
    cfg = MiLoRAConfig(r=rank, alpha=2 * rank, top_k=3)
    model = get_milora_model(base, cfg, adapter_name="a0", autocast_adapter_dtype=not keep_dtype)
    for k in range(1, n_adapters):
        model.add_adapter(f"a{k}", cfg, seed=seed + k)
    model.set_adapter("a0")
    model.train()
    return model


def _batch(vocab: int, rows: int, seq_len: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, seq_len), generator=g)
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100  # the first quarter is the prompt
    return ids, labels


def _step_fn(model, opt, ids, labels, adapter_names=None):
    def step():
        out = model(input_ids=ids, labels=labels, adapter_names=adapter_names)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return step


def measure_adapter_dtype(model_name: str, dtype: torch.dtype, rows: int, seq_len: int, rank: int,
                          repeats: int, warmup: int, seed: int) -> Dict[str, object]:
    fns = {}
    for label, keep in (("float32 masters", False), ("model dtype", True)):
        model = _milora(model_name, dtype, 1, rank, seed, keep)
        ids, labels = _batch(model.base_model.config.vocab_size, rows, seq_len, seed)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        fns[label] = _step_fn(model, opt, ids, labels)
    t = time_interleaved(fns, torch.device("cpu"), warmup=warmup, repeats=repeats)
    tokens = rows * seq_len
    return {
        "bench": "train-adapter-dtype", "dtype": str(dtype).replace("torch.", ""), "rows": rows, "seq_len": seq_len,
        "rank": rank, **{f"ms[{k}]": v.median_ms for k, v in t.items()},
        **{f"tokens_per_s[{k}]": tokens / (v.median_ms / 1e3) for k, v in t.items()},
        "cost_ratio": paired_ratio(t["float32 masters"], t["model dtype"]),
    }


def measure_several(model_name: str, dtype: torch.dtype, n_adapters: int, rows: int, seq_len: int, rank: int,
                    repeats: int, warmup: int, seed: int) -> Dict[str, object]:
    names = [f"a{k}" for k in range(n_adapters)]
    # one after another: each adapter its own rows, its own step (and its own optimizer)
    seq_model = _milora(model_name, dtype, n_adapters, rank, seed, False)
    vocab = seq_model.base_model.config.vocab_size
    data = [_batch(vocab, rows, seq_len, seed + 100 + k) for k in range(n_adapters)]
    opts = {}
    for n in names:  # each adapter's own Parameters, created while it is the trained one
        seq_model.set_adapter(n)
        opts[n] = torch.optim.AdamW([p for p in seq_model.parameters() if p.requires_grad], lr=1e-4)
    seq_model.set_trainable_adapters(names)  # keeps every adapter's Parameters alive

    def one_after_another():
        for n, (ids, labels) in zip(names, data):
            out = seq_model(input_ids=ids, labels=labels, adapter_names=[n] * rows)
            opts[n].zero_grad(set_to_none=True)
            out.loss.backward()
            opts[n].step()

    # at once: one step on the mixed batch
    all_model = _milora(model_name, dtype, n_adapters, rank, seed, False)
    all_model.set_trainable_adapters(names)
    ids = torch.cat([d[0] for d in data])
    labels = torch.cat([d[1] for d in data])
    row_names = [n for n in names for _ in range(rows)]
    opt = torch.optim.AdamW([p for p in all_model.parameters() if p.requires_grad], lr=1e-4)
    at_once = _step_fn(all_model, opt, ids, labels, row_names)
    t = time_interleaved({"one after another": one_after_another, "at once": at_once}, torch.device("cpu"),
                         warmup=warmup, repeats=repeats)
    tokens = n_adapters * rows * seq_len
    return {
        "bench": "train-several-adapters", "dtype": str(dtype).replace("torch.", ""), "adapters": n_adapters,
        "rows_per_adapter": rows, "seq_len": seq_len, "rank": rank,
        **{f"tokens_per_s[{k}]": tokens / (v.median_ms / 1e3) for k, v in t.items()},
        "speedup": paired_ratio(t["one after another"], t["at once"]),
    }


def run(model: str = DEFAULTS["model"], dtype: torch.dtype = DEFAULTS["dtype"], adapters: int = DEFAULTS["adapters"],
        rows: int = DEFAULTS["rows"], seq_len: int = DEFAULTS["seq_len"], rank: int = DEFAULTS["rank"],
        repeats: int = DEFAULTS["repeats"], warmup: int = DEFAULTS["warmup"], seed: int = DEFAULTS["seed"],
        threads: Optional[int] = None) -> List[Dict[str, object]]:
    if threads:
        torch.set_num_threads(threads)
    env = environment(torch.device("cpu"), dtype)
    print(format_env(env))
    print(f"model: {model} ({preset_dict(model)['family']}), rank {rank}, {rows} rows x {seq_len} tokens per adapter")
    a = measure_adapter_dtype(model, dtype, rows, seq_len, rank, repeats, warmup, seed)
    print(f"| adapter dtype on a {a['dtype']} base | step ms | tokens/s |\n|---|---:|---:|")
    for k in ("float32 masters", "model dtype"):
        print(f"| {k} | {a[f'ms[{k}]']:.1f} | {a[f'tokens_per_s[{k}]']:.0f} |")
    print(f"float32 master adapters cost x{a['cost_ratio']:.3f} per training step (median of paired rounds)\n")
    s = measure_several(model, dtype, adapters, rows, seq_len, rank, repeats, warmup, seed)
    print(f"| {adapters} adapters, same data | tokens/s |\n|---|---:|")
    for k in ("one after another", "at once"):
        print(f"| {k} | {s[f'tokens_per_s[{k}]']:.0f} |")
    print(f"several at once: x{s['speedup']:.2f} the throughput of one after another (median of paired rounds)")
    return [{**env, **preset_dict(model), **a}, {**env, **preset_dict(model), **s}]
