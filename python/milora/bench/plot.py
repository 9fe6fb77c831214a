"""PNG plots of bench records (matplotlib, an optional dependency: `pip install milora[bench]`).

layer records: per case, each method's time ratio to base (log scale; the byte floor of
decode cases as a marker). generate records: tokens/s per method, beam 1 and beam 3 side by side.
"""
from __future__ import annotations

from typing import Dict, List


class PlotUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotUnavailable("--plot needs matplotlib: pip install matplotlib (or pip install 'milora[bench]')") from e
    return plt


def _case_label(r: Dict) -> str:
    return (f"{r['phase']} {r['K']}x{r['N']}\nT={r['tokens']} P={r['adapters']} {r['mix']}\n"
            f"R={r['rank']} E={r['experts']}({r['active_experts']}) {r['dtype']}")


def _layer_axes(ax, recs: List[Dict]) -> None:
    cases: Dict[str, Dict[str, Dict]] = {}
    methods: List[str] = []
    for r in recs:
        cases.setdefault(_case_label(r), {})[r["label"]] = r
        if r["label"] not in methods:
            methods.append(r["label"])
    labels = list(cases)
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        xs, ys = [], []
        for i, c in enumerate(labels):
            r = cases[c].get(m)
            if r is not None and r["ratio_to_base"] is not None:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(r["ratio_to_base"])
        ax.bar(xs, ys, width, label=m)
    floors = [(i, max((r["floor_ratio"] or 0) for r in cases[c].values() if r["method"] != "moelora"))
              for i, c in enumerate(labels)]
    floors = [(i, f) for i, f in floors if f > 0]
    for n, (i, f) in enumerate(floors):
        ax.hlines(f, i - 0.42, i + 0.42, colors="k", linestyles="--", lw=1.2, zorder=5,
                  label="byte floor" if n == 0 else None)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=6)
    ax.set_ylabel("time / base F.linear (lower is better)")
    ax.set_title("layer: one linear, multi-tenant batch")
    ax.legend(fontsize=7, ncol=2)


def _generate_axes(ax, recs: List[Dict]) -> None:
    beams = sorted({r["beams"] for r in recs})
    labels: List[str] = []
    for r in recs:
        if r["label"] not in labels:
            labels.append(r["label"])
    width = 0.8 / max(len(beams), 1)
    for j, b in enumerate(beams):
        by = {r["label"]: r for r in recs if r["beams"] == b}
        xs = [i + (j - (len(beams) - 1) / 2) * width for i, lab in enumerate(labels) if lab in by]
        ys = [by[lab]["tokens_per_s"] for lab in labels if lab in by]
        bars = ax.bar(xs, ys, width, label=f"beam {b}")
        for x, lab in zip(xs, [lab for lab in labels if lab in by]):
            v = by[lab].get("speed_vs_base")
            if v is not None:
                ax.annotate(f"{v:.2f}x", (x, by[lab]["tokens_per_s"]), ha="center", va="bottom", fontsize=6)
        del bars
    r0 = recs[0]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("new tokens / s (higher is better)")
    ax.set_title(f"generate: {r0['model']}, {r0['seqs']} prompts, {r0['new_tokens']} new tokens, {r0['dtype']} "
                 f"on {r0['device']} (labels: x base)")
    ax.legend(fontsize=7)


def write_plot(records: List[Dict], path: str) -> None:
    plt = _pyplot()
    layer = [r for r in records if r.get("bench") == "layer"]
    gen = [r for r in records if r.get("bench") == "generate"]
    panels = [p for p in (("layer", layer), ("generate", gen)) if p[1]]
    if not panels:
        raise ValueError("no layer or generate records to plot")
    n_cases = len({_case_label(r) for r in layer}) if layer else 0
    fig_w = max(8.0, min(1.0 + 1.3 * max(n_cases, 6), 40.0))
    fig, axes = plt.subplots(len(panels), 1, figsize=(fig_w, 4.5 * len(panels)), squeeze=False)
    for ax, (kind, recs) in zip(axes[:, 0], panels):
        (_layer_axes if kind == "layer" else _generate_axes)(ax, recs)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
