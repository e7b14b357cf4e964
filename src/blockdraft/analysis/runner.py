"""Run a Decoder on benchmark questions and analyse its block drafts (Kim et al. 2024, sections 4-5).

Oracle alignment (exact, mirrors blockdraft.engine): the step that begins with t answer tokens
committed (t = 0..T-1 of the final greedy answer `out`) has the pending token out[t-1] (the last
prompt token when t = 0) and verifies a draft drafted by the heads on the hidden state whose
next-token logits gave out[t-1], i.e. at sequence index len(prompt) + t - 2; draft position i is a
guess for out[t + i - 1]. The first step (t = 0) has no draft. The greedy answer does not depend on
the drafts, so ONE teacher-forced forward over prompt + answer yields the lattice of every t, and
the oracle walk over those rows (analysis.metrics.oracle_walk) is exact: with k = 1 it reproduces
chain BPD's block efficiency step for step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..bench.datasets import MT_BENCH, domain_of, group_of
from ..errors import BlockdraftError
from ..heads import following_ids
from ..methods import MethodSpec
from .metrics import (accepted_length, draft_targets, h_max, head_entropy_summary, oracle_bound_steps, oracle_walk,
                      pearson_r, repetition_of_drafts, run_lengths, topk_accuracy, topk_hits)

FIELDS = {
    "config": "method, model, heads, num_heads (K), topks, ks (1 + topks), max_new_tokens, questions analysed",
    "categories": "per fine Spec-Bench category: a summary (below); `groups` and `overall` hold the same summary",
    "groups": "summaries of category groups present (mt_bench = writing, roleplay, reasoning, math, coding, "
              "extraction, stem, humanities)",
    "overall": "summary over every question",
    "summary.questions / new_tokens / steps": "questions, answer tokens and target calls (prefill excluded) of the run",
    "summary.block_efficiency": "actual block efficiency of the run: new_tokens / steps (the method's own)",
    "summary.repetition": "method's first draft of every step: consec_pct = % of adjacent draft-token pairs that "
                          "are identical (paper '% consec'), max_run_mean = mean longest run of one token per draft",
    "summary.entropy": "per draft head (index 0 = head 1, which guesses the token after the pending one): mean, "
                       "std and quantiles (q10..q90) of the entropy (nats) of the verified lattices, over steps",
    "summary.h_max": "1-based last draft head up to which mean entropy rises strictly (1: it falls at once)",
    "summary.accuracy": "top{k}: per draft head, share of verified steps whose head top-k holds the token "
                        "actually produced (steps where the answer ended before that position are left out)",
    "summary.oracle_be": "{k: block efficiency of a perfect per-step selector from each head's top-k}: the walk "
                         "accepts the leading draft positions whose top-k holds the greedy token; k = 1 is chain "
                         "BPD (equals block_efficiency for method bpd)",
    "summary.oracle_headroom": "{k: (oracle_be[k] - block_efficiency) / block_efficiency}",
    "summary.oracle_bound_be": "{k: the best block efficiency ANY top-k selection reaches (it may also stop early); "
                               "an upper bound, non-decreasing in k, unlike oracle_be}",
    "summary.teacher_forced_agreement": "share of verified steps whose recorded lattice top-1 equals the "
                                        "teacher-forced heads' (1.0 unless numerics differ, e.g. in bfloat16, or "
                                        "the method's drafter is not the plain heads)",
    "summary.examples": "(fine categories) drafts of a few steps: tokens, accepted (leading tokens equal to the "
                        "answer), the tokens committed",
    "correlation": "Pearson r between h_max and block_efficiency across fine categories (paper: 0.77)",
    "questions": "per question: id, category, new_tokens, steps, block_efficiency, oracle_be, stop_reason",
    "figures": "PNG files written next to analysis.json",
}


@dataclass
class _Run:
    """Raw per-question arrays; summaries pool these across questions."""

    qid: object
    category: str
    out: list[int]
    steps: int
    stop_reason: str
    drafts: list[list[int]] = field(default_factory=list)  # the method's first draft, steps that had one
    draft_starts: list[int] = field(default_factory=list)  # answer tokens committed before each of those steps
    entropy: np.ndarray | None = None  # [S, K] verified lattices that carry entropy
    lattice: np.ndarray | None = None  # [S, K, k] verified lattices
    targets: np.ndarray | None = None  # [S, K] the answer tokens they should have guessed (-1: none)
    oracle_steps: dict[int, int] = field(default_factory=dict)  # k -> steps of the greedy oracle walk
    bound_steps: dict[int, int] = field(default_factory=dict)  # k -> fewest steps any top-k selection needs
    agree: tuple[int, int] = (0, 0)  # recorded top-1 rows equal to the teacher-forced ones, rows compared


def parse_topks(text: str) -> tuple[int, ...]:
    """'2,4,8,16' -> (2, 4, 8, 16); anything else is a one-line error."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise BlockdraftError(f"--topk must be comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise BlockdraftError(f"--topk must be comma-separated positive integers, got {text!r}")
    return values


