"""Turning measured prompt-turns into results: results.json, results.md, plots, answer files.

Per method and category: block efficiency = new tokens / steps (base-model calls that commit
tokens), tokens/s, speed-up = sum of ar's seconds / sum of the method's seconds over the same
prompt-turns, and lossless rate = share of prompt-turns whose ids equal ar's (under sampling
too: every method samples ar's tokens with the same seed). Beside them,
Spec-Bench's own "#Mean accepted tokens" and speed-up as its evaluation/speed.py computes
them from the answer files (blockdraft.bench.specbench), for comparison with published tables.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING

from . import specbench
from .datasets import GROUPS, group_of

if TYPE_CHECKING:
    from .records import TurnRecord

BASELINE = "ar"


def _summary(rows: list["TurnRecord"], ar: dict | None) -> dict:
    """The metrics of one method over some prompt-turns (ar: the baseline's records by key)."""
    new, steps, seconds = sum(len(r.ids) for r in rows), sum(r.steps for r in rows), sum(r.seconds for r in rows)
    ours = all(r.accepted is not None for r in rows)
    base = [ar[(r.question_id, r.turn)] for r in rows] if ar is not None else None
    return {
        "prompts": len({r.question_id for r in rows}), "turns": len(rows),
        "new_tokens": new, "steps": steps, "seconds": seconds,
        "block_efficiency": new / steps if steps else None,
        "tokens_per_s": new / seconds if seconds else None,
        "speedup_vs_ar": sum(b.seconds for b in base) / seconds if base and seconds else None,
        "lossless_rate": fmean(r.ids == b.ids for r, b in zip(rows, base)) if base else None,
        "mean_accepted": fmean(a for r in rows for a in r.accepted) if ours and steps else None,
        "ttft_s": fmean(r.ttft_s for r in rows) if rows and all(r.ttft_s is not None for r in rows) else None,
        "forward_seconds": sum(r.forward_s for r in rows) if ours else None,
        "draft_seconds": sum(r.draft_s for r in rows) if ours else None,
    }


def _by_category(rows: list["TurnRecord"], ar: dict | None) -> dict:
    """Fine categories in order of appearance, then the groups (mt_bench) that occur."""
    keys = list(dict.fromkeys(r.category for r in rows))
    keys += [g for g in GROUPS if any(group_of(k) == g for k in keys)]
    return {k: _summary([r for r in rows if k in (r.category, group_of(r.category))], ar) for k in keys}


def _spec_bench(rows: list["TurnRecord"], base_rows: list["TurnRecord"] | None, count_tokens) -> dict:
    """Spec-Bench's speed.py metrics overall and per report column (its tasks)."""
    cols = ["overall"] + list(dict.fromkeys(group_of(r.category) for r in rows))
    pick = lambda rs, c: [r for r in rs if c == "overall" or group_of(r.category) == c]  # noqa: E731
    asked = {r.question_id for r in rows}
    base = [r for r in base_rows if r.question_id in asked] if base_rows is not None else None
    return {c: specbench.metrics(pick(rows, c), pick(base, c) if base is not None else None, count_tokens) for c in cols}


def build(records: list["TurnRecord"], methods: list[str], memory: dict, environment: dict, config: dict,
          count_tokens=None) -> dict:
    """The results dict written to results.json. count_tokens(text) -> len(tokenizer(text).input_ids)
    gives Spec-Bench's baseline token count (its speed-up is None without it)."""
    failed = [r for r in records if r.error]
    records = [r for r in records if not r.error]  # a peer's failed turns are listed, never averaged
    ar = {(r.question_id, r.turn): r for r in records if r.method == BASELINE} if BASELINE in methods else None
    spec_base = specbench.baseline(methods)
    base_rows = [r for r in records if r.method == spec_base] if spec_base else None
    per_method = {}
    for name in methods:
        rows = [r for r in records if r.method == name]
        per_method[name] = {"overall": _summary(rows, ar), "by_category": _by_category(rows, ar),
                            "spec_bench": _spec_bench(rows, base_rows, count_tokens),
                            "added_memory_mb": memory[name]["added_memory_mb"], "memory": memory[name],
                            "failed_turns": [{"question_id": r.question_id, "turn": r.turn, "error": r.error}
                                             for r in failed if r.method == name]}
    categories = {r.category: group_of(r.category) for r in records}
    return {"command": config.get("command"), "config": config, "environment": environment,
            "categories": categories, "spec_bench_baseline": spec_base, "methods": per_method}


def columns(results: dict) -> list[str]:
    """Report columns: overall, then each category with MT-bench's eight shown as mt_bench."""
    return ["overall"] + list(dict.fromkeys(results["categories"].values()))


def _cell(results: dict, method: str, column: str, key: str) -> float | None:
    entry = results["methods"][method]
    return (entry["overall"] if column == "overall" else entry["by_category"].get(column, {})).get(key)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _measured(cfg: dict) -> str:
    """"240", or "60 of 240 (stopped by --max-minutes ...)" for a run that has not measured every question."""
    asked = cfg.get("questions_asked", cfg["questions"])
    return str(asked) if cfg["questions"] == asked else \
        f"{cfg['questions']} of {asked} (stopped by --max-minutes; --resume measures the rest)"


def _peak(memory: dict) -> str:
    """The method's peak resident memory in a process of its own (bench.memory), or why not."""
    own = memory.get("own_process") or {}
    return _fmt(own.get("peak_rss_mb"), ".0f") if "error" not in own else f"– ({own['error']})"


def markdown(results: dict) -> str:
    """results.md: the command, the machine, and methods x categories tables."""
    env, cfg, methods, cols = results["environment"], results["config"], list(results["methods"]), columns(results)
    lines = ["# blockdraft bench", "", f"- command: `{results['command'] or 'run_bench (Python API)'}`",
             f"- model: {env.get('model_label', env['model'])} ({env['dtype']}), heads: {env['heads']}",
             f"- machine: {env['cpu']} ({env['cpu_count']} CPUs), device {env['device']}, "
             f"torch threads {env['torch_threads']}, python {env['python']}, "
             f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}",
             f"- {_measured(cfg)} questions, max {cfg['max_new_tokens']} new tokens, {cfg['order']}; {env['date']}"]
    if cfg.get("sampling"):
        sampling = cfg["sampling"]
        lines.append(f"- sampling: temperature {sampling['temperature']}, top-k {sampling['top_k']}, top-p "
                     f"{sampling['top_p']}, seed {sampling['seed']} for every turn (lossless: the ids equal ar's with that seed; "
                     "tests/test_sampling_engine.py checks the distribution)")
    lines += [f"- skipped {name}: {why}" for name, why in cfg["skipped"].items()]
    for m in methods:
        failed = results["methods"][m].get("failed_turns") or []
        if failed:
            lines.append(f"- {m} failed on {len(failed)} prompt-turn(s), left out of its figures "
                         f"(first: question {failed[0]['question_id']}, {failed[0]['error']})")
    overall = [[m, _fmt(_cell(results, m, "overall", "block_efficiency")), _fmt(_cell(results, m, "overall", "tokens_per_s"), ".1f"),
                _fmt(_cell(results, m, "overall", "speedup_vs_ar")), _fmt(_cell(results, m, "overall", "lossless_rate")),
                _fmt(_cell(results, m, "overall", "mean_accepted")), _fmt(results["methods"][m]["added_memory_mb"], ".3f"),
                _peak(results["methods"][m]["memory"])]
               for m in methods]
    lines += ["", "## Overall", ""]
    lines += _table(["method", "block efficiency", "tokens/s", "speed-up vs ar", "lossless vs ar", "mean accepted",
                     "added MB", "peak RSS MB (own process)"], overall)
    for title, key in (("Block efficiency (new tokens per base-model call)", "block_efficiency"),
                       ("Speed-up vs ar (wall clock)", "speedup_vs_ar"),
                       ("Time to first token, seconds (prefill + first step; our engine)", "ttft_s")):
        lines += ["", f"## {title}", ""]
        lines += _table(["method"] + cols, [[m] + [_fmt(_cell(results, m, c, key)) for c in cols] for m in methods])
    lines += _spec_bench_tables(results, methods, cols)
    return "\n".join(lines) + "\n"


