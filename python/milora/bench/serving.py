"""The serving scenario of the generate bench (`milora-bench generate --scenario serving`): requests
arriving over time on transformers' continuous-batching engine, each with its own adapter.

A seeded schedule of R requests: prompt lengths and output lengths drawn uniformly from ranges,
Poisson arrivals at `rate` requests/s, adapter of each request drawn from A distinct adapters.
Every method serves the same schedule on its own engine (same engine settings, prefix sharing off,
greedy, EOS off so each request generates exactly its output length):
    base         the base model on transformers' own engine (no adapters)
    lora         LoRA r on all 7 linears, unmerged, per-request adapters in standard PEFT files
                 imported into a MiLoRAModel (router-less), fused op, one op call per linear per step
    peft_single  the real `peft` library through the base model's engine: ONE adapter for all
                 requests (PEFT's mixed batches take `adapter_names` per batch row, and the engine
                 packs every request into one row, so per-request PEFT adapters cannot run on it)
    moelora      MOELoRA per-token routing (8 experts of rank 4, top-4 per token), per request
    milora       MiLoRA (prompt routing, top-3 of 7 modules), per request, fused op
Reported per method (medians over interleaved repeats; ratios are medians of per-repeat ratios to
the base model's run in the same round): generated tokens/s over the whole schedule (first arrival
to last completion), and per-request latency p50 / p99: time to first token (from arrival) and time
per output token after the first.
"""
from __future__ import annotations

import copy
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .generate import GenSettings, _setup_threads, build_methods
from .models import PRESETS as MODEL_PRESETS
from .models import build_model
from .progress import Progress

METHODS = ("base", "lora", "peft_single", "moelora", "milora")
LABELS = {
    "base": "base model (no adapters)",
    "lora": "LoRA all 7 modules (PEFT files), per request",
    "peft_single": "peft, one adapter for all requests",
    "moelora": "MOELoRA per-token (8x r4, top-4), per request",
    "milora": "MiLoRA fused, per request",
}
NOT_ON_ENGINE = {
    "peft": "peft with per-request adapters cannot run on the continuous-batching engine (its adapter_names "
            "is per batch row; the engine packs all requests into one row)",
    "milora_ref": "not run in the serving scenario (the reference op is a per-sequence Python loop)",
}


@dataclass
class ServingSettings:
    model: str = "tiny"
    requests: int = 16
    adapters: int = 8                       # distinct adapters; each request draws one
    prompt_lens: Tuple[int, int] = (8, 64)  # uniform, inclusive
    new_tokens: Tuple[int, int] = (8, 32)   # uniform, inclusive
    rate: float = 8.0                       # requests per second (Poisson arrivals)
    rank: int = 32
    top_k: int = 3
    methods: Sequence[str] = METHODS
    repeats: int = 3
    max_batch_tokens: int = 256
    page_size: int = 32
    seed: int = 0


@dataclass(frozen=True)
class Arrival:
    at: float              # seconds after the schedule starts
    prompt: List[int]
    new_tokens: int
    adapter: str


def make_schedule(s: ServingSettings, vocab: int) -> List[Arrival]:
    """The seeded request schedule (same for every method)."""
    rng = random.Random(s.seed)
    g = torch.Generator().manual_seed(s.seed + 11)
    t, out = 0.0, []
    for i in range(s.requests):
        if i:
            t += rng.expovariate(s.rate)
        n_prompt = rng.randint(*s.prompt_lens)
        out.append(Arrival(t, torch.randint(1, vocab, (n_prompt,), generator=g).tolist(),
                           rng.randint(*s.new_tokens), f"t{rng.randrange(s.adapters)}"))
    return out


def engine_config(s: ServingSettings, schedule: Sequence[Arrival]):
    """The same engine settings for every method: a paged cache holding every request at once."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    tokens = sum(len(a.prompt) + a.new_tokens + s.page_size for a in schedule)
    return ContinuousBatchingConfig(page_size=s.page_size, num_blocks=math.ceil(tokens / s.page_size) + 4,
                                    max_batch_tokens=max(s.max_batch_tokens, max(len(a.prompt) for a in schedule)),
                                    allow_block_sharing=False, use_cuda_graph=False, use_async_batching=False)


def _gen_config(schedule: Sequence[Arrival]):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max(a.new_tokens for a in schedule), do_sample=False,
                            eos_token_id=-1, pad_token_id=0)


def serve(model, schedule: Sequence[Arrival], cb_config, per_request_adapters: bool) -> Dict:
    """Serve `schedule` on a fresh engine of `model`; returns the run's measurements."""
    manager = model.init_continuous_batching(_gen_config(schedule), continuous_batching_config=copy.deepcopy(cb_config))
    manager.start()
    results, ids = {}, {}
    try:
        t0 = time.perf_counter()
        i, n = 0, len(schedule)
        while len(results) < n:
            now = time.perf_counter() - t0
            while i < n and schedule[i].at <= now:
                a = schedule[i]
                kw = dict(adapter_name=a.adapter) if per_request_adapters else {}
                ids[manager.add_request(a.prompt, max_new_tokens=a.new_tokens, record_timestamps=True, **kw)] = i
                i += 1
            wait = schedule[i].at - now if i < n else 0.05
            out = manager.get_result(timeout=min(max(wait, 0.001), 0.05))
            if out is not None and out.is_finished():
                if out.error is not None:
                    raise RuntimeError(f"serving: request {out.request_id} failed: {out.error}")
                results[out.request_id] = out
            elif out is None and not manager.is_running():
                raise RuntimeError("serving: the engine stopped before every request finished")
    finally:
        manager.stop(block=True)
        manager.destroy()
    ttft, tpot, tokens, end = [], [], 0, t0
    for rid, out in results.items():
        a = schedule[ids[rid]]
        ts = out.timestamps
        if len(out.generated_tokens) != a.new_tokens or not ts:
            raise RuntimeError(f"serving: request {rid} produced {len(out.generated_tokens)} tokens, expected {a.new_tokens}")
        tokens += len(out.generated_tokens)
        ttft.append(ts[0] - out.created_time)
        if len(ts) > 1:
            tpot.append((ts[-1] - ts[0]) / (len(ts) - 1))
        end = max(end, ts[-1])
    span = end - t0
    return dict(tokens=tokens, seconds=span, tokens_per_s=tokens / span, ttft=ttft, tpot=tpot)