@torch.inference_mode()
def teacher_forced_topk(decoder, prompt: list[int], out: list[int], k: int, chunk: int = 64) -> np.ndarray:
    """Each draft head's top-k for the steps beginning at t = 1..T-1: [T-1, K, k] (row t-1 is step t).

    One forward of the target over prompt + answer; heads run in chunks of positions because each
    position needs K x V logits.
    """
    heads, target = decoder.require_heads(), decoder.target
    if len(out) < 2:
        return np.zeros((0, heads.num_heads, k), dtype=np.int64)
    seq = torch.tensor([prompt + out[:-2]], device=target.device)  # the last hidden needed: index P + T - 3
    hidden = target.body(input_ids=seq, use_cache=False).last_hidden_state[0, len(prompt) - 1:]  # [T-1, H]
    before = following_ids(prompt + out, len(prompt) - 1, hidden.shape[0], heads.num_heads)  # chained heads' inputs
    rows = []
    for part, part_before in zip(hidden.split(chunk), before.split(chunk)):
        logits = heads.logits(part, target.lm_head, part_before).float()  # [C, K, V], as HeadsDrafter.propose
        rows.append(torch.log_softmax(logits, dim=-1).topk(k, dim=-1).indices.cpu())  # [C, K, k]
    return torch.cat(rows).numpy()


def oracle_match(topk_tokens: np.ndarray, out: Sequence[int], k: int) -> np.ndarray:
    """[T, K] bool for oracle_walk: row t says which draft positions of step t have the truth in top-k.

    topk_tokens [T-1, K, k'] from teacher_forced_topk; row 0 (the first step) has no draft.
    """
    num_heads = topk_tokens.shape[1]
    match = np.zeros((len(out), num_heads), dtype=bool)  # [T, K]
    if len(out) > 1:
        match[1:] = topk_hits(topk_tokens, draft_targets(out, range(1, len(out)), num_heads), k)
    return match


