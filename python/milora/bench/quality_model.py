"""The tiny base model of `milora-bench quality`: a LLaMA-architecture decoder pre-trained
in-process on the suite's pre-training skills (copy, reverse, shift, sort), cached as
safetensors + JSON on first use so that later runs start from the same weights.

Cache file: <cache dir>/quality_base_<preset>_<hash>.safetensors, where the hash covers the
model config, the vocabulary and the pre-training recipe (any change re-trains). Default cache
dir: $MILORA_CACHE or ~/.cache/milora.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from .quality_data import train_batch
from .quality_tasks import BOS, EOS, PAD, PRETRAIN_TASKS, VOCAB_SIZE, TrainStream, hash_str


@dataclass(frozen=True)
class BasePreset:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    pretrain_steps: int
    pretrain_lr: float = 3e-3
    batch: int = 64


PRESETS = {
    "tiny": BasePreset(hidden=64, layers=2, heads=4, intermediate=128, pretrain_steps=1500),
    "small": BasePreset(hidden=128, layers=4, heads=4, intermediate=256, pretrain_steps=3000),
    # for tests: trains in seconds, learns little
    "micro": BasePreset(hidden=32, layers=2, heads=2, intermediate=64, pretrain_steps=40, batch=16),
}
PRETRAIN_SEED = 0


def default_cache_dir() -> str:
    return os.environ.get("MILORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "milora")


def llama_config(p: BasePreset):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=p.hidden, intermediate_size=p.intermediate,
                       num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.heads,
                       max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                       tie_word_embeddings=False)


def _fingerprint(name: str, p: BasePreset) -> str:
    doc = json.dumps({"preset": asdict(p), "vocab": VOCAB_SIZE, "tasks": PRETRAIN_TASKS, "seed": PRETRAIN_SEED,
                      "recipe": 1}, sort_keys=True)
    return f"{hash_str(doc):016x}"[:12]


def cache_path(name: str, cache_dir: Optional[str] = None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), f"quality_base_{name}_{_fingerprint(name, PRESETS[name])}.safetensors")


def pretrain(p: BasePreset, progress: Optional[Callable[[int], None]] = None):
    """Train a fresh LlamaForCausalLM on the pre-training skills (full fine-tuning, AdamW)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(PRETRAIN_SEED)
    model = LlamaForCausalLM(llama_config(p))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / p.pretrain_steps))
    stream = TrainStream(PRETRAIN_TASKS, PRETRAIN_SEED)
    for step in range(p.pretrain_steps):
        b = train_batch(stream.batch(p.batch))
        b.pop("prompt_mask")
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step)
    model.eval()
    return model


def load_base(name: str = "tiny", cache_dir: Optional[str] = None, log: Callable[[str], None] = print,
              progress: Optional[Callable[[int], None]] = None):
    """The pre-trained base model of preset `name`, from the cache or trained now and cached."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM
    if name not in PRESETS:
        raise ValueError(f"unknown quality model {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    path = cache_path(name, cache_dir)
    if os.path.exists(path):
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(p))
        state = load_file(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if "rotary" not in m]:
            raise ValueError(f"{path}: does not match the {name!r} model (missing {missing}, unexpected {unexpected}); delete it")
        model.eval()
        return model, path, 0.0
    log(f"pre-training the {name!r} base model ({p.pretrain_steps} steps); cached to {path}")
    t0 = time.perf_counter()
    model = pretrain(p, progress)
    took = time.perf_counter() - t0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp,
              metadata={"preset": json.dumps(asdict(p)), "vocab_size": str(VOCAB_SIZE)})
    os.replace(tmp, path)
    return model, path, took
