"""Training with HF Trainer: the data collator, the output class, the per-adapter loss, and the
Trainer subclass that writes adapter-only checkpoints.

Why a Trainer subclass (`MiLoRATrainer`): transformers' Trainer special-cases PEFT by class
(`isinstance(model, PeftModel)` in `_save`, `_load_from_checkpoint` and `_load_best_model`); any
other nn.Module gets its whole state dict written (the frozen base model included) and read back
with `load_state_dict`. There is no hook a non-PEFT model can implement to change that, so
`MiLoRATrainer` overrides exactly those three methods and nothing else: checkpoints hold the
trained adapters' files (milora_config.json + adapter_model.safetensors: LoRA + router weights
and config), load with `MiLoRAModel.from_pretrained(base, checkpoint_dir)`, and
`resume_from_checkpoint` copies them back into the same Parameters (the optimizer state Trainer
restores stays attached), so training continues bit-identically. A plain `transformers.Trainer`
also trains a MiLoRAModel with default arguments; only its checkpoints are full state dicts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # the output class is a transformers ModelOutput: DDP / Trainer rebuild it field by field
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError:  # pragma: no cover - transformers is a dependency of the model layer
    CausalLMOutputWithPast = object  # type: ignore

from .checkpoint import CONFIG_NAME


@dataclass
class MiLoRACausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus `aux_loss`: the mean load-balancing loss of the routers of
    this forward (0 if none). `loss` already includes load_balance_coef * aux_loss."""

    aux_loss: Optional[Tensor] = None


