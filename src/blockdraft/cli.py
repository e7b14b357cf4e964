"""Command line: thin commands that build a config, call the library and print the result."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from .errors import BlockdraftError
from . import sampling as sampling_args
from .config_args import add_config_arguments, config_from_arguments
from .models import DEFAULT_MODEL, DTYPE_CHOICES, QUANTIZED
from .outdir import FolderLock, check_free


def _model_args(p: argparse.ArgumentParser, dtype: str = "float32", decodes: bool | None = None) -> None:
    """--model, --dtype (default `dtype`: "auto" where the command decodes or distils, float32
    where it trains), --device and --offline. `decodes` (default: dtype is "auto") offers the
    4-bit weights that only decoding runs."""
    decodes = dtype == "auto" if decodes is None else decodes
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF model id, local directory or alias (default: %(default)s)")
    auto = "auto: bfloat16 on a CPU with native bfloat16 (AVX-512 BF16/AMX), float32 elsewhere"
    if decodes:  # 4-bit weights too
        auto = ("auto: on a CPU with native bfloat16 (AVX-512 BF16/AMX) int4 for a 4-bit GGUF's weights (the "
                "default model) and bfloat16 for others, float32 elsewhere; int4: 4-bit decoder weights, "
                "bfloat16 products (CPU)")
    choices = DTYPE_CHOICES if decodes else tuple(c for c in DTYPE_CHOICES if c not in QUANTIZED)
    p.add_argument("--dtype", default=dtype, help=f"{', '.join(choices)} (default: {dtype}; {auto})")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--offline", action="store_true", default=None,
                   help="never contact the Hugging Face hub (also on when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)")


def _load(args):
    """The model of a command that trains or writes data: full-precision weights only."""
    from .models import load_model

    if args.dtype in QUANTIZED:
        raise BlockdraftError(f"--dtype {args.dtype} is for decoding (generate, serve, bench, analyze, calibrate); "
                              "this command needs float32 or bfloat16 weights")
    return load_model(args.model, args.dtype, args.device, args.offline)


def _decoder(args):
    """The Decoder of a command with --model, --heads, --dtype, --device and --offline."""
    import blockdraft
    return blockdraft.load(args.model, heads=args.heads or "default", dtype=args.dtype, device=args.device,
                           offline=args.offline, eagle=getattr(args, "eagle", None))


def cmd_generate(args) -> None:
    from .methods import parse
    from .prompting import check_text, stop_strings

    parse(args.method)  # checked before the model loads: a bad request costs nothing
    sampling = sampling_args.from_arguments(args)
    if args.prompt == "-":  # the prompt from standard input (a file, a pipe, a here-document)
        stdin = getattr(sys.stdin, "buffer", None)  # bytes, so an undecodable byte is reported, not raised
        args.prompt = stdin.read().decode("utf-8", "surrogateescape") if stdin is not None else sys.stdin.read()
    if not args.prompt.strip():
        raise BlockdraftError("empty prompt: give some text to continue")
    check_text("the prompt", args.prompt)  # the API's checks, made before the model loads
    stops = stop_strings(args.stop or ())
    if args.system is not None and args.raw:
        raise BlockdraftError("--system needs the chat template: drop --raw")
    if args.max_new_tokens <= 0:
        raise BlockdraftError(f"max_new_tokens must be positive, got {args.max_new_tokens}")
    dec = _decoder(args)
    stream = None if args.json else (lambda text: print(text, end="", flush=True))
    result = dec.generate(args.prompt, method=args.method, max_new_tokens=args.max_new_tokens, raw=args.raw,
                          stop=stops, system=args.system, on_text=stream, **dataclasses.asdict(sampling))
    summary = {"text": result.text, "method": args.method, "resolved_method": dec.spec(args.method).name, "model": dec.loaded.label, "dtype": dec.loaded.dtype_name, "heads": dec.heads_path,
               "new_tokens": result.new_tokens, "steps": result.steps,
               "block_efficiency": round(result.block_efficiency, 4), "seconds": round(result.seconds, 4),
               "tokens_per_s": round(result.new_tokens / result.seconds, 2) if result.seconds else 0.0,
               "prefill_seconds": round(result.prefill_s, 4), "stop_reason": result.stop_reason,
               "temperature": sampling.temperature, "seed": result.seed}
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        print(f"\n\n[{args.method}] {summary['new_tokens']} tokens in {summary['steps']} steps "
              f"(block efficiency {summary['block_efficiency']:.2f}), {summary['seconds']:.2f} s, "
              f"{summary['tokens_per_s']:.1f} tokens/s, stop: {summary['stop_reason']}"
              + (f", seed {result.seed}" if result.seed is not None else ""), file=sys.stderr)


def cmd_calibrate(args) -> None:
    """Measure this machine's forward-cost curve again (what sized drafts, e.g. `fast`, are fitted to)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    curve = _decoder(args).cost_curve(remeasure=True)
    print(json.dumps({"tokens": curve.tokens, "ms": [round(1000 * s, 2) for s in curve.seconds],
                      "spread": round(curve.spread, 3), "threads": torch.get_num_threads()}))