def _run_question(decoder, question: dict, ks: tuple[int, ...], max_new_tokens: int, method: MethodSpec) -> _Run:
    """Decode one question's first turn with recording on, then add the teacher-forced oracle."""
    qid = question.get("question_id")
    prompt = decoder.encode(question["turns"][0])
    try:
        result = decoder.generate(ids=prompt, method=method, record=True, max_new_tokens=max_new_tokens,
                                  domain=domain_of(question["category"]))  # per-domain tuned refiners
    except BlockdraftError as exc:
        raise BlockdraftError(f"question {qid!r}: {exc}") from None
    out, num_heads = result.ids, decoder.require_heads().num_heads
    starts = np.cumsum([0] + [s.committed for s in result.stats])[:-1].tolist()  # committed before each step
    run = _Run(qid=qid, category=question["category"], out=out, steps=result.steps, stop_reason=result.stop_reason)
    for start, stat in zip(starts, result.stats):
        if stat.draft:
            run.drafts.append(list(stat.draft))
            run.draft_starts.append(start)
    verified = [(o, s.lattice) for o, s in zip(starts, result.stats) if s.lattice is not None]
    depth = verified[0][1].depth if verified else num_heads
    width = verified[0][1].tokens.shape[1] if verified else max(ks)
    run.lattice = np.stack([lat.tokens.numpy() for _, lat in verified]) if verified \
        else np.zeros((0, depth, width), dtype=np.int64)  # [S, K, k]
    run.targets = draft_targets(out, [o for o, _ in verified], depth)  # [S, K]
    with_entropy = [lat.entropy.numpy() for _, lat in verified if lat.entropy is not None]
    run.entropy = np.stack(with_entropy) if with_entropy else np.zeros((0, depth))  # [S, K]
    tokens = teacher_forced_topk(decoder, prompt, out, max(ks))  # [T-1, K, kmax]
    for k in ks:
        match = oracle_match(tokens, out, k)
        run.oracle_steps[k] = len(oracle_walk(match))
        run.bound_steps[k] = oracle_bound_steps(match, can_stop_early=k > 1)
    if verified:
        forced = tokens[[o - 1 for o, _ in verified], :depth, 0]  # [S, K] teacher-forced top-1 at the same steps
        run.agree = (int((forced == run.lattice[:, :, 0]).all(1).sum()), len(verified))
    return run


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate along steps; questions without rows are left out (their placeholder shape may differ)."""
    full = [a for a in arrays if len(a)]
    return np.concatenate(full) if full else arrays[0]


def _summarise(runs: list[_Run], ks: tuple[int, ...]) -> dict:
    """Pool the runs of a category (or group, or all) into the documented summary."""
    new = sum(len(r.out) for r in runs)
    steps = sum(r.steps for r in runs)
    actual = new / steps if steps else math.nan
    entropy = head_entropy_summary(_stack([r.entropy for r in runs]))  # over [S, K]
    lattice = _stack([r.lattice for r in runs])  # [S, K, k]
    targets = _stack([r.targets for r in runs])  # [S, K]
    oracle = {k: new / sum(r.oracle_steps[k] for r in runs) for k in ks}
    agree = [sum(r.agree[i] for r in runs) for i in (0, 1)]
    return {
        "questions": len(runs), "new_tokens": new, "steps": steps, "block_efficiency": actual,
        "repetition": repetition_of_drafts([d for r in runs for d in r.drafts]),
        "entropy": entropy,
        "h_max": None if any(math.isnan(v) for v in entropy["mean"]) else h_max(entropy["mean"]),
        "accuracy": {f"top{k}": topk_accuracy(lattice, targets, k) for k in ks if k <= lattice.shape[-1]},
        "oracle_be": {str(k): v for k, v in oracle.items()},
        "oracle_headroom": {str(k): (v - actual) / actual for k, v in oracle.items()},
        "oracle_bound_be": {str(k): new / sum(r.bound_steps[k] for r in runs) for k in ks},
        "teacher_forced_agreement": agree[0] / agree[1] if agree[1] else math.nan,
    }


def _examples(runs: list[_Run], tokenizer, count: int) -> list[dict]:
    """A few drafts like the paper's Table 2: the most repetitive ones, then the best accepted one."""
    cands = []
    for r in runs:
        for draft, start in zip(r.drafts, r.draft_starts):
            target = draft_targets(r.out, [start], len(draft))[0]  # [K]
            cands.append((max(run_lengths(draft)), accepted_length(np.asarray(draft) == target), r, draft, start))
    picked = sorted(cands, key=lambda c: -c[0])[: max(count - 1, 0)]
    rest = [c for c in cands if all(c is not p for p in picked)]
    picked += sorted(rest, key=lambda c: -c[1])[:1] if count else []
    show = lambda ids: [tokenizer.decode([t]) for t in ids]  # noqa: E731
    return [{"question_id": r.qid, "committed_before": start, "draft": draft, "draft_pieces": show(draft),
             "accepted": acc, "max_run": run, "committed": show(r.out[start:start + acc + 1])}
            for run, acc, r, draft, start in picked]