def _spec_bench_tables(results: dict, methods: list[str], cols: list[str]) -> list[str]:
    """Spec-Bench's speed.py figures, per column (older results without them: nothing)."""
    if not all("spec_bench" in results["methods"][m] for m in methods):
        return []
    cell = lambda m, c, key: results["methods"][m]["spec_bench"].get(c, {}).get(key)  # noqa: E731
    lines = ["", "## As Spec-Bench's evaluation/speed.py computes them", "",
             "From the answer files: #Mean accepted tokens = tokens committed per decoding step, pooled over all "
             "steps (1.00 for plain decoding); speed-up = mean over answers of tokens/s, over the same mean for "
             f"`{results.get('spec_bench_baseline')}` (Spec-Bench's vanilla baseline is HF generate), whose tokens "
             "are counted by re-tokenising its text (len(input_ids) - 1 per turn).", ""]
    for title, key, spec in (("#Mean accepted tokens", "mean_accepted_tokens", ".2f"), ("Speed-up", "speedup", ".2f")):
        lines += ["", f"### {title}", ""]
        lines += _table(["method"] + cols, [[m] + [_fmt(cell(m, c, key), spec) for c in cols] for m in methods])
    return lines


def _bars(results: dict, key: str, ylabel: str, path: Path) -> None:
    """Grouped bars: one group per report column, one bar per method."""
    from matplotlib.figure import Figure

    cols, methods = columns(results), list(results["methods"])
    fig = Figure(figsize=(max(6, 1.2 * len(cols) * max(1, len(methods)) / 3), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        values = [_cell(results, m, c, key) or 0.0 for c in cols]
        ax.bar([i + (j - (len(methods) - 1) / 2) * width for i in range(len(cols))], values, width, label=m)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def _histograms(records: list["TurnRecord"], path: Path) -> bool:
    """Committed tokens per step, one panel per method of ours (those with per-step stats)."""
    from matplotlib.figure import Figure

    counts = {}
    for r in records:
        if r.accepted is not None and r.committed:
            counts.setdefault(r.method, []).extend(r.committed)
    if not counts:
        return False
    fig = Figure(figsize=(4 * len(counts), 3.2), layout="constrained")
    for ax, (method, values) in zip(fig.subplots(1, len(counts), squeeze=False)[0], counts.items()):
        ax.hist(values, bins=[b - 0.5 for b in range(1, max(values) + 2)], rwidth=0.85)
        ax.set_xticks(range(1, max(values) + 1))
        ax.set_title(f"{method} (mean {fmean(values):.2f})")
        ax.set_xlabel("tokens committed per step")
        ax.set_ylabel("steps")
    fig.savefig(path, dpi=120)
    return True


def plots(results: dict, records: list["TurnRecord"], out_dir: Path) -> list[Path]:
    """PNG plots; skipped with a warning when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("[blockdraft] bench: matplotlib is not installed, no plots (pip install 'blockdraft[plots]')",
              file=sys.stderr)
        return []
    written = [out_dir / "block_efficiency.png"]
    _bars(results, "block_efficiency", "block efficiency (tokens / base-model call)", written[0])
    if BASELINE in results["methods"]:
        written.append(out_dir / "speedup.png")
        _bars(results, "speedup_vs_ar", "speed-up vs ar (wall clock)", written[-1])
    if _histograms(records, out_dir / "committed_per_step.png"):
        written.append(out_dir / "committed_per_step.png")
    return written


def answers(results: dict, records: list["TurnRecord"], questions: list[dict], out_dir: Path) -> None:
    """answers/<method>.jsonl in the Spec-Bench answer format (evaluation/speed.py reads it)."""
    folder = out_dir / "answers"
    folder.mkdir(parents=True, exist_ok=True)
    turns: dict[tuple, list] = {}
    broken = {(r.method, r.question_id) for r in records if r.error}  # a peer failed on a turn: no answer
    for r in sorted(records, key=lambda r: r.turn):
        turns.setdefault((r.method, r.question_id), []).append(r)
    for method in results["methods"]:
        with (folder / f"{method}.jsonl").open("w", encoding="utf-8") as handle:
            for q in questions:
                if (method, q["question_id"]) in broken:
                    continue
                rows = turns[(method, q["question_id"])]
                choice = {"index": 0, "turns": [r.text for r in rows], "new_tokens": [len(r.ids) for r in rows],
                          "wall_time": [r.seconds for r in rows], "decoding_steps": [r.steps for r in rows],
                          "accept_lengths": [n for r in rows for n in (r.committed or [])]}
                handle.write(json.dumps({"question_id": q["question_id"], "category": q["category"],
                                         "answer_id": f"{method}-{q['question_id']}",
                                         "model_id": f"{results['environment']['model']}-{method}",
                                         "choices": [choice], "tstamp": time.time()}, ensure_ascii=False) + "\n")


def write(results: dict, records: list["TurnRecord"], questions: list[dict], out_dir: Path) -> None:
    """Everything under out_dir: results.json, results.md, the plots and the answer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "results.md").write_text(markdown(results), encoding="utf-8")
    plots(results, records, out_dir)
    answers(results, records, questions, out_dir)