def prompt_mask_from_labels(labels: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """The prompt the routers pool over when no prompt_mask is given: the tokens whose label is
    -100 (ignored by the LM loss), without padding. A row with no such token (every token is a
    target) pools over all its tokens (attention_mask)."""
    valid = attention_mask.to(torch.bool) if attention_mask is not None else torch.ones_like(labels, dtype=torch.bool)
    prompt = (labels == -100) & valid
    empty = ~prompt.any(dim=1, keepdim=True)
    return torch.where(empty, valid, prompt).to(torch.long)


class AdapterItemCounts:
    """`num_items_in_batch` as MiLoRATrainer passes it when several adapters are trained at once:
    `total` is transformers' own count (target tokens of the whole accumulated batch, summed
    over processes when Trainer averages tokens across devices: what a single model divides
    its summed token loss by) and `per_adapter` the same count restricted to each adapter's rows
    (name -> 0-dim tensor). MiLoRAModel.forward normalises each adapter's token losses by its
    own count; other code sees only `total` (the model hands `total` to the HF model)."""

    __slots__ = ("total", "per_adapter")

    def __init__(self, total, per_adapter: Dict[str, Tensor]) -> None:
        self.total = total
        self.per_adapter = dict(per_adapter)

    def count(self, name: str, device) -> Tensor:
        c = self.per_adapter.get(name)
        return torch.zeros((), dtype=torch.float32, device=device) if c is None else \
            torch.as_tensor(c, dtype=torch.float32).to(device)

    def __repr__(self) -> str:
        return f"AdapterItemCounts(total={self.total!r}, per_adapter={self.per_adapter!r})"


def target_counts(labels: Tensor, row_groups: Sequence[Tensor]) -> Tensor:
    """[G] float32: next-token targets (labels[:, 1:] != -100) of each group's rows."""
    per_row = (labels[:, 1:] != -100).sum(-1).to(torch.float32)
    if not row_groups:
        return per_row.new_zeros(0)
    return torch.stack([per_row.index_select(0, rows).sum() for rows in row_groups])


def per_adapter_lm_loss(logits: Tensor, labels: Tensor, row_groups: Sequence[Tensor],
                        denominators: Optional[Tensor] = None) -> Tensor:
    """Sum over adapters of each adapter's summed next-token loss over its rows' target tokens,
    divided by denominators[a] (default: its number of target tokens here, i.e. its mean token
    loss). row_groups: one long tensor of row indices per adapter. With the default the
    gradient of adapter a equals the gradient of training a alone on its rows (mean over its
    own target tokens), whatever the other rows hold; with denominators = each adapter's target
    tokens over a whole accumulated batch, the micro-batches' gradients add up to that."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    if denominators is None:
        denominators = target_counts(labels, row_groups)
    total = logits.new_zeros((), dtype=torch.float32)
    for rows, n in zip(row_groups, denominators):
        lg = shift_logits.index_select(0, rows)
        lb = shift_labels.index_select(0, rows)
        if not bool((lb != -100).any()) or float(n) == 0.0:
            continue
        total = total + F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100,
                                        reduction="sum") / n
    if not total.requires_grad and logits.requires_grad:  # no trained target here: a zero that backward accepts
        total = total + logits.sum() * 0.0
    return total


def count_targets_per_adapter(batches: Sequence[Dict[str, Any]], names: Sequence[str],
                              default: Optional[str]) -> Tensor:
    """[len(names)] float32: next-token targets (labels[:, 1:] != -100) of the rows of each adapter
    over `batches` (collated dicts; a batch without adapter_names is all `default`)."""
    index = {n: i for i, n in enumerate(names)}
    out = torch.zeros(len(names), dtype=torch.float32)
    for batch in batches:
        labels = batch.get("labels")
        if not isinstance(labels, Tensor):
            continue
        per_row = (labels[:, 1:] != -100).sum(-1).cpu().to(torch.float32)
        rows = batch.get("adapter_names") or [default] * labels.shape[0]
        for r, name in enumerate(rows):
            i = index.get(name)
            if i is not None:
                out[i] += per_row[r]
    return out


class MiLoRADataCollator:
    """Pads every column MiLoRA uses and stacks them into tensors.

    Each example is a dict with `input_ids` and optionally `attention_mask`, `labels`,
    `prompt_mask` (lists or 1-D tensors of one length per example) and `adapter_names` (one
    adapter name, a string; the batch gets the list). Padding: input_ids with pad_token_id,
    attention_mask and prompt_mask with 0, labels with label_pad_token_id (-100). Missing
    attention_mask = all ones; missing labels stay missing (the model then computes no loss);
    padding_side "right" (training) or "left".
    """

    def __init__(self, tokenizer=None, *, pad_token_id: Optional[int] = None, label_pad_token_id: int = -100,
                 padding_side: str = "right", pad_to_multiple_of: Optional[int] = None) -> None:
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = 0
        if padding_side not in ("right", "left"):
            raise ValueError(f"MiLoRADataCollator: padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and int(pad_to_multiple_of) < 1:
            raise ValueError("MiLoRADataCollator: pad_to_multiple_of must be >= 1")
        self.pad_token_id = int(pad_token_id)
        self.label_pad_token_id = int(label_pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    PAD_COLUMNS = ("input_ids", "attention_mask", "labels", "prompt_mask")

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        if not features:
            raise ValueError("MiLoRADataCollator: empty batch")
        seqs = {k: [] for k in self.PAD_COLUMNS}
        for i, f in enumerate(features):
            if "input_ids" not in f:
                raise ValueError(f"MiLoRADataCollator: example {i} has no input_ids")
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long).reshape(-1)
            n = ids.numel()
            seqs["input_ids"].append(ids)
            for k in ("attention_mask", "labels", "prompt_mask"):
                if k in f and f[k] is not None:
                    v = torch.as_tensor(f[k], dtype=torch.long).reshape(-1)
                    if v.numel() != n:
                        raise ValueError(f"MiLoRADataCollator: example {i}: {k} has {v.numel()} entries, input_ids {n}")
                    seqs[k].append(v)
                elif k == "attention_mask":
                    seqs[k].append(torch.ones(n, dtype=torch.long))
        L = max(s.numel() for s in seqs["input_ids"])
        if self.pad_to_multiple_of:
            m = int(self.pad_to_multiple_of)
            L = (L + m - 1) // m * m
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": self.label_pad_token_id, "prompt_mask": 0}
        batch: Dict[str, Any] = {}
        for k, rows in seqs.items():
            if not rows:
                continue
            if len(rows) != len(features):
                raise ValueError(f"MiLoRADataCollator: {k} is given for some examples but not all")
            out = torch.full((len(rows), L), pads[k], dtype=torch.long)
            for r, v in enumerate(rows):
                if self.padding_side == "right":
                    out[r, : v.numel()] = v
                else:
                    out[r, L - v.numel():] = v
            batch[k] = out
        names = [f.get("adapter_names") for f in features]
        if any(n is not None for n in names):
            bad = [n for n in names if n is not None and not isinstance(n, str)]
            if bad:
                raise ValueError(f"MiLoRADataCollator: adapter_names of an example must be one adapter name (a string), got {bad[0]!r}")
            batch["adapter_names"] = names
        return batch


def _unwrap(model):
    """The MiLoRAModel inside DDP / FSDP / accelerate wrappers (or None)."""
    from .model import MiLoRAModel
    seen = 0
    while not isinstance(model, MiLoRAModel) and seen < 8:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return None
        model, seen = inner, seen + 1
    return model if isinstance(model, MiLoRAModel) else None


def _make_trainer_class():
    from transformers import Trainer

    class MiLoRATrainer(Trainer):
        """transformers.Trainer whose checkpoints hold only the trained adapters (see the module
        docstring for why a subclass). Everything else is Trainer's own behaviour."""

        def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
            model = _unwrap(self.model)
            if model is None:
                return super()._save(output_dir, state_dict)
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
            # every rank calls: FSDP2 parameters are gathered collectively
            model.save_trained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
            if not self.args.should_save:
                return
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            from transformers.trainer import TRAINING_ARGS_NAME
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

        def _get_num_items_in_batch(self, batch_samples: list, device):
            """Trainer's count of target tokens in the accumulated batch; with several adapters
            trained at once, also each adapter's count (AdapterItemCounts), summed over processes
            like Trainer's own, so that each adapter's loss is normalised by its own tokens of
            the whole accumulated (and, across devices, global) batch."""
            total = super()._get_num_items_in_batch(batch_samples, device)
            model = _unwrap(self.model)
            if total is None or model is None or self.args.n_gpu > 1:
                return total
            from .trainable import trainable_names
            names = trainable_names(model)
            if len(names) < 2:
                return total
            counts = count_targets_per_adapter(batch_samples, names, model.active_adapter).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                counts = self.accelerator.gather(counts).reshape(-1, len(names)).sum(0)
            counts = counts / (self.get_tp_size() * self.get_cp_size() * self.get_sp_size())
            return AdapterItemCounts(total, {n: counts[i] for i, n in enumerate(names)})

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            target = _unwrap(model if model is not None else self.model)
            if target is None or not os.path.isfile(os.path.join(resume_from_checkpoint, CONFIG_NAME)):
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            target.load_trained(resume_from_checkpoint)

        def _load_best_model(self) -> None:
            target = _unwrap(self.model)
            best = self.state.best_model_checkpoint
            if target is None or best is None or not os.path.isfile(os.path.join(best, CONFIG_NAME)):
                return super()._load_best_model()
            target.load_trained(best)

    return MiLoRATrainer


# The fraction of the steps after which MiLoRA's routers stop training, by default (RouterFreezeCallback,
# `milora-train --router-freeze-at`, the quality bench's Recipe): better or level on all six seeds of
# the quality suite at 3000 steps, where it removed late routing collapses, and no effect on average
# at 600 (docs/training.md, rounds 3 and 4). 1.0 = never.
ROUTER_FREEZE_AT = 0.5


def _make_router_freeze_callback():
    from transformers import TrainerCallback

    class RouterFreezeCallback(TrainerCallback):
        """Stops training the layer routers of prompt-routed (MiLoRA) adapters once `at` of the
        training steps are done: from then on their gradients are dropped just before each
        optimizer step (after clipping, so DDP's reduction is untouched), and the LoRA modules
        finish training on a routing that no longer moves. On the quality suite this removed
        late collapses where a near-uniform router re-routed a task's prompts to modules not
        trained on them (docs/training.md, "Round 3: router freeze"). at=1.0 never freezes. FSDP1 with
        flattened parameters is not supported (the routers' gradients are not separate there)."""

        def __init__(self, at: float = ROUTER_FREEZE_AT):
            if not (0.0 <= at <= 1.0):
                raise ValueError(f"RouterFreezeCallback: at must be a fraction of the steps in [0, 1], got {at}")
            self.at = at

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.max_steps <= 0 or state.global_step < self.at * state.max_steps:
                return
            inner = _unwrap(model)
            if inner is None:
                return
            for router in inner.routers:
                for p in router.parameters():
                    p.grad = None

    return RouterFreezeCallback


_LAZY = {"MiLoRATrainer": _make_trainer_class, "RouterFreezeCallback": _make_router_freeze_callback}


def __getattr__(name: str):
    # Built on first use, so `import milora` does not import transformers' Trainer.
    if name in _LAZY:
        cls = _LAZY[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
