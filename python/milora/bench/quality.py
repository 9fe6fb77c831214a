"""`milora-bench quality`: LoRA (PEFT anchor), LoRA through milora's static path, per-token
MOELoRA and MiLoRA trained at equal trainable-parameter budgets on a synthetic multi-task
seq2seq suite, with exact match, held-out loss and routing statistics.

    milora-bench quality                         quick default (1 seed, 2 mixes, a few minutes on 2 CPU cores)
    milora-bench quality --seeds 0 1 2 --steps 1500 --eval-at 100 250 500 1000 1500 --json q.json --plot q.png

Pipeline: the tiny base model is pre-trained on copy / reverse / shift / sort (cached on first
run, see quality_model.py); each method is trained from it on each task mix (quality_tasks.py:
"mixed" = four new tasks of different kinds, "interference" = four tasks mapping the same input
to different outputs, told apart only by the task token) with the same batches, AdamW, linear
warm-up and decay; at each evaluation point every method's adapter is loaded into ONE
MiLoRAModel (the PEFT adapter imported as a static adapter) and served in one mixed batch with
greedy generate. See docs/training.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch

from .progress import Progress
from .quality_eval import exact_match, generate_single, held_out_loss, routing_stats
from .quality_methods import METHODS, MethodTrainer, Recipe, choose_ranks, serving_model
from .quality_model import PRESETS as MODEL_PRESETS
from .quality_model import default_cache_dir, load_base
from .quality_tasks import MIXES, TrainStream, held_out

QUICK = dict(steps=600, eval_at=None, seeds=[0], mixes=["mixed", "interference"], n_eval=64)


def add_args(p: argparse.ArgumentParser) -> None:
    from ..train_cli import fraction
    from .cli import _positive, _non_negative
    p.add_argument("--model", choices=sorted(MODEL_PRESETS), default="tiny",
                   help="base model preset (default tiny: hidden 64, 2 layers), pre-trained in-process and cached")
    p.add_argument("--cache-dir", default=None, help=f"where the pre-trained base is cached (default {default_cache_dir()})")
    p.add_argument("--mixes", nargs="+", choices=sorted(MIXES), default=QUICK["mixes"], help="task mixes (default both)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods (default all)")
    p.add_argument("--seeds", nargs="+", type=_non_negative, default=QUICK["seeds"], help="seeds (default 0)")
    p.add_argument("--steps", type=_positive, default=QUICK["steps"], help=f"training steps (default {QUICK['steps']})")
    p.add_argument("--eval-at", nargs="+", type=_positive, metavar="STEP",
                   help="also evaluate at these steps (learning curves); the last step is always evaluated")
    p.add_argument("--rank", type=_positive, default=8, help="rank of the LoRA anchor; the others match its budget")
    p.add_argument("--lr", type=float, default=Recipe.lr, help=f"AdamW learning rate (default {Recipe.lr})")
    p.add_argument("--batch", type=_positive, default=Recipe.batch, help=f"training batch (default {Recipe.batch})")
    p.add_argument("--eval-per-task", type=_positive, default=QUICK["n_eval"], help="held-out prompts per task (default 64)")
    p.add_argument("--milora-lr-scale", type=float, default=Recipe.milora_lr_scale,
                   help="milora only: multiply the learning rate of its LoRA weights (default 1)")
    p.add_argument("--router-lr-scale", type=float, default=Recipe.router_lr_scale,
                   help="milora only: multiply the learning rate of its layer routers (default 1)")
    p.add_argument("--router-freeze-at", type=fraction, default=Recipe.router_freeze_at, metavar="FRACTION",
                   help="milora only: stop training its routers after this fraction of the steps (default 0.5; 1 = never)")
    p.add_argument("--milora-opt", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="MiLoRAConfig overrides for milora, e.g. top_k=3 gate_mode=hard load_balance_coef=0.1")
    p.add_argument("--moelora-opt", nargs="+", default=[], metavar="FIELD=VALUE", help="MiLoRAConfig overrides for moelora")


def _parse_opts(items: Sequence[str]) -> Dict:
    import json
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise SystemExit(f"milora-bench quality: expected FIELD=VALUE, got {it!r}")
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def run(model_name: str = "tiny", mixes: Sequence[str] = ("mixed", "interference"), methods: Sequence[str] = METHODS,
        seeds: Sequence[int] = (0,), steps: int = 600, eval_at: Optional[Sequence[int]] = None, rank: int = 8,
        recipe: Optional[Recipe] = None, n_eval: int = 64, cache_dir: Optional[str] = None,
        progress: Optional[bool] = None, log=print, verbose: bool = False) -> List[Dict]:
    """Train and evaluate; returns one record per (seed, mix, step, method, task) (task "mean" too)."""
    recipe = recipe or Recipe()
    points = sorted({s for s in (eval_at or []) if s < steps} | {steps})
    t_start = time.perf_counter()
    bar = Progress(len(seeds) * len(mixes) * steps * len(methods) + len(seeds) * len(mixes) * len(points), enabled=progress)
    bar.set_label("base model")
    base, path, took = load_base(model_name, cache_dir, log=log)
    log(f"base model {model_name!r}: {path}" + (f" (pre-trained now in {took:.0f} s)" if took else " (cached)"))
    plans = choose_ranks(base, rank, recipe)
    anchor = plans["lora"]["params"]
    log("trainable parameters (equal budgets, ranks chosen to match the PEFT LoRA anchor):")
    for m in methods:
        pl = plans[m]
        extra = (f"  E={pl['config'].experts_per_module} top_k={pl['config'].top_k}" if pl["config"] is not None else "")
        log(f"  {m:8s} rank {pl['rank']:3d}{extra:22s} {pl['params']:9,d}  ({100 * (pl['params'] / anchor - 1):+.1f}% vs lora)")
    records: List[Dict] = []
    for seed in seeds:
        for mix in mixes:
            tasks = MIXES[mix]
            held = held_out(tasks, n_eval)
            stream = TrainStream(tasks, seed, exclude=held)
            batches = [stream.batch(recipe.batch) for _ in range(steps)]
            with tempfile.TemporaryDirectory(prefix="milora_quality_") as work:
                trainers = {m: MethodTrainer(m, base, plans[m], recipe, seed, steps, work) for m in methods}
                train_s = {m: 0.0 for m in methods}
                for point in points:
                    exported = {}
                    for m, tr in trainers.items():
                        bar.set_label(f"seed {seed} {mix} {m} -> step {point}")
                        t0 = time.perf_counter()
                        start = tr.step
                        for s in range(start, point):
                            tr.train_to(s + 1, batches)
                            bar.step()
                        train_s[m] += time.perf_counter() - t0
                        d = os.path.join(work, f"{m}_{point}")
                        tr.export(d)
                        exported[m] = d
                    bar.set_label(f"seed {seed} {mix} eval @ {point}")
                    served = serving_model(base, exported)
                    acc = exact_match(served, held, list(methods))
                    loss = held_out_loss(served, held, list(methods))
                    rstats = routing_stats(served, held, "milora") if "milora" in methods else None
                    peft_acc = None
                    if "lora" in methods:  # the anchor served by PEFT itself, to check the import
                        trainers["lora"].model.eval()
                        resp = generate_single(trainers["lora"].model, held)
                        peft_acc = {}
                        for e, r in zip(held, resp):
                            peft_acc.setdefault(e.task, []).append(int(r == e.response))
                        peft_acc = {t: sum(v) / len(v) for t, v in peft_acc.items()}
                    bar.step()
                    if verbose:
                        log(f"seed {seed} {mix} step {point}: " + "  ".join(
                            f"{m} {100 * statistics.mean(acc[m].values()):.1f}% loss {statistics.mean(loss[m].values()):.3f}"
                            for m in methods) + f"  ({time.perf_counter() - t_start:.0f} s)")
                    for m in methods:
                        tr = trainers[m]
                        for task in list(tasks) + ["mean"]:
                            a = statistics.mean(acc[m].values()) if task == "mean" else acc[m][task]
                            lo = statistics.mean(loss[m].values()) if task == "mean" else loss[m][task]
                            rec = dict(bench="quality", model=model_name, mix=mix, method=m, task=task, seed=seed,
                                       steps=point, total_steps=steps, tokens=tr.tokens, accuracy=a, held_out_loss=lo,
                                       trainable_params=tr.trainable_params, rank=plans[m]["rank"],
                                       config=(plans[m]["config"].to_dict() if plans[m]["config"] is not None else
                                               {"peft": True, "r": plans[m]["rank"], "alpha": 2 * plans[m]["rank"]}),
                                       lr=recipe.lr, batch=recipe.batch, n_eval=n_eval,
                                       lr_scales=({"lora": recipe.milora_lr_scale, "router": recipe.router_lr_scale,
                                                   "router_freeze_at": recipe.router_freeze_at}
                                                  if m == "milora" else None),
                                       train_seconds=round(train_s[m], 2))
                            if m == "milora" and rstats is not None:
                                rec["routing"] = {layer: v.get(task, v["all"]) if task != "mean" else v["all"]
                                                  for layer, v in rstats.items()}
                            if m == "lora" and peft_acc is not None:
                                rec["accuracy_peft_generate"] = (statistics.mean(peft_acc.values()) if task == "mean"
                                                                 else peft_acc[task])
                            records.append(rec)
    bar.close()
    log(f"quality run took {time.perf_counter() - t_start:.0f} s")
    return records


def format_table(records: List[Dict]) -> str:
    """Markdown: final-step exact match (%) per mix / task / method, mean over seeds (min-max)."""
    final = [r for r in records if r["steps"] == r["total_steps"]]
    methods = list(dict.fromkeys(r["method"] for r in final))
    lines = []
    for mix in dict.fromkeys(r["mix"] for r in final):
        rs = [r for r in final if r["mix"] == mix]
        seeds = sorted({r["seed"] for r in rs})
        steps = rs[0]["total_steps"]
        lines.append(f"\n{mix} mix, exact match % at {steps} steps, seeds {seeds} (mean, min-max over seeds)")
        lines.append("| task | " + " | ".join(methods) + " |")
        lines.append("|---|" + "---|" * len(methods))
        for task in dict.fromkeys(r["task"] for r in rs):
            cells = []
            for m in methods:
                v = [100 * r["accuracy"] for r in rs if r["task"] == task and r["method"] == m]
                cells.append(f"{statistics.mean(v):.1f}" + (f" ({min(v):.0f}-{max(v):.0f})" if len(v) > 1 else ""))
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        cells = []
        for m in methods:
            v = [r["held_out_loss"] for r in rs if r["task"] == "mean" and r["method"] == m]
            cells.append(f"{statistics.mean(v):.3f}")
        lines.append("| held-out loss | " + " | ".join(cells) + " |")
        cells = [f"{next(r['trainable_params'] for r in rs if r['method'] == m):,d}" for m in methods]
        lines.append("| trainable params | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_routing(records: List[Dict]) -> str:
    """Per mix and layer: MiLoRA's share of prompts per module for each task (final step, first seed)."""
    from milora import MODULE_NAMES
    final = [r for r in records if r["steps"] == r["total_steps"] and r["method"] == "milora" and "routing" in r]
    if not final:
        return ""
    seed = min(r["seed"] for r in final)
    lines = [f"\nMiLoRA routing at the last step (seed {seed}): share of prompts selecting each module; "
             "entropy of the router distribution (bits, uniform = 2.81); load balance (1 = balanced)"]
    for mix in dict.fromkeys(r["mix"] for r in final):
        rs = [r for r in final if r["mix"] == mix and r["seed"] == seed]
        for layer in rs[0]["routing"]:
            lines.append(f"{mix} {layer}: " + " ".join(f"{m[:4]:>5s}" for m in MODULE_NAMES) + "  entropy  balance  sets")
            for r in rs:
                st = r["routing"][layer]
                lines.append(f"  {r['task']:>12s}   " + " ".join(f"{st['share'][m]:5.2f}" for m in MODULE_NAMES)
                             + f"  {st['entropy_bits']:7.2f}  {st['load_balance']:7.2f}  {st['distinct_sets']:4d}")
    return "\n".join(lines)


def run_cli(args, device) -> List[Dict]:
    from .timing import environment, format_env
    if device.type != "cpu":
        print(f"note: the quality bench runs on CPU (tiny model); --device {device} ignored")
    env = environment(torch.device("cpu"))
    print("# milora-bench quality")
    print(format_env(env))
    for name in ("milora_lr_scale", "router_lr_scale"):
        v = getattr(args, name)
        if not (v >= 0 and v < float("inf")):
            raise SystemExit(f"milora-bench quality: --{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    recipe = Recipe(lr=args.lr, batch=args.batch, milora_lr_scale=args.milora_lr_scale,
                    router_lr_scale=args.router_lr_scale, router_freeze_at=args.router_freeze_at,
                    milora=_parse_opts(args.milora_opt), moelora=_parse_opts(args.moelora_opt))
    recs = run(args.model, args.mixes, args.methods, args.seeds, args.steps, args.eval_at, args.rank, recipe,
               args.eval_per_task, args.cache_dir, args.progress)
    print(format_table(recs))
    print(format_routing(recs))
    return [dict(r, env=env) for r in recs]


def write_plot(records: List[Dict], path: str) -> None:
    from .quality_plot import write_quality_plot
    write_quality_plot(records, path)
