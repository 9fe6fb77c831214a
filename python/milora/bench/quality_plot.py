"""Plots of `milora-bench quality` records (matplotlib): exact match per task and method at the
last step, learning curves (exact match and held-out loss against steps and tokens, mean over
seeds with the min-max band) when several steps were evaluated, and MiLoRA's routing heat map
(share of prompts selecting each module, per layer and task)."""
from __future__ import annotations

import statistics
from typing import Dict, List

from milora import MODULE_NAMES

from .plot import _pyplot

COLORS = {"lora": "tab:blue", "static": "tab:cyan", "moelora": "tab:orange", "milora": "tab:red"}


def _bars(ax, recs: List[Dict], mix: str) -> None:
    final = [r for r in recs if r["mix"] == mix and r["steps"] == r["total_steps"]]
    methods = list(dict.fromkeys(r["method"] for r in final))
    tasks = list(dict.fromkeys(r["task"] for r in final))
    w = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        ys, lo, hi = [], [], []
        for t in tasks:
            v = [100 * r["accuracy"] for r in final if r["method"] == m and r["task"] == t]
            mu = statistics.mean(v)
            ys.append(mu)
            lo.append(mu - min(v))
            hi.append(max(v) - mu)
        ax.bar([i + (j - (len(methods) - 1) / 2) * w for i in range(len(tasks))], ys, w, yerr=[lo, hi],
               label=m, color=COLORS.get(m), capsize=2)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=20, fontsize=8)
    ax.set_ylabel("exact match %")
    ax.set_ylim(0, 105)
    seeds = sorted({r["seed"] for r in final})
    ax.set_title(f"{mix}: {final[0]['total_steps']} steps, seeds {seeds}", fontsize=9)
    ax.legend(fontsize=7)


def _curve(ax, recs: List[Dict], mix: str, key: str, xkey: str) -> None:
    rs = [r for r in recs if r["mix"] == mix and r["task"] == "mean"]
    for m in dict.fromkeys(r["method"] for r in rs):
        pts: Dict[int, List] = {}
        for r in rs:
            if r["method"] == m:
                pts.setdefault(r["steps"], []).append(r)
        steps = sorted(pts)
        xs = [statistics.mean(r[xkey] for r in pts[s]) for s in steps]
        scale = 100 if key == "accuracy" else 1
        vals = [[scale * r[key] for r in pts[s]] for s in steps]
        ax.plot(xs, [statistics.mean(v) for v in vals], "o-", color=COLORS.get(m), label=m, ms=3)
        ax.fill_between(xs, [min(v) for v in vals], [max(v) for v in vals], color=COLORS.get(m), alpha=0.15)
    ax.set_xlabel("training steps" if xkey == "steps" else "training tokens")
    ax.set_ylabel("exact match % (mean over tasks)" if key == "accuracy" else "held-out loss")
    if key != "accuracy":
        ax.set_yscale("log")
    ax.set_title(f"{mix}", fontsize=9)
    ax.legend(fontsize=7)


def _heat(ax, recs: List[Dict], mix: str, fig) -> None:
    final = [r for r in recs if r["mix"] == mix and r["method"] == "milora" and r["steps"] == r["total_steps"]
             and "routing" in r and r["task"] != "mean"]
    seed = min(r["seed"] for r in final)
    final = [r for r in final if r["seed"] == seed]
    layers = list(final[0]["routing"])
    rows, labels = [], []
    for layer in layers:
        for r in final:
            rows.append([r["routing"][layer]["share"][m] for m in MODULE_NAMES])
            labels.append(f"{layer} {r['task']}")
    im = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(MODULE_NAMES)))
    ax.set_xticklabels([m.replace("_proj", "") for m in MODULE_NAMES], fontsize=7)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_title(f"MiLoRA routing, {mix} (seed {seed}): share of prompts", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)


def write_quality_plot(records: List[Dict], path: str) -> None:
    plt = _pyplot()
    recs = [r for r in records if r.get("bench") == "quality"]
    mixes = list(dict.fromkeys(r["mix"] for r in recs))
    curves = len({r["steps"] for r in recs}) > 1
    routed = any("routing" in r for r in recs)
    ncols = 1 + (3 if curves else 0) + (1 if routed else 0)
    fig, axes = plt.subplots(len(mixes), ncols, figsize=(4.6 * ncols, 3.8 * len(mixes)), squeeze=False)
    for i, mix in enumerate(mixes):
        j = 0
        _bars(axes[i][j], recs, mix)
        j += 1
        if curves:
            _curve(axes[i][j], recs, mix, "accuracy", "steps")
            _curve(axes[i][j + 1], recs, mix, "accuracy", "tokens")
            _curve(axes[i][j + 2], recs, mix, "held_out_loss", "steps")
            j += 3
        if routed:
            _heat(axes[i][j], recs, mix, fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