def cmd_prompts(args) -> None:
    from pathlib import Path
    from .data.train_prompts import build_training_prompts, long_first, source_summary, write_jsonl
    if args.long_first < 0:
        raise BlockdraftError(f"--long-first must be 0 or more characters, got {args.long_first}")
    rows = build_training_prompts(Path(args.source), seed=args.seed, include_noncommercial=not args.commercial_only)
    if args.long_first:
        rows = long_first(rows, args.long_first)
    write_jsonl(rows, Path(args.out))
    print(json.dumps(source_summary(rows)["domains"]), f"-> {args.out} ({len(rows)} prompts)")


def cmd_distill(args) -> None:
    from .train.distill import DistillConfig, check_prompts, distill
    cfg = config_from_arguments(DistillConfig, args)
    check_prompts(args.prompts)
    path = distill(_load(args), args.prompts, args.out, cfg)
    print(f"distillation data in {path}" + (f", packed into {args.corpus}" if args.corpus else ""))


def cmd_corpus(args) -> None:
    from .corpus import Corpus
    from .train.distill import pack_distilled

    if args.action == "add":
        if not args.source:
            raise BlockdraftError("corpus add needs --from DIR (a folder written by `blockdraft distill`)")
        entry = pack_distilled(args.source, args.corpus, _licences(args.prompts) if args.prompts else {})
        print(f"{args.corpus}: " + (f"added {entry['file']} ({entry['records']} records, {entry['answer_tokens']} answer tokens)"
                                     if entry else "nothing new to add"))
    print(json.dumps(Corpus.open(args.corpus).summary(), indent=1))


def _licences(prompts_file: str) -> dict[str, str]:
    """Source -> licence, as the training-prompt file states them."""
    from .jsonl import read_jsonl
    return {rec["source"]: rec["license"] for _, rec in read_jsonl(prompts_file, on_error="skip")
            if isinstance(rec.get("source"), str) and isinstance(rec.get("license"), str)}


def cmd_draft_vocab(args) -> None:
    from .train.heads import add_draft_vocab

    coverage = add_draft_vocab(args.heads, args.data, args.size)
    print(f"{args.heads}: drafts from the {args.size} most frequent answer tokens ({coverage:.1%} of them)")


def cmd_train_heads(args) -> None:
    from .train.heads import HeadsTrainConfig, train_heads
    cfg = config_from_arguments(HeadsTrainConfig, args)
    _, report = train_heads(_load(args), args.data, args.out, cfg, resume=args.resume)
    print("held-out accuracy per draft head (head j predicts the token j+1 after the hidden state):")
    for j, (a1, a5) in enumerate(zip(report["top1"], report["top5"]), start=1):
        print(f"  head {j}: top-1 {a1:.3f}  top-5 {a5:.3f}")
    print(f"  a greedy chain keeps {report['chain_accept']:.3f} draft tokens per step (block efficiency ~{1 + report['chain_accept']:.2f})")
    print(f"heads saved to {args.out}")


def cmd_train_eagle(args) -> None:
    from .train.eagle import EagleTrainConfig, chain_acceptance, train_eagle

    cfg = config_from_arguments(EagleTrainConfig, args)
    check_free(args.out)  # a folder holding anything is refused before the model loads (--init may not be --out)
    with FolderLock(args.out):
        info = train_eagle(_load(args), args.corpus, args.out, cfg, init=args.init)
    top1 = info["heldout_top1_by_step"]
    print(f"eagle drafter saved to {args.out}: held-out top-1 by drafted token {top1} "
          f"(~{chain_acceptance(top1):.2f} tokens kept per chain), {info['epochs']} epochs in {info['seconds']:.0f} s")