def _pct(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation between closest ranks)."""
    v = sorted(xs)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _run_stats(run: Dict) -> Dict[str, float]:
    return dict(tokens_per_s=run["tokens_per_s"], ttft_p50=_pct(run["ttft"], 50), ttft_p99=_pct(run["ttft"], 99),
                tpot_p50=_pct(run["tpot"], 50), tpot_p99=_pct(run["tpot"], 99))


def check_tokens(model, schedule: Sequence[Arrival], cb_config, per_request_adapters: bool, n: int = 3) -> str:
    """Before timing: the engine's greedy tokens for the first n requests (short outputs) against
    the same model's `generate` per request. Returns 'k/n tokens equal'."""
    sub = [replace(a, new_tokens=min(a.new_tokens, 6)) for a in schedule[:n]]
    gc = _gen_config(sub)
    kw = dict(adapter_names=[a.adapter for a in sub]) if per_request_adapters else {}
    outs = list(model.generate_batch([a.prompt for a in sub], gc, continuous_batching_config=copy.deepcopy(cb_config),
                                     **kw).values())
    same = total = 0
    for a, o in zip(sub, outs):
        gkw = dict(adapter_names=[a.adapter]) if per_request_adapters else {}
        want = model.generate(input_ids=torch.tensor([a.prompt]), max_new_tokens=a.new_tokens,
                              min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                              **gkw)[0, len(a.prompt):].tolist()
        same += sum(x == y for x, y in zip(o.generated_tokens, want))
        total += len(want)
    return f"{same}/{total} greedy tokens equal to generate"


