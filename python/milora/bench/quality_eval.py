"""Evaluation for `milora-bench quality`: exact match of greedy generate (every method's adapter
served in one mixed batch), held-out loss (one mixed forward), and MiLoRA routing statistics."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from milora import MODULE_NAMES

from .quality_data import prompt_batch, responses_from, train_batch
from .quality_tasks import EOS, MAX_RESPONSE, PAD, Example


def _mixed_rows(examples: Sequence[Example], methods: Sequence[str]):
    """Every (example, method) pair, methods interleaved so that each batch mixes them all."""
    return [(e, m) for e in examples for m in methods]


@torch.no_grad()
def exact_match(model, examples: Sequence[Example], methods: Sequence[str], batch: int = 256) -> Dict[str, Dict[str, float]]:
    """{method: {task: exact-match accuracy}} of greedy generate; adapter_names mixes methods per row."""
    rows = _mixed_rows(examples, methods)
    hits: Dict[str, Dict[str, List[int]]] = defaultdict(lambda: defaultdict(list))
    for s in range(0, len(rows), batch):
        chunk = rows[s: s + batch]
        b = prompt_batch([e for e, _ in chunk])
        out = model.generate(**b, adapter_names=[m for _, m in chunk], max_new_tokens=MAX_RESPONSE, do_sample=False,
                             pad_token_id=PAD, eos_token_id=EOS)
        for (e, m), r in zip(chunk, responses_from(out, b["input_ids"].shape[1], EOS)):
            hits[m][e.task].append(int(r == e.response))
    return {m: {t: sum(v) / len(v) for t, v in per.items()} for m, per in hits.items()}


@torch.no_grad()
def generate_single(model, examples: Sequence[Example], batch: int = 256, **kw) -> List[tuple]:
    """Greedy responses of a plain HF / PEFT model (for the anchor's agreement check)."""
    out = []
    for s in range(0, len(examples), batch):
        b = prompt_batch(examples[s: s + batch])
        g = model.generate(**b, max_new_tokens=MAX_RESPONSE, do_sample=False, pad_token_id=PAD, eos_token_id=EOS, **kw)
        out.extend(responses_from(g, b["input_ids"].shape[1], EOS))
    return out


@torch.no_grad()
def held_out_loss(model, examples: Sequence[Example], methods: Sequence[str], batch: int = 256) -> Dict[str, Dict[str, float]]:
    """{method: {task: mean cross-entropy per response token}} (LM loss only, no load balance)."""
    rows = _mixed_rows(examples, methods)
    tot: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for s in range(0, len(rows), batch):
        chunk = rows[s: s + batch]
        b = train_batch([e for e, _ in chunk])
        labels = b.pop("labels")
        logits = model(**b, adapter_names=[m for _, m in chunk]).logits.float()
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
        n = (labels[:, 1:] != -100).sum(1)
        for (e, m), c, k in zip(chunk, ce.sum(1).tolist(), n.tolist()):
            acc = tot[m][e.task]
            acc[0] += c
            acc[1] += k
    return {m: {t: v[0] / v[1] for t, v in per.items()} for m, per in tot.items()}


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log2()).sum(-1)


@torch.no_grad()
def routing_stats(model, examples: Sequence[Example], adapter: str, batch: int = 256) -> Dict[str, Dict[str, Dict]]:
    """Per layer and task, for the prompt-routed adapter `adapter` (prompts only, as at prefill):
        share: fraction of prompts that select each module (sums to top_k);
        entropy_bits: mean entropy of the router's module distribution (log2 7 = 2.81 uniform);
        load_balance: Switch statistic N * sum_i f_i P_i over these prompts (1.0 = balanced);
        distinct_sets: number of distinct selected module sets.
    Task "all" pools every prompt. Read from forward hooks on the layer routers."""
    captured: Dict[int, List] = defaultdict(list)
    hooks = []
    for i, r in enumerate(model.routers):
        def hook(mod, args, out, i=i):
            captured[i].append((out.probs.detach(), out.selected.detach()))
        hooks.append(r.register_forward_hook(hook))
    tasks = []
    try:
        for s in range(0, len(examples), batch):
            chunk = list(examples[s: s + batch])
            b = prompt_batch(chunk)
            model(**b, prompt_mask=b["attention_mask"], adapter_names=[adapter] * len(chunk))
            tasks.extend(e.task for e in chunk)
    finally:
        for h in hooks:
            h.remove()
    out: Dict[str, Dict[str, Dict]] = {}
    names = list(MODULE_NAMES)
    for i, parts in sorted(captured.items()):
        probs = torch.cat([p for p, _ in parts])
        sel = torch.cat([s for _, s in parts])
        per_layer = {}
        groups = {t: [j for j, x in enumerate(tasks) if x == t] for t in dict.fromkeys(tasks)}
        groups["all"] = list(range(len(tasks)))
        for t, idx in groups.items():
            ix = torch.tensor(idx)
            p, s = probs[ix], sel[ix].float()
            top1 = F.one_hot(p.argmax(-1), p.shape[-1]).float().mean(0)
            per_layer[t] = {
                "share": {n: round(float(v), 4) for n, v in zip(names, s.mean(0))},
                "entropy_bits": round(float(_entropy(p).mean()), 4),
                "load_balance": round(float(p.shape[-1] * (top1 * p.mean(0)).sum()), 4),
                "distinct_sets": len({tuple(r) for r in s.to(torch.int8).tolist()}),
            }
        out[f"layer{i}"] = per_layer
    return out


def fmt_pct(x: float) -> str:
    return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}"