def cmd_export(args) -> None:
    from pathlib import Path

    from .export import export_eagle3, export_medusa, exported_eagle
    from .models import ALIASES

    if args.format != "eagle3" and args.feature_norm != "as-trained":
        raise BlockdraftError(f"--feature-norm applies to the eagle3 format, not {args.format}")
    check_free(args.out)  # nothing is overwritten: a folder holding anything is refused before the model loads
    dec = _decoder(args)
    model = dec.loaded.model
    with FolderLock(args.out):
        if args.format == "eagle3":
            verifier = ALIASES[dec.loaded.alias].upstream if dec.loaded.alias in ALIASES else dec.loaded.name
            export_eagle3(exported_eagle(dec, args.feature_norm), model, Path(args.out), verifier)
        else:
            export_medusa(dec.require_heads(), model, Path(args.out))
    print(f"{args.format} checkpoint written to {args.out}")


def cmd_train_rescorer(args) -> None:
    from .train.rescorer import RescorerTrainConfig, train_rescorer
    cfg = config_from_arguments(RescorerTrainConfig, args)
    info = train_rescorer(_load(args), args.data, args.out, cfg)
    print(f"rescorer saved to {args.out} (held-out loss {info['training']['heldout_loss']})")


def cmd_analyze(args) -> None:
    from .analysis.runner import analyze, parse_topks
    from .bench.datasets import DEFAULT_PROMPTS, load_questions
    from .methods import parse

    parse(args.method)
    prompts = args.prompts or (DEFAULT_PROMPTS if DEFAULT_PROMPTS.exists() else None)
    if prompts is None:
        raise BlockdraftError("no shipped questions found: pass --prompts FILE.jsonl (Spec-Bench format)")
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    questions = load_questions(prompts, categories, args.per_category)
    topks = parse_topks(args.topk)
    check_free(args.out)  # a folder holding anything is refused before the model loads
    dec = _decoder(args)
    with FolderLock(args.out):
        report = analyze(dec, questions, topks=topks, max_new_tokens=args.max_new_tokens, out_dir=args.out,
                         method=args.method)
    s, k = report["overall"], str(max(topks))
    print(f"[{args.method}] {len(questions)} questions: block efficiency {s['block_efficiency']:.2f}, "
          f"oracle top-{k} {s['oracle_be'][k]:.2f}, {s['repetition']['consec_pct'] or 0:.1f}% consecutive "
          f"repeats, h_max {s['h_max']}; report in {args.out}/analysis.md", file=sys.stderr)


def cmd_train_ngram(args) -> None:
    from .train.ngram import train_ngram_on_distill
    lm = train_ngram_on_distill(args.data, args.order, tuple(int(x) for x in args.prune.split(",")) if args.prune else 0,
                                args.out, arpa=args.arpa)
    print(f"{args.order}-gram LM with {sum(lm.num_ngrams())} n-grams saved to {args.out}")


def cmd_tune(args) -> None:
    from .train.tune import heldout_records, tune_alpha
    dec = _decoder(args)
    dec.use_refiner_files(ngram=args.ngram, rescorer=args.rescorer)
    report = tune_alpha(dec, heldout_records(args.data, args.per_domain), args.kind)
    path = store_alpha(dec, args.kind, report)
    print(json.dumps(report["alpha"]), f"stored in {path}")


def store_alpha(dec, kind: str, report: dict):
    """Write the tuned alphas next to the refiner they belong to."""
    from pathlib import Path
    from .refine.ngram import NgramLM
    if kind == "neural":
        meta_path = Path(dec.rescorer_path) / "rescorer.json"
        meta = json.loads(meta_path.read_text())
        meta["alpha"], meta["tuning"] = report["alpha"], report
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        return meta_path
    lm = NgramLM.load(dec.ngram_path)
    lm.meta["alpha"], lm.meta["tuning"] = report["alpha"], report
    lm.save(dec.ngram_path)
    return dec.ngram_path


TIME_BUDGET = "time budget in seconds; the LR schedule shrinks to fit (0: none)"
DISTILL_HELP = {"max_new_tokens": "answer length cap per prompt", "max_prompt_tokens": "longer prompts are skipped",
                "batch_size": "rows generating at once; finished rows are replaced by waiting prompts (0: 96 on CPU, 384 on GPU)", "limit": "at most N new prompts this run (0: all)",
                "corpus": "also pack finished answers into this corpus folder (e.g. corpus/smollm2-135m)",
                "shard_records": "records per corpus shard"}
