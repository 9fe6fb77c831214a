"""Supervised fine-tuning data for `milora-train`: JSONL files -> tokenized (prompt, response)
pairs, and the collator that builds labels and the router's prompt mask.

A JSONL line is either
    {"prompt": "...", "response": "..."}
or a chat:
    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}
A chat's last message must be the assistant's: everything before it, rendered by the
tokenizer's chat template with the generation prompt, is the prompt; that last message is the
response. The response ends with the tokenizer's EOS token; the loss covers the response only,
and MiLoRA's routers pool over the prompt only (as they do at inference).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor


@dataclass
class Pair:
    prompt_ids: List[int]
    response_ids: List[int]   # ends with EOS
    response_text: str


def read_jsonl(path: str) -> List[dict]:
    rows = []
    with open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def _split(row: dict, tokenizer, where: str):
    """(prompt text or ids, response text) of one row."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs):
            raise ValueError(f"{where}: 'messages' must be a list of at least two {{role, content}} objects")
        if msgs[-1].get("role") != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's (the response to learn)")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{where}: chat messages need a tokenizer with a chat template")
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        return prompt, str(msgs[-1]["content"]), True
    if "prompt" in row and "response" in row:
        return str(row["prompt"]), str(row["response"]), False
    raise ValueError(f"{where}: expected fields 'prompt' and 'response', or 'messages'; got {sorted(row)}")


def tokenize_rows(rows: Sequence[dict], tokenizer, max_length: int, source: str = "data") -> List[Pair]:
    """Tokenize rows into Pairs; responses are truncated so that prompt + response <= max_length
    (a prompt longer than max_length - 1 raises: its routing input would be cut)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("milora-train: the tokenizer has no EOS token")
    out = []
    for n, row in enumerate(rows, 1):
        prompt, response, chat = _split(row, tokenizer, f"{source}:{n}")
        p_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(p_ids) >= max_length:
            raise ValueError(f"{source}:{n}: prompt has {len(p_ids)} tokens, more than --max-length {max_length} - 1")
        out.append(Pair(list(p_ids), list(r_ids[: max_length - len(p_ids)]), response))
    return out


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, pairs: Sequence[Pair]) -> None:
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Dict:
        p = self.pairs[i]
        return {"prompt_ids": p.prompt_ids, "response_ids": p.response_ids}


@dataclass
class PromptMaskCollator:
    """Right-pads a batch of {"prompt_ids", "response_ids"} into input_ids, attention_mask,
    labels (-100 outside the response) and prompt_mask (1 on prompt tokens)."""

    pad_token_id: int
    with_prompt_mask: bool = True

    def __call__(self, features: Sequence[Dict]) -> Dict[str, Tensor]:
        L = max(len(f["prompt_ids"]) + len(f["response_ids"]) for f in features)
        B = len(features)
        ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        am = torch.zeros(B, L, dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        pm = torch.zeros(B, L, dtype=torch.long)
        for i, f in enumerate(features):
            p, r = len(f["prompt_ids"]), len(f["response_ids"])
            ids[i, : p + r] = torch.tensor(list(f["prompt_ids"]) + list(f["response_ids"]))
            am[i, : p + r] = 1
            labels[i, p: p + r] = torch.tensor(f["response_ids"])
            pm[i, :p] = 1
        out = {"input_ids": ids, "attention_mask": am, "labels": labels}
        if self.with_prompt_mask:
            out["prompt_mask"] = pm
        return out


@torch.no_grad()
def exact_match(model, tokenizer, pairs: Sequence[Pair], batch_size: int = 16, max_new_tokens: Optional[int] = None) -> float:
    """Share of pairs whose greedy response (decoded, stripped) equals the reference."""
    model.eval()
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hits = 0
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s: s + batch_size]
        L = max(len(p.prompt_ids) for p in chunk)
        ids = torch.full((len(chunk), L), pad, dtype=torch.long)
        am = torch.zeros(len(chunk), L, dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, L - len(p.prompt_ids):] = torch.tensor(p.prompt_ids)
            am[i, L - len(p.prompt_ids):] = 1
        n_new = max_new_tokens or max(len(p.response_ids) for p in chunk)
        out = model.generate(input_ids=ids.to(dev), attention_mask=am.to(dev), max_new_tokens=n_new, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for p, row in zip(chunk, out[:, L:].tolist()):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(row, skip_special_tokens=True)
            hits += int(text.strip() == p.response_text.strip())
    return hits / max(len(pairs), 1)
