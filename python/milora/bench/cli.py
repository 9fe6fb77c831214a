"""`milora-bench` (also `python -m milora.bench`): layer microbenchmarks and the multi-tenant
generate benchmark, with an environment header, markdown tables, --json and --plot.

    milora-bench                      quick default: the headline rows of both benches (~2 min on 2 CPU cores)
    milora-bench layer [options]      one linear layer, every method (see milora.bench.methods)
    milora-bench generate [options]   tokens/s of a LLaMA-style decoder, B tenants (see milora.bench.generate)
    milora-bench quality [options]    LoRA vs MOELoRA vs MiLoRA quality at equal budgets (see milora.bench.quality)
    milora-bench train [options]      training steps: float32-adapter cost, several adapters at once (milora.bench.train)

See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

from . import generate as gen_bench
from . import layer as layer_bench
from . import serving as serving_bench
from .models import PRESETS as MODEL_PRESETS
from .timing import environment, format_env

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
SUBCOMMANDS = ("layer", "generate", "quality", "train", "all")


# ---- argument types (each raises a message argparse prints as a usage error) -------------


def _dtype(text: str) -> torch.dtype:
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {sorted(set(DTYPES))}") from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _non_negative(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _pair(text: str, what: str):
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected {what} like 4096x11008, got {text!r}")
    return tuple(_positive(p) for p in parts)


def _shape(text: str):
    return _pair(text, "KxN")


def _prefill(text: str):
    return _pair(text, "SEQSxLEN")


def _adapters(text: str):
    return "S" if text.upper() == "S" else _positive(text)


def _experts(text: str):
    e, _, k = text.partition(":")
    E = _positive(e)
    K = _positive(k) if k else None
    if K is not None and K > E:
        raise argparse.ArgumentTypeError(f"--experts {text}: active experts {K} > experts {E}")
    return (E, K)


def _device(text: str) -> str:
    if text == "auto":
        return text
    try:
        d = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: {e}") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} requested but CUDA is not available")
    if d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r}: only cpu and cuda are supported")
    return text


# ---- the parser -------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--device", type=_device, default="auto", help="cpu, cuda, cuda:N or auto (CUDA if available)")
    g.add_argument("--json", metavar="PATH", help="write the records (a JSON list, one per measurement)")
    g.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs matplotlib)")
    g.add_argument("--threads", type=_positive, help="torch CPU threads for the timed calls (default: torch's)")
    prog = g.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="always draw the progress bar (default: only when stderr is a terminal)")
    prog.add_argument("--no-progress", dest="progress", action="store_false")


def _layer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(layer_bench.PRESETS), default="standard",
                   help="sweep preset (default standard: the issue's sweep; quick: a few rows; moe: experts; "
                        "foundation: the foundation op table); the flags below override its dimensions")
    p.add_argument("--dtype", type=_dtype, nargs="+", help="dtypes to sweep (default bfloat16)")
    p.add_argument("--shapes", type=_shape, nargs="+", metavar="KxN", help="layer shapes (default 4096x4096 4096x11008)")
    p.add_argument("--phase", choices=("decode", "prefill"), nargs="+")
    p.add_argument("--seqs", type=_positive, nargs="+", metavar="S", help="decode batch sizes (one token per sequence)")
    p.add_argument("--prefill", type=_prefill, nargs="+", metavar="SxL", help="prefill batches, e.g. 4x512")
    p.add_argument("--adapters", type=_adapters, nargs="+", metavar="P",
                   help="adapter slots P (S = one per sequence); default 1 4 16 64")
    p.add_argument("--mix", choices=("distinct", "uniform", "skewed", "identical"), nargs="+",
                   help="adapter popularity mixes")
    p.add_argument("--rank", type=_positive, nargs="+", help="LoRA ranks R")
    p.add_argument("--experts", type=_experts, nargs="+", metavar="E[:k]",
                   help="experts per adapter, with k active per sequence/token (e.g. 1 4:2 8:4)")
    p.add_argument("--methods", choices=layer_bench.METHODS, nargs="+", help="subset of methods (base always runs)")
    p.add_argument("--repeats", type=_positive, help="timed repeats per decode case")
    p.add_argument("--prefill-repeats", type=_positive, help="timed repeats per prefill case")
    p.add_argument("--warmup", type=_non_negative)
    p.add_argument("--cache-flush", "--l2-flush", dest="l2_flush", action="store_true",
                   help="touch a buffer twice the last-level cache (GPU L2, CPU L3) before every timed call")


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(gen_bench.PRESETS), default="standard",
                   help="settings preset (default standard); the flags below override it")
    p.add_argument("--model", choices=sorted(MODEL_PRESETS), help="model shape preset (default tiny; random weights)")
    p.add_argument("--dtype", type=_dtype, default=torch.bfloat16, help="model dtype (default bfloat16)")
    p.add_argument("--batch", type=_positive, help="prompts B, each its own tenant (default 8)")
    p.add_argument("--adapters", type=_positive, help="distinct adapters (default = batch)")
    p.add_argument("--prompt-len", type=_positive, help="prompt tokens (default 32)")
    p.add_argument("--new-tokens", type=_positive, help="new tokens per prompt (default 32)")
    p.add_argument("--beams", type=_positive, nargs="+", help="beam widths (default 1 3)")
    p.add_argument("--rank", type=_positive, help="LoRA / MiLoRA rank (default 32)")
    p.add_argument("--top-k", type=_positive, help="MiLoRA modules kept per layer (default 3 of 7)")
    p.add_argument("--methods", choices=gen_bench.METHODS, nargs="+", help="subset of methods (base always runs)")
    p.add_argument("--repeats", type=_positive)
    p.add_argument("--warmup", type=_non_negative)
    p.add_argument("--seed", type=_non_negative)
    p.add_argument("--profile", choices=gen_bench.METHODS, metavar="METHOD",
                   help="after the table, profile one beam-1 generate of METHOD and print the top ops")
    p.add_argument("--profile-rows", type=_positive, default=25)
    serving_bench.add_args(p)


def _train_args(p: argparse.ArgumentParser) -> None:
    from .train import DEFAULTS
    p.add_argument("--model", choices=sorted(MODEL_PRESETS), default=DEFAULTS["model"], help="model shape preset (random weights)")
    p.add_argument("--dtype", type=_dtype, default=DEFAULTS["dtype"], help="base model dtype (default bfloat16)")
    p.add_argument("--adapters", type=_positive, default=DEFAULTS["adapters"], help="adapters trained at once")
    p.add_argument("--rows", type=_positive, default=DEFAULTS["rows"], help="rows per adapter")
    p.add_argument("--seq-len", type=_positive, default=DEFAULTS["seq_len"])
    p.add_argument("--rank", type=_positive, default=DEFAULTS["rank"])
    p.add_argument("--repeats", type=_positive, default=DEFAULTS["repeats"])
    p.add_argument("--warmup", type=_non_negative, default=DEFAULTS["warmup"])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="milora-bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Run `milora-bench SUBCOMMAND -h` for the options of each bench.")
    sub = ap.add_subparsers(dest="command", metavar="{layer,generate,quality,train,all}")
    p_layer = sub.add_parser("layer", help="one linear layer, every method (see docs/benchmarks.md)")
    _layer_args(p_layer)
    _common(p_layer)
    p_gen = sub.add_parser("generate", help="multi-tenant generation tokens/s (the paper's Table 4)")
    _generate_args(p_gen)
    _common(p_gen)
    from . import quality as quality_bench  # hook for the quality bench (its code lives in quality*.py)
    p_q = sub.add_parser("quality", help="multi-task quality: LoRA vs MOELoRA vs MiLoRA at equal budgets (docs/training.md)",
                         description=quality_bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quality_bench.add_args(p_q)
    _common(p_q)
    p_train = sub.add_parser("train", help="training steps: float32-adapter cost, several adapters at once")
    _train_args(p_train)
    _common(p_train)
    p_all = sub.add_parser("all", help="the quick default: headline rows of both benches (what no arguments runs)")
    _common(p_all)
    return ap


# ---- running ----------------------------------------------------------------------------


def _resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(text)


def _check_outputs(ap: argparse.ArgumentParser, args) -> None:
    for flag in ("json", "plot"):
        path = getattr(args, flag)
        if path:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                ap.error(f"--{flag} {path}: directory {parent} does not exist")
    if args.plot:
        from .plot import PlotUnavailable, _pyplot
        try:
            _pyplot()
        except PlotUnavailable as e:
            ap.error(str(e))


def _header(device: torch.device, dtypes: Sequence[torch.dtype], what: str) -> Dict:
    env = environment(device)
    env["dtype"] = ",".join(str(d).replace("torch.", "") for d in dtypes)
    print(f"# milora-bench {what}")
    print(format_env(env))
    return env


def _layer(args, device) -> List[Dict]:
    sw = layer_bench.sweep_from_args(args)
    env = _header(device, sw.dtypes, f"layer (preset {args.preset})")
    recs = layer_bench.run(sw, device, l2_flush=args.l2_flush, progress=args.progress)
    return [dict(r, env=env) for r in recs]


def _generate(args, device) -> List[Dict]:
    if args.scenario == "serving":
        ss = serving_bench.settings_from_args(args)
        env = _header(device, [args.dtype], "generate --scenario serving")
        return [dict(r, env=env) for r in serving_bench.run(ss, device, args.dtype, progress=args.progress)]
    s = gen_bench.settings_from_args(args)
    env = _header(device, [args.dtype], f"generate (preset {args.preset})")
    recs = gen_bench.run(s, device, args.dtype, progress=args.progress, profile=args.profile,
                         profile_rows=args.profile_rows)
    return [dict(r, env=env) for r in recs]


def _train(args, device) -> List[Dict]:
    from . import train as train_bench
    if device.type != "cpu":
        raise SystemExit("milora-bench train: CPU only for now (--device cpu)")
    print("# milora-bench train")
    return train_bench.run(args.model, args.dtype, args.adapters, args.rows, args.seq_len, args.rank,
                           args.repeats, args.warmup)


def _all(args, device) -> List[Dict]:
    """The quick default: layer preset quick (caches flushed before every timed call, the
    condition the layer targets are defined under), then generate preset quick."""
    lp = build_parser()
    largs = lp.parse_args(["layer", "--preset", "quick", "--cache-flush"])
    largs.progress = args.progress
    gargs = lp.parse_args(["generate", "--preset", "quick"])
    gargs.progress = args.progress
    recs = _layer(largs, device)
    print()
    recs += _generate(gargs, device)
    return recs


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["all"] + argv  # no subcommand: the quick default
    ap = build_parser()
    args = ap.parse_args(argv)
    _check_outputs(ap, args)
    device = _resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    from . import quality as quality_bench
    runner = {"layer": _layer, "generate": _generate, "quality": quality_bench.run_cli, "train": _train,
              "all": _all}[args.command]
    records = runner(args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1, default=str)
        print(f"wrote {len(records)} records to {args.json}")
    if args.plot:
        from .plot import write_plot
        (quality_bench.write_plot if args.command == "quality" else write_plot)(records, args.plot)
        print(f"wrote plot {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