HEADS_HELP = {"num_heads": "K draft heads", "lr": "peak learning rate after warm-up",
              "batch_positions": "answer positions per optimiser step", "warmup": "share of steps spent warming up",
              "clip": "gradient-norm clip", "heldout": "share of sequences held out for accuracy",
              "max_tokens": "train on at most N positions (0: all)", "max_seconds": TIME_BUDGET,
              "draft_vocab": "draft only the N most frequent answer tokens: a 3x cheaper projection (0: all)",
              "chain": "chained heads: head j also reads the j tokens before its target (drafted one after another)",
              "init": "start from these trained heads (e.g. plain heads for --chain) instead of zeros"}

EAGLE_HELP = {"draft_vocab": "draft-vocabulary size (the most frequent answer tokens)",
              "unroll": "training-time-test steps: tokens drafted on the layer's own outputs while training",
              "max_records": "corpus answers to train on (spread over the corpus)",
              "max_tokens": "answers longer than this (prompt + answer) are left out", "max_seconds": TIME_BUDGET,
              "batch_tokens": "padded tokens per optimiser step", "heldout": "share of answers held out for accuracy"}


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit 2), like every other error of the CLI."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .train.distill import DistillConfig
    from .train.heads import HeadsTrainConfig
    from .train.eagle import EagleTrainConfig
    from .train.rescorer import RescorerTrainConfig

    parser = OneLineParser(prog="blockdraft", description="Lossless blockwise parallel decoding.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text, losslessly accelerated by block drafts (greedy or sampled)")
    _model_args(p, "auto")
    p.add_argument("--prompt", required=True, help="the user message (chat template applied unless --raw); - reads it from stdin")
    p.add_argument("--system", default=None, help="a system message, through the model's chat template")
    p.add_argument("--heads", default=None, help="draft heads folder (default: the shipped heads for the model)")
    p.add_argument("--method", default="fast", help="fast (default: heads + n-gram + context, sized to this machine), bpd (heads only), eagle (the eagle drafter's tree), ar (plain decoding), lookup, or a refined method")
    p.add_argument("--eagle", default=None, help="eagle drafter folder for the eagle methods (default: the shipped one for the model)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object with the text and statistics")
    sampling_args.add_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("calibrate", help="measure this machine's forward-cost curve again (sized drafts, e.g. fast)")
    _model_args(p, "auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=cmd_calibrate, heads=None)

    p = sub.add_parser("prompts", help="build the mixed training-prompt JSONL from the prompt corpora")
    p.add_argument("--source", required=True, help="folder of the prompt corpora (e.g. ../shared/data/train_prompts)")
    p.add_argument("--out", required=True, help="output JSONL (id, source, domain, license, turns)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commercial-only", action="store_true", help="drop non-commercial and unlicensed sources")
    p.add_argument("--long-first", type=int, default=0, metavar="CHARS",
                   help="put prompts whose first message has at least CHARS characters first (0: off)")
    p.set_defaults(func=cmd_prompts)

    p = sub.add_parser("distill", help="self-distillation data: the model's own greedy answers to prompts")
    _model_args(p, "auto", decodes=False)  # bfloat16 where native: ~1.85x float32's answers per second here
    p.add_argument("--prompts", required=True, help="JSONL with 'id' and 'turns' (see `blockdraft prompts`)")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    add_config_arguments(p, DistillConfig, help=DISTILL_HELP)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("corpus", help="the committed training corpus: add a distillation folder's answers, or show it")
    p.add_argument("action", choices=["add", "info"])
    p.add_argument("--corpus", required=True, help="corpus folder (e.g. corpus/smollm2-135m)")
    p.add_argument("--from", dest="source", help="distillation folder to pack (with add)")
    p.add_argument("--prompts", default=None, help="the training-prompt JSONL it was made from (for the licences)")
    p.set_defaults(func=cmd_corpus)

    p = sub.add_parser("train-heads", help="train draft heads on distillation data")
    _model_args(p)
    p.add_argument("--data", required=True, help="folder written by `blockdraft distill`")
    p.add_argument("--out", required=True, help="folder for the heads (safetensors + config.json)")
    add_config_arguments(p, HeadsTrainConfig, help=HEADS_HELP)
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.set_defaults(func=cmd_train_heads)

    p = sub.add_parser("draft-vocab", help="give trained heads a draft vocabulary from distillation data")
    p.add_argument("--heads", required=True, help="heads folder (rewritten in place)")
    p.add_argument("--data", required=True, help="folder written by `blockdraft distill`")
    p.add_argument("--size", type=int, default=16384)
    p.set_defaults(func=cmd_draft_vocab)

    p = sub.add_parser("train-eagle", help="train the eagle draft layer on the committed corpus (features recomputed, cached)")
    _model_args(p)
    p.add_argument("--corpus", default="corpus/smollm2-135m", help="corpus folder (default: %(default)s)")
    p.add_argument("--out", required=True, help="folder for the drafter (safetensors + config.json)")
    p.add_argument("--init", default=None, help="go on training this eagle drafter (its layers and draft vocabulary)")
    add_config_arguments(p, EagleTrainConfig, help=EAGLE_HELP)
    p.set_defaults(func=cmd_train_eagle)

    p = sub.add_parser("export", help="write a drafter in a serving engine's layout (vLLM, SGLang, llama.cpp)")
    _model_args(p)
    p.add_argument("--format", required=True, choices=["eagle3", "medusa"],
                   help="eagle3: the eagle drafter, speculators layout; medusa: plain BPD heads, vLLM's Medusa layout")
    p.add_argument("--out", required=True, help="new folder for the checkpoint (config.json + model.safetensors)")
    p.add_argument("--eagle", default=None, help="eagle drafter folder (default: the shipped one for the model)")
    p.add_argument("--heads", default=None, help="draft heads folder for medusa (default: the shipped heads)")
    p.add_argument("--feature-norm", choices=["as-trained", "one"], default="as-trained",
                   help="eagle3: 'one' merges the per-layer feature norms into one RMSNorm over all features "
                        "(norm_before_fc), the layout llama.cpp's converter reads (default: as trained)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train-rescorer", help="train the small causal LM used for local neural rescoring")
    _model_args(p)
    p.add_argument("--data", required=True, help="folder written by `blockdraft distill`")
    p.add_argument("--out", required=True, help="output folder")
    add_config_arguments(p, RescorerTrainConfig, help={"max_seconds": TIME_BUDGET})
    p.set_defaults(func=cmd_train_rescorer)

    p = sub.add_parser("train-ngram", help="train a token n-gram LM (modified Kneser-Ney) on distillation data")
    p.add_argument("--data", required=True, help="folder written by `blockdraft distill`")
    p.add_argument("--order", type=int, default=4)
    p.add_argument("--prune", default="2,2,3", help="minimum counts for orders 2..N, comma separated")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--arpa", default=None, help="also write an ARPA file (KenLM/SRILM interoperable)")
    p.set_defaults(func=cmd_train_ngram)

    p = sub.add_parser("tune", help="pick the rescoring weight alpha per domain on held-out distillation data")
    _model_args(p)
    p.add_argument("--data", required=True, help="folder written by `blockdraft distill` (the heads' held-out split is used)")
    p.add_argument("--kind", choices=["neural", "ngram"], required=True)
    p.add_argument("--heads", default=None)
    p.add_argument("--ngram", default=None, help="n-gram .npz (default: the shipped one)")
    p.add_argument("--rescorer", default=None, help="rescorer folder (default: the shipped one)")
    p.add_argument("--per-domain", type=int, default=4, help="held-out sequences per domain")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("analyze", help="draft analysis: repetition, head entropy, oracle top-k block efficiency")
    _model_args(p, "auto")
    p.add_argument("--prompts", default=None, help="Spec-Bench JSONL (default: the shipped question_dev.jsonl)")
    p.add_argument("--categories", default=None, help="comma-separated categories or groups (e.g. mt_bench,qa)")
    p.add_argument("--per-category", type=int, default=None, help="first N questions of each category")
    p.add_argument("--topk", default="2,4,8,16", help="candidates per head for the oracle (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--method", default="bpd-full", help="method whose drafts are analysed (default: %(default)s)")
    p.add_argument("--heads", default=None, help="draft heads folder (default: the shipped heads for the model)")
    p.add_argument("--out", required=True, help="folder for analysis.json, analysis.md and figures")
    p.set_defaults(func=cmd_analyze)

    from .bench import add_parser as add_bench_parser  # `blockdraft bench`: flags and command in bench/
    add_bench_parser(sub, lambda p: _model_args(p, "auto"))
    from .serve import add_parser as add_serve_parser  # `blockdraft serve`: flags and command in serve/
    add_serve_parser(sub, lambda p: _model_args(p, "auto"))
    return parser


def _version() -> str:
    """The installed distribution's version (the package's own when run from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__
    try:
        return version("blockdraft")
    except PackageNotFoundError:
        return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BlockdraftError as exc:
        print(f"blockdraft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blockdraft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
