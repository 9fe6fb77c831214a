"""The foundation benchmark table (op vs base vs PEFT-style loop), kept for compatibility.

    python -m milora.bench.op_table [--dtypes float32 bfloat16] [--repeats 7] [--json out.json]

is now `milora-bench layer --preset foundation [--dtype ...] [--repeats N] [--json out.json]`:
K = N = 4096, R = 16; decode with T = S in {1, 8, 32}, one adapter per sequence (P = S), E = 1
and E = 4 with 2 non-zero gates; prefill T = 2048 in 4 sequences; methods base, fused op and
PEFT-style loop, with the byte floor of decode cases. The records are `milora-bench`'s (a JSON
list). `peft_style_loop` and `byte_floor` live in milora.bench.methods.
"""
from __future__ import annotations

import argparse
from typing import List, Optional, Sequence

from .methods import byte_floor, peft_style_loop  # noqa: F401  (re-exported for old imports)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--prefill-repeats", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    forwarded: List[str] = ["layer", "--preset", "foundation", "--device", "cpu"]
    if args.dtypes:
        forwarded += ["--dtype", *args.dtypes]
    if args.repeats is not None:
        forwarded += ["--repeats", str(args.repeats)]
    if args.prefill_repeats is not None:
        forwarded += ["--prefill-repeats", str(args.prefill_repeats)]
    if args.json:
        forwarded += ["--json", args.json]
    from .cli import main as cli_main
    return cli_main(forwarded)


if __name__ == "__main__":
    raise SystemExit(main())
