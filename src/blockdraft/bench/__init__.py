"""`blockdraft bench`: block efficiency, speed and losslessness of decoding methods on Spec-Bench.

    >>> from blockdraft.bench import load_questions, run_bench
    >>> results = run_bench(decoder, load_questions(limit=10), ["ar", "bpd", "hf-pld"], 128, "bench-out")

datasets.py reads the questions, runner.py runs and counts, report.py aggregates and writes;
this module holds the public names and the command line (registered by blockdraft.cli).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..sampling import add_arguments as add_sampling_arguments
from .datasets import DEFAULT_PROMPTS, MT_BENCH, load_questions
from .runner import RUNNERS, run_bench

__all__ = ["DEFAULT_PROMPTS", "MT_BENCH", "RUNNERS", "add_parser", "cmd_bench", "load_questions", "run_bench"]
DEFAULT_METHODS = "ar,bpd,fast,hf-greedy,hf-pld"


def _names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _command(args: argparse.Namespace) -> list[str]:
    """The full command line, defaults spelled out, so results.md says how to reproduce it."""
    flags = {k: v for k, v in vars(args).items()
             if k not in ("func", "command", "resume", "max_minutes", "offline", "no_peak_memory") and v is not None}
    return ["bench"] + [s for k, v in flags.items() for s in (f"--{k.replace('_', '-')}", str(v))]


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    import blockdraft
    from ..methods import parse
    from ..outdir import check_free
    from ..sampling import from_arguments
    from .store import OWN, RUN

    sampling = from_arguments(args)  # bad values fail before the model loads
    check_free(args.out, OWN, args.resume, marker=RUN)
    names = _names(args.methods) or []
    for name in names:  # a bad name fails before the model loads
        if name not in RUNNERS:
            parse(name)
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = load_questions(args.prompts, _names(args.categories), args.per_category, args.limit)
    dec = blockdraft.load(args.model, heads=args.heads or "default", dtype=args.dtype, device=args.device, eagle=args.eagle,
                          offline=args.offline)
    loaded_as = {"model": args.model, "heads": args.heads, "eagle": args.eagle, "dtype": args.dtype, "device": args.device}
    results = run_bench(dec, questions, names, args.max_new_tokens, args.out,
                        argv=_command(args), resume=args.resume, max_minutes=args.max_minutes, sampling=sampling,
                        own_process=None if args.no_peak_memory else loaded_as)
    for name, entry in results["methods"].items():
        o = entry["overall"]
        speedup = f"{o['speedup_vs_ar']:.2f}x" if o["speedup_vs_ar"] is not None else "-"
        lossless = f"{o['lossless_rate']:.2f}" if o["lossless_rate"] is not None else "-"
        be = f"{o['block_efficiency']:.2f}" if o["block_efficiency"] is not None else "-"
        print(f"{name:>16}: block efficiency {be}, {o['tokens_per_s']:.1f} tokens/s, speed-up {speedup}, "
              f"lossless {lossless}")
    print(f"results in {args.out}/results.md (and results.json, plots, answers/)", file=sys.stderr)


def add_parser(sub, model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `bench` subcommand (model_args adds --model, --dtype and --device like `generate`)."""
    p = sub.add_parser("bench", help="benchmark decoding methods on Spec-Bench-format prompts")
    model_args(p)
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS),
                   help="questions JSONL in the Spec-Bench / FastChat format (default: the bundled dev split)")
    p.add_argument("--categories", default=None, help="comma-separated categories or groups (mt_bench) to keep")
    p.add_argument("--per-category", type=int, default=None, help="first N questions of each category")
    p.add_argument("--limit", type=int, default=None, help="at most N questions in all")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated: {', '.join(['ar', 'bpd', *RUNNERS])} or any refined method")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--heads", default=None, help="draft heads folder (default: the shipped heads for the model)")
    p.add_argument("--eagle", default=None, help="eagle drafter folder for the eagle methods (default: the shipped one for the model)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, recorded)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (same command): keep its finished questions, measure the rest")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after the question that passes this budget and report what was measured")
    p.add_argument("--no-peak-memory", action="store_true",
                   help="skip measuring each method's peak memory in a process of its own after the run (~10 s a method)")
    add_sampling_arguments(p)  # under sampling every turn starts from --seed (default 0); peers are skipped
    p.set_defaults(func=cmd_bench)
