"""`milora-train`: fine-tune LoRA (PEFT), per-token MOELoRA or MiLoRA adapters on JSONL data with
the HF Trainer, save adapter-only checkpoints, evaluate exact match and loss on a held-out file.

    milora-train --model ./llama-dir --train train.jsonl --eval dev.jsonl --method milora \\
        --rank 32 --top-k 3 --epochs 3 --lr 1e-4 --output out/
    torchrun --nproc-per-node 4 -m milora.train_cli ...       (multi-GPU: the Trainer's DDP)

Data: see milora.sft_data (prompt/response fields or chat messages). Outputs in --output:
the adapter (milora: milora_config.json + adapter_model.safetensors; lora: PEFT's
adapter_config.json + adapter_model.safetensors), the tokenizer, checkpoint-N/ directories with
the adapter only (no optimizer state: --save-steps), and summary.json (what was trained, the
trainable parameter count, train / eval loss, exact match, wall time).

The Trainer pieces live here (`MiLoRATrainer`: the prompt-mask collator's batches go straight
to `MiLoRAModel.forward`, whose loss includes the load-balancing term; checkpoints hold the
adapter only, written with the model's own save_pretrained, as safetensors + JSON).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from .sft_data import PairDataset, PromptMaskCollator, exact_match, read_jsonl, tokenize_rows
from .training import ROUTER_FREEZE_AT

METHODS = ("lora", "moelora", "milora")


def fraction(text: str) -> float:
    """argparse type: a fraction in [0, 1] (also used by `milora-bench quality`)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="milora-train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local base model directory (a LLaMA-family causal LM)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    ap.add_argument("--train", required=True, help="training JSONL file")
    ap.add_argument("--eval", help="held-out JSONL file (exact match of greedy generate, and loss)")
    ap.add_argument("--output", required=True, help="output directory")
    m = ap.add_argument_group("method")
    m.add_argument("--method", choices=METHODS, default="milora")
    m.add_argument("--rank", type=int, default=32, help="LoRA rank (per expert for moelora)")
    m.add_argument("--alpha", type=float, help="LoRA alpha (default 2 x rank)")
    m.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    m.add_argument("--target-modules", nargs="+", default=["all-linear"],
                   help="modules to adapt (default all 7: q k v o gate up down _proj)")
    m.add_argument("--top-k", type=int, help="milora: modules per layer and prompt (default 3); moelora: experts per token (default 2)")
    m.add_argument("--experts", type=int, default=4, help="moelora: experts per module (default 4)")
    m.add_argument("--pooler", choices=("self_attn", "mean", "last", "max"), default="self_attn")
    m.add_argument("--activation", choices=("rational", "gelu"), default="rational")
    m.add_argument("--gate-mode", choices=("soft", "hard"), default="soft")
    m.add_argument("--load-balance-coef", type=float, default=1e-2)
    m.add_argument("--router-freeze-at", type=fraction, default=ROUTER_FREEZE_AT, metavar="FRACTION",
                   help=f"milora: stop training the routers after this fraction of the steps (default {ROUTER_FREEZE_AT}, "
                        "which removed late routing collapses on the quality suite, docs/training.md; 1 = never)")
    t = ap.add_argument_group("training (HF Trainer)")
    t.add_argument("--epochs", type=float, default=3.0)
    t.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--warmup-ratio", type=float, default=0.06, help="linear warm-up, as a fraction of the steps")
    t.add_argument("--batch-size", type=int, default=16, help="per device")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--max-length", type=int, default=768)
    t.add_argument("--weight-decay", type=float, default=0.0)
    prec = t.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    prec.add_argument("--fp16", action="store_true", help="float16 mixed precision (CUDA)")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--save-steps", type=int, default=0, help="adapter checkpoint every N steps (0: only the final adapter)")
    t.add_argument("--logging-steps", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-batch-size", type=int, default=16)
    t.add_argument("--max-new-tokens", type=int, help="generation length for exact match (default: reference length)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def milora_config_from_args(args):
    from .config import MiLoRAConfig
    alpha = args.alpha if args.alpha is not None else 2 * args.rank
    common = dict(r=args.rank, alpha=alpha, dropout=args.dropout, target_modules=_targets(args.target_modules),
                  load_balance_coef=args.load_balance_coef, gate_mode=args.gate_mode)
    if args.method == "milora":
        return MiLoRAConfig(routing="prompt", top_k=args.top_k or 3, pooler=args.pooler, activation=args.activation, **common)
    return MiLoRAConfig(routing="token", experts_per_module=args.experts, top_k=args.top_k or 2, **common)


def _targets(names: Sequence[str]):
    return "all-linear" if list(names) == ["all-linear"] else tuple(names)


def build_model(args, base):
    """Wrap the base model for the chosen method; returns (model, trainable parameter count)."""
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model
        from .config import MODULE_NAMES
        targets = list(MODULE_NAMES) if list(args.target_modules) == ["all-linear"] else list(args.target_modules)
        cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha if args.alpha is not None else 2 * args.rank,
                         lora_dropout=args.dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
    else:
        from .model import get_milora_model
        model = get_milora_model(base, milora_config_from_args(args), adapter_name="default")
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_trainer_class():
    from transformers import Trainer

    class MiLoRATrainer(Trainer):
        """Trainer whose checkpoints hold only the adapter (the model's own save_pretrained:
        safetensors + JSON; no pickled optimizer or arguments), and whose evaluation loss is
        the LM loss alone (training optimises LM + load_balance_coef * aux_loss)."""

        load_balance_coef = 0.0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            if not model.training and isinstance(outputs, dict) and "aux_loss" in outputs:
                loss = loss - self.load_balance_coef * outputs["aux_loss"].to(loss.dtype)
            return (loss, outputs) if return_outputs else loss

        def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            model = self.accelerator.unwrap_model(self.model)
            model.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            with open(os.path.join(output_dir, "training_args.json"), "w") as f:
                f.write(self.args.to_json_string())

    return MiLoRATrainer


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed
    t0 = time.perf_counter()
    set_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    train_pairs = tokenize_rows(read_jsonl(args.train), tok, args.max_length, args.train)
    eval_pairs = tokenize_rows(read_jsonl(args.eval), tok, args.max_length, args.eval) if args.eval else None
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.gradient_checkpointing:
        base.config.use_cache = False
    model, n_trainable = build_model(args, base)
    print(f"milora-train: method {args.method}, {len(train_pairs)} training examples"
          + (f", {len(eval_pairs)} held-out" if eval_pairs else "") + f", trainable parameters {n_trainable:,d}")
    targs = TrainingArguments(
        output_dir=args.output, num_train_epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr,
        warmup_steps=args.warmup_ratio, lr_scheduler_type="linear", weight_decay=args.weight_decay,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.grad_accum, bf16=args.bf16, fp16=args.fp16,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        label_names=["labels"],  # MiLoRAModel.forward takes labels through **kwargs
        logging_steps=args.logging_steps, save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=args.save_steps if args.save_steps > 0 else 500, save_only_model=True,
        eval_strategy="no", report_to=[], remove_unused_columns=False, seed=args.seed,
        disable_tqdm=args.no_progress, ddp_find_unused_parameters=args.method != "lora",
        use_cpu=not torch.cuda.is_available(),
    )
    collator = PromptMaskCollator(tok.pad_token_id, with_prompt_mask=args.method != "lora")
    trainer = make_trainer_class()(model=model, args=targs, train_dataset=PairDataset(train_pairs),
                                   eval_dataset=PairDataset(eval_pairs) if eval_pairs else None,
                                   data_collator=collator, processing_class=tok)
    if args.method != "lora":
        trainer.load_balance_coef = args.load_balance_coef
    if args.method == "milora" and args.router_freeze_at < 1.0:
        from .training import RouterFreezeCallback
        trainer.add_callback(RouterFreezeCallback(args.router_freeze_at))
    result = trainer.train()
    trainer.save_model(args.output)
    summary: Dict = {"method": args.method, "model": args.model, "trainable_params": n_trainable,
                     "train_examples": len(train_pairs), "steps": int(result.global_step),
                     "train_loss": float(result.training_loss)}
    if args.method != "lora":
        summary["config"] = milora_config_from_args(args).to_dict()
    if args.method == "milora":
        summary["router_freeze_at"] = args.router_freeze_at
    if eval_pairs:
        metrics = trainer.evaluate()
        summary["eval_loss"] = float(metrics["eval_loss"])
        summary["eval_examples"] = len(eval_pairs)
        if trainer.is_world_process_zero():
            summary["exact_match"] = exact_match(trainer.accelerator.unwrap_model(trainer.model), tok, eval_pairs,
                                                 args.eval_batch_size, args.max_new_tokens)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print("\nmilora-train summary")
        for k in ("method", "trainable_params", "train_examples", "steps", "train_loss", "eval_loss", "exact_match", "wall_seconds"):
            if k in summary:
                v = summary[k]
                print(f"  {k:17s} {v:,d}" if isinstance(v, int) else f"  {k:17s} {v:.4f}" if isinstance(v, float) and not math.isnan(v) else f"  {k:17s} {v}")
        print(f"  adapter written to {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
