"""Tensors for the quality suite: training batches (right padded, prompt mask, labels on the
response only) and generation batches (left padded prompts)."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor

from .quality_tasks import PAD, Example


def train_batch(examples: Sequence[Example], device="cpu") -> Dict[str, Tensor]:
    """input_ids / attention_mask / labels (-100 outside the response) / prompt_mask [B, L]."""
    L = max(len(e.prompt) + len(e.response) for e in examples)
    B = len(examples)
    ids = torch.full((B, L), PAD, dtype=torch.long)
    am = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    pm = torch.zeros(B, L, dtype=torch.long)
    for i, e in enumerate(examples):
        p, r = len(e.prompt), len(e.response)
        ids[i, : p + r] = torch.tensor(e.prompt + e.response)
        am[i, : p + r] = 1
        labels[i, p: p + r] = torch.tensor(e.response)
        pm[i, :p] = 1
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=am, labels=labels, prompt_mask=pm).items()}


def prompt_batch(examples: Sequence[Example], device="cpu") -> Dict[str, Tensor]:
    """Left-padded prompts for generate: input_ids / attention_mask [B, L]."""
    L = max(len(e.prompt) for e in examples)
    B = len(examples)
    ids = torch.full((B, L), PAD, dtype=torch.long)
    am = torch.zeros(B, L, dtype=torch.long)
    for i, e in enumerate(examples):
        p = len(e.prompt)
        ids[i, L - p:] = torch.tensor(e.prompt)
        am[i, L - p:] = 1
    return {"input_ids": ids.to(device), "attention_mask": am.to(device)}


def responses_from(generated: Tensor, prompt_len: int, eos: int) -> List[tuple]:
    """The generated tokens after the prompt, up to and including the first EOS."""
    out = []
    for row in generated[:, prompt_len:].tolist():
        r = []
        for t in row:
            r.append(t)
            if t == eos:
                break
        out.append(tuple(r))
    return out
