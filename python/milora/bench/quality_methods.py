"""The four adapter methods of `milora-bench quality`, built at equal trainable-parameter budgets,
and their trainers (a plain AdamW loop on the public API, one per method).

    lora     PEFT LoRA on all 7 modules (the anchor), trained with peft.
    static   the same LoRA trained through milora's router-less ("static") path: a freshly
             initialised PEFT adapter imported with `MiLoRAModel.from_peft` and trained there.
    moelora  per-token MoE-LoRA (`routing="token"`): E experts per module, top-k per token.
    milora   MiLoRA (`routing="prompt"`): one router per layer, top-k modules per prompt.

Budgets: the anchor has rank R (default 8). Each other method takes the rank (per expert for
moelora) whose exact trainable-parameter count is closest to the anchor's; the counts are
printed and recorded. Routers are counted.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn as nn

from milora import MODULE_NAMES, MiLoRAConfig, MiLoRAModel, get_milora_model
from milora.training import ROUTER_FREEZE_AT

from .quality_data import train_batch

METHODS = ("lora", "static", "moelora", "milora")


@dataclass
class Recipe:
    """Training recipe shared by every method (lr, schedule, batch)."""

    lr: float = 1e-2
    batch: int = 32
    warmup: float = 0.06       # fraction of the steps
    clip: float = 1.0
    # learning-rate multipliers for the milora method only (1.0 = the shared recipe): its LoRA
    # weights (each module sees only the prompts routed to it, with a gate of about 1/top_k) and
    # its layer routers; docs/training.md has what they did on the suite
    milora_lr_scale: float = 1.0
    router_lr_scale: float = 1.0
    # fraction of the steps after which milora's routers stop training (learning rate 0), so
    # the LoRA modules finish on a fixed routing; 1.0 = never (default: milora.training.ROUTER_FREEZE_AT)
    router_freeze_at: float = ROUTER_FREEZE_AT
    # MiLoRA / MOELoRA router settings (MiLoRAConfig fields) applied to the routed methods
    milora: Dict = field(default_factory=dict)
    moelora: Dict = field(default_factory=dict)


def lr_factor(step: int, total: int, warmup: float) -> float:
    w = max(1, int(round(warmup * total)))
    if step < w:
        return (step + 1) / w
    return max(0.0, (total - step) / max(1, total - w))


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peft_config(rank: int):
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(MODULE_NAMES),
                      bias="none", task_type="CAUSAL_LM")


def _milora_config(method: str, rank: int, opts: Dict) -> MiLoRAConfig:
    if method == "milora":
        kw = dict(r=rank, alpha=2 * rank, routing="prompt", top_k=3)
    elif method == "moelora":
        kw = dict(r=rank, alpha=2 * rank, routing="token", experts_per_module=4, top_k=2)
    else:
        raise ValueError(method)
    kw.update(opts)
    return MiLoRAConfig(**kw)


def _milora_count(base: nn.Module, cfg: MiLoRAConfig) -> int:
    m = get_milora_model(copy.deepcopy(base), cfg, adapter_name="probe")
    return m.num_adapter_parameters("probe")


def choose_ranks(base: nn.Module, anchor_rank: int, recipe: Recipe) -> Dict[str, Dict]:
    """{method: {"rank": r, "config": MiLoRAConfig or None, "params": exact count}} with each
    rank chosen to bring the trainable count closest to the PEFT LoRA anchor's."""
    from peft import get_peft_model
    anchor = count_trainable(get_peft_model(copy.deepcopy(base), _peft_config(anchor_rank)))
    out = {"lora": {"rank": anchor_rank, "config": None, "params": anchor},
           "static": {"rank": anchor_rank, "config": None, "params": anchor}}
    for method in ("moelora", "milora"):
        opts = recipe.moelora if method == "moelora" else recipe.milora
        c1 = _milora_count(base, _milora_config(method, 1, opts))
        c2 = _milora_count(base, _milora_config(method, 2, opts))
        per_rank, fixed = c2 - c1, 2 * c1 - c2  # the count is affine in the rank
        r = max(1, int(round((anchor - fixed) / per_rank)))
        cands = [x for x in (r - 1, r, r + 1) if x >= 1]
        r = min(cands, key=lambda x: (abs(fixed + per_rank * x - anchor), x))
        cfg = _milora_config(method, r, opts)
        out[method] = {"rank": r, "config": cfg, "params": _milora_count(base, cfg)}
    return out


class MethodTrainer:
    """One method's model, optimizer and step counter; `train_to(step)` continues training."""

    def __init__(self, method: str, base: nn.Module, plan: Dict, recipe: Recipe, seed: int, total_steps: int,
                 workdir: str) -> None:
        self.method, self.recipe, self.total = method, recipe, total_steps
        self.step = 0
        self.tokens = 0
        torch.manual_seed(seed)
        model = copy.deepcopy(base)
        if method == "lora":
            from peft import get_peft_model
            self.model = get_peft_model(model, _peft_config(plan["rank"]))
        elif method == "static":
            from peft import get_peft_model
            init_dir = os.path.join(workdir, f"static_init_{seed}")
            get_peft_model(copy.deepcopy(base), _peft_config(plan["rank"])).save_pretrained(init_dir)
            self.model = MiLoRAModel.from_peft(model, init_dir, adapter_name="static")
            self.model.set_trainable(True)
        else:
            self.model = get_milora_model(model, plan["config"], adapter_name=method)
        self.model.train()
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.trainable_params = sum(p.numel() for p in self.params)
        groups = [dict(params=self.params, lr_scale=1.0)]
        if method == "milora":
            router = [p for n, p in named if n.startswith("routers.")]
            lora = [p for n, p in named if not n.startswith("routers.")]
            groups = [dict(params=lora, lr_scale=recipe.milora_lr_scale),
                      dict(params=router, lr_scale=recipe.router_lr_scale, router=True)]
        self.opt = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=0.0)

    def train_to(self, step: int, stream_batches: List) -> float:
        """Train on stream_batches[self.step:step]; returns the mean training loss."""
        losses = []
        self.model.train()
        while self.step < step:
            ex = stream_batches[self.step]
            b = train_batch(ex)
            if self.method == "lora":
                b.pop("prompt_mask")
            frozen = self.step >= self.recipe.router_freeze_at * self.total
            for g in self.opt.param_groups:
                scale = 0.0 if (frozen and g.get("router")) else g["lr_scale"]
                g["lr"] = self.recipe.lr * scale * lr_factor(self.step, self.total, self.recipe.warmup)
            loss = self.model(**b).loss
            loss.backward()
            if self.recipe.clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.recipe.clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.tokens += int(b["attention_mask"].sum())
            self.step += 1
            losses.append(loss.item())
        return sum(losses) / max(len(losses), 1)

    def export(self, directory: str) -> None:
        """Save the adapter (PEFT format for lora, milora format otherwise)."""
        if self.method == "lora":
            self.model.save_pretrained(directory)
        else:
            self.model.save_pretrained(directory, adapter_name=self.method)


def serving_model(base: nn.Module, exported: Dict[str, str]) -> MiLoRAModel:
    """One MiLoRAModel holding every method's adapter (the PEFT anchor imported as static)."""
    m = MiLoRAModel(copy.deepcopy(base), MiLoRAConfig(), adapter_name=None)
    for method, d in exported.items():
        if method == "lora":
            m.load_peft_adapter(d, method)
        else:
            m.load_adapter(d, method)
    m.set_trainable(False)
    m.eval()
    return m