def _clean(value):
    """JSON-safe: numpy scalars to Python, NaN to null."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _check(decoder, questions: list[dict], topks: Sequence[int], max_new_tokens: int) -> tuple[int, ...]:
    if not questions:
        raise BlockdraftError("no questions to analyse")
    bad = next((q for q in questions if not isinstance(q, dict) or not isinstance(q.get("category"), str)
                or not q.get("turns")), None)
    if bad is not None:
        raise BlockdraftError(f"each question needs 'category' and 'turns' (Spec-Bench format); got {str(bad)[:120]}")
    vocab = decoder.require_heads().config.vocab_size
    if not topks or any(not isinstance(k, int) or k < 1 or k > vocab for k in topks):
        raise BlockdraftError(f"topks must be integers in 1..{vocab}, got {list(topks)}")
    if max_new_tokens < 1:
        raise BlockdraftError(f"max_new_tokens must be positive, got {max_new_tokens}")
    return tuple(sorted({1, *topks}))


def analyze(decoder, questions: list[dict], topks: Sequence[int] = (2, 4, 8, 16), max_new_tokens: int = 128,
            out_dir: str | Path | None = None, method: str = "bpd-full", examples: int = 3, progress: bool = True) -> dict:
    """Repetition, head entropy, h_max, head accuracy, actual and oracle top-k block efficiency.

    questions: Spec-Bench records ({"question_id", "category", "turns"}; the first turn is asked).
    Returns the analysis.json dict; with out_dir also writes analysis.json, analysis.md and PNG figures.
    """
    from tqdm import tqdm

    ks = _check(decoder, questions, topks, max_new_tokens)
    spec = decoder.spec(method)
    if spec.drafter != "none" and spec.refiner == "argmax":  # the same drafts, with every k of the lattice recorded
        spec = dataclasses.replace(spec, topk=max(spec.topk, max(ks)))
    runs = [_run_question(decoder, q, ks, max_new_tokens, spec)
            for q in tqdm(questions, desc=f"analyze {method}", unit="q", disable=not progress)]
    by_cat: dict[str, list[_Run]] = {}
    for r in runs:
        by_cat.setdefault(r.category, []).append(r)
    categories = {c: {**_summarise(rs, ks), "examples": _examples(rs, decoder.tokenizer, examples)}
                  for c, rs in by_cat.items()}
    groups = {g: _summarise([r for r in runs if group_of(r.category) == g], ks)
              for g in sorted({group_of(c) for c in by_cat} - set(by_cat))}
    paired = [(c, s["h_max"], s["block_efficiency"]) for c, s in categories.items() if s["h_max"] is not None]
    report = {
        "fields": FIELDS,
        "config": {"method": method, "model": decoder.loaded.label, "heads": decoder.heads_path,
                   "num_heads": decoder.require_heads().num_heads, "topks": list(topks), "ks": list(ks),
                   "max_new_tokens": max_new_tokens, "questions": len(runs), "mt_bench_categories": list(MT_BENCH)},
        "categories": categories, "groups": groups, "overall": _summarise(runs, ks),
        "correlation": {"h_max_vs_block_efficiency": {
            "r": pearson_r([p[1] for p in paired], [p[2] for p in paired]),
            "categories": [p[0] for p in paired], "h_max": [p[1] for p in paired],
            "block_efficiency": [p[2] for p in paired]}},
        "questions": [{"question_id": r.qid, "category": r.category, "new_tokens": len(r.out), "steps": r.steps,
                       "block_efficiency": len(r.out) / r.steps,
                       "oracle_be": {str(k): len(r.out) / n for k, n in r.oracle_steps.items()},
                       "stop_reason": r.stop_reason} for r in runs],
        "figures": {},
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        report["figures"] = _write_figures(_clean(report), out_dir)
    report = _clean(report)
    if out_dir is not None:
        (out_dir / "analysis.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        (out_dir / "analysis.md").write_text(_markdown(report), encoding="utf-8")
    return report


# ---------------------------------------------------------------- report files


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:+.0f}%"


def _rows(report: dict) -> list[tuple[str, dict]]:
    """(name, summary) for every fine category, then the groups and the overall line."""
    return [*report["categories"].items(), *report["groups"].items(), ("overall", report["overall"])]


def _piece(text: str) -> str:
    """A token as visible markdown: whitespace shown, table pipes escaped."""
    return (text.replace("\n", "\u23ce").replace(" ", "\u2423").replace("|", "\\|").replace("*", "\\*")
            .replace("~", "\\~")) or "\u2205"


def _markdown(report: dict) -> str:
    cfg, ks = report["config"], report["config"]["ks"]
    lines = [f"# Block-draft analysis: {cfg['method']} on {cfg['model']}", "",
             f"{cfg['questions']} questions (first turn), {cfg['max_new_tokens']} new tokens at most, "
             f"{cfg['num_heads']} draft heads; heads: {cfg['heads']}. Field meanings: `fields` in analysis.json.", "",
             "## Block efficiency, oracle top-k and repetition", "",
             "| category | questions | BE | " + " | ".join(f"oracle k={k}" for k in ks)
             + f" | headroom k={ks[-1]} | bound k={ks[-1]} | % consec | max run | h_max |",
             "|---" * (len(ks) + 8) + "|"]
    for name, s in _rows(report):
        lines.append(f"| {name} | {s['questions']} | {_fmt(s['block_efficiency'])} | "
                     + " | ".join(_fmt(s["oracle_be"][str(k)]) for k in ks)
                     + f" | {_pct(s['oracle_headroom'][str(ks[-1])])}"
                     f" | {_fmt(s['oracle_bound_be'][str(ks[-1])])} | {_fmt(s['repetition']['consec_pct'], 1)}"
                     f" | {_fmt(s['repetition']['max_run_mean'])} | {_fmt(s['h_max'])} |")
    corr = report["correlation"]["h_max_vs_block_efficiency"]
    lines += ["", f"Pearson R(h_max, block efficiency) across {len(corr['categories'])} categories: "
              f"{_fmt(corr['r'])} (paper: 0.77).", "", "## Per-head entropy (mean, nats) and accuracy", "",
              "| category | " + " | ".join(f"head {j + 1}" for j in range(cfg["num_heads"])) + " |",
              "|---" * (cfg["num_heads"] + 1) + "|"]
    for name, s in _rows(report):
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in s["entropy"]["mean"]) + " |")
    for name, s in [("overall", report["overall"])]:
        for key, acc in s["accuracy"].items():
            lines.append(f"| {name} {key} acc | " + " | ".join(_fmt(v) for v in acc) + " |")
    lines += ["", "## Example drafts", "", "**accepted**, ~~rejected~~ (\u2423 space, \u23ce newline)", ""]
    for name, s in report["categories"].items():
        for ex in s.get("examples", []):
            shown = [f"**{_piece(p)}**" if i < ex["accepted"] else f"~~{_piece(p)}~~"
                     for i, p in enumerate(ex["draft_pieces"])]
            lines.append(f"- {name} q{ex['question_id']}, answer token {ex['committed_before']}: {' '.join(shown)}"
                         f" \u2192 committed {' '.join(_piece(p) for p in ex['committed'])}")
    lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in report["figures"].items()]
    return "\n".join(lines) + "\n"


def _write_figures(report: dict, out_dir: Path) -> dict[str, str]:
    """Paper Fig. 2a (entropy per head), 2b (h_max vs BE), 5 (oracle BE vs k), repetition bars."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state (renders with Agg)
    except ImportError:
        print("[blockdraft] matplotlib is not installed: figures skipped (pip install 'blockdraft[plots]')",
              file=sys.stderr)
        return {}

    cats, overall, ks = report["categories"], report["overall"], report["config"]["ks"]
    heads = np.arange(1, report["config"]["num_heads"] + 1)
    files = {}

    def save(fig: Figure, name: str, key: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        files[key] = name

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, s in cats.items():
        ax.plot(heads, [math.nan if v is None else v for v in s["entropy"]["mean"]], marker="o", label=name)
    q = overall["entropy"]["quantiles"]
    if q["q25"][0] is not None:
        ax.fill_between(heads, q["q25"], q["q75"], color="grey", alpha=0.2, label="overall q25-q75")
    ax.set(xlabel="draft head", ylabel="mean entropy (nats)", title="Head entropy per category", xticks=heads)
    ax.legend(fontsize=7)
    save(fig, "entropy_per_head.png", "entropy_per_head")

    corr = report["correlation"]["h_max_vs_block_efficiency"]
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    ax.scatter(corr["h_max"], corr["block_efficiency"])
    for name, x, y in zip(corr["categories"], corr["h_max"], corr["block_efficiency"]):
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="h_max", ylabel="block efficiency", title=f"h_max vs block efficiency (R = {_fmt(corr['r'])})")
    save(fig, "hmax_vs_block_efficiency.png", "hmax_vs_block_efficiency")

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, s in [*cats.items(), ("overall", overall)]:
        ax.plot(ks, [s["oracle_be"][str(k)] for k in ks], marker="o", label=name, ls="--" if name == "overall" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="k (candidates per head)", ylabel="oracle block efficiency", title="Oracle top-k block efficiency")
    ax.legend(fontsize=7)
    save(fig, "oracle_vs_k.png", "oracle_vs_k")

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    names = [*cats, "overall"]
    ax.bar(names, [(cats.get(n, overall)["repetition"]["consec_pct"] or 0.0) for n in names])
    ax.set(ylabel="% consecutive repeats", title=f"Repetition in {report['config']['method']} drafts")
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    save(fig, "repetition.png", "repetition")
    return files