def run(s: ServingSettings, device, dtype: torch.dtype, *, progress: Optional[bool] = None, printer=print) -> List[Dict]:
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    import logging
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    device = torch.device(device)
    for m in s.methods:
        if m in NOT_ON_ENGINE:
            printer(f"note: {m}: {NOT_ON_ENGINE[m]}")
    methods = [m for m in METHODS if m in s.methods]
    if "base" not in methods:
        methods.insert(0, "base")
    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="milora-bench-") as workdir:
        with _setup_threads(device):
            base = build_model(s.model, dtype, device, seed=s.seed)
            gs = GenSettings(model=s.model, batch=s.adapters, adapters=s.adapters, rank=s.rank, top_k=s.top_k,
                             methods=tuple(methods), seed=s.seed)
            built = build_methods(gs, base, workdir, log=printer)
        schedule = make_schedule(s, base.config.vocab_size)
        cfg = engine_config(s, schedule)
        models = {n: built[n].model for n in methods if n in built}
        if "peft_single" in models:
            models["peft_single"].set_adapter("t0")
        per_req = {n: n not in ("base", "peft_single") for n in models}
        printer(f"model {s.model}: {MODEL_PRESETS[s.model].describe()}; {s.requests} requests over "
                f"{schedule[-1].at:.2f} s ({s.rate:g}/s Poisson), prompts {s.prompt_lens[0]}-{s.prompt_lens[1]} "
                f"tokens, outputs {s.new_tokens[0]}-{s.new_tokens[1]} tokens, {s.adapters} distinct adapters; engine: "
                f"max_batch_tokens {cfg.max_batch_tokens}, {cfg.num_blocks} blocks of {cfg.page_size}")
        with _setup_threads(device), torch.inference_mode():
            checks = {n: check_tokens(m, schedule, cfg, per_req[n]) for n, m in models.items()}
        printer(f"setup (models, adapters, token checks): {time.perf_counter() - t_setup:.1f} s; serving "
                f"{len(models)} methods x (1 warm-up + {s.repeats} repeats), interleaved")
        runs: Dict[str, List[Dict]] = {n: [] for n in models}
        names = list(models)
        warm = schedule[: max(2, len(schedule) // 4)]
        with Progress(len(names) * (1 + s.repeats), enabled=progress) as bar, torch.inference_mode():
            bar.set_label("serving warm-up")
            for n in names:
                serve(models[n], warm, cfg, per_req[n])
                bar.step()
            for r in range(s.repeats):
                bar.set_label(f"serving repeat {r + 1}")
                for n in names[r % len(names):] + names[: r % len(names)]:  # rotate the order every round
                    runs[n].append(_run_stats(serve(models[n], schedule, cfg, per_req[n])))
                    bar.step()
    records = []
    keys = ("tokens_per_s", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")
    for n in names:
        rec = dict(bench="generate", scenario="serving", method=n, label=LABELS[n], device=str(device),
                   dtype=str(dtype).replace("torch.", ""), model=s.model, requests=s.requests, rate=s.rate,
                   prompt_lens=list(s.prompt_lens), new_tokens=list(s.new_tokens), adapters=0 if n == "base" else
                   (1 if n == "peft_single" else s.adapters), rank=s.rank, repeats=s.repeats, seed=s.seed,
                   tokens=sum(a.new_tokens for a in schedule),
                   checked=checks[n], runs=runs[n])
        for k in keys:
            rec[k] = statistics.median(x[k] for x in runs[n])
            rec[k + "_x_base"] = statistics.median(x[k] / b[k] for x, b in zip(runs[n], runs["base"]))
        records.append(rec)
    printer(TABLE_HEADER)
    for r in records:
        printer(format_row(r))
    for line in target_lines(records):
        printer(line)
    return records


TABLE_HEADER = ("| model | method | tokens/s | x base | TTFT p50 / p99 ms | x base | per-token p50 / p99 ms | x base | checked |\n"
                "|---|---|---|---|---|---|---|---|---|")


def format_row(r: Dict) -> str:
    return (f"| {r['model']} | {r['label']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_x_base']:.2f} | "
            f"{1e3 * r['ttft_p50']:.0f} / {1e3 * r['ttft_p99']:.0f} | {r['ttft_p50_x_base']:.2f} / {r['ttft_p99_x_base']:.2f} | "
            f"{1e3 * r['tpot_p50']:.0f} / {1e3 * r['tpot_p99']:.0f} | {r['tpot_p50_x_base']:.2f} / {r['tpot_p99_x_base']:.2f} | "
            f"{r['checked']} |")


def target_lines(records: List[Dict]) -> List[str]:
    """The issue's targets: MiLoRA >= 0.85x base tokens/s; per-token MOELoRA visibly behind MiLoRA."""
    by = {r["method"]: r for r in records}
    lines = []
    mi = by.get("milora")
    if mi is not None:
        v = mi["tokens_per_s_x_base"]
        lines.append(f"target (serving): MiLoRA tokens/s = {v:.2f}x base (goal >= 0.85x): {'met' if v >= 0.85 else 'MISSED'}")
        mo = by.get("moelora")
        if mo is not None:
            rel = mi["tokens_per_s"] / mo["tokens_per_s"]
            lines.append(f"serving: MiLoRA tokens/s = {rel:.2f}x MOELoRA per-token (MOELoRA {mo['tokens_per_s_x_base']:.2f}x base)")
    return lines


def _range(text: str) -> Tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi if sep else lo)
    except ValueError:
        raise ValueError(f"expected MIN:MAX like 8:64, got {text!r}") from None
    if a < 1 or b < a:
        raise ValueError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return a, b


def add_args(p) -> None:
    """The serving scenario's flags, on the generate subcommand's parser."""
    import argparse

    def rng(text):
        try:
            return _range(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    def rate(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a rate in requests/s, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected a rate > 0, got {text!r}")
        return v

    g = p.add_argument_group("serving scenario (--scenario serving)")
    g.add_argument("--scenario", choices=("batch", "serving"), default="batch",
                   help="batch: B prompts through generate (default); serving: requests arriving over time on the "
                        "continuous-batching engine, each with its own adapter")
    g.add_argument("--requests", type=int, help=f"serving: requests (default {ServingSettings.requests})")
    g.add_argument("--rate", type=rate, help=f"serving: Poisson arrivals per second (default {ServingSettings.rate:g})")
    g.add_argument("--prompt-lens", type=rng, metavar="MIN:MAX", help="serving: prompt lengths (default 8:64)")
    g.add_argument("--output-lens", type=rng, metavar="MIN:MAX", help="serving: output lengths (default 8:32)")
    g.add_argument("--max-batch-tokens", type=int, help="serving: the engine's token budget per step (default 256)")


def settings_from_args(args) -> ServingSettings:
    over = {}
    for flag, fld in (("model", "model"), ("requests", "requests"), ("adapters", "adapters"), ("rate", "rate"),
                      ("prompt_lens", "prompt_lens"), ("output_lens", "new_tokens"), ("rank", "rank"),
                      ("top_k", "top_k"), ("repeats", "repeats"), ("seed", "seed"),
                      ("max_batch_tokens", "max_batch_tokens")):
        v = getattr(args, flag, None)
        if v is not None:
            over[fld] = v
    if getattr(args, "methods", None):
        over["methods"] = tuple(args.methods)
    return replace(ServingSettings(), **over)
