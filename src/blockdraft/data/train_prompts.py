"""Mixed, de-duplicated training prompts for draft-head self-distillation.

The heads are trained on the base model's own answers, so all we need from the corpora in
shared/data/train_prompts (layout, licences and known broken lines: its README.md) is the
user side: every item becomes the message(s) a chat user would send. The mix covers the
domains users ask about, and nothing of the benchmark may leak in: the README's
overlap_exclusions.json items are dropped, and so is any prompt that equals or shares a word
13-gram with a Spec-Bench question found next to the corpora.
"""
from __future__ import annotations

import csv
import gzip
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import BlockdraftError
from ..jsonl import read_jsonl

MAX_PROMPT_CHARS = 6000  # longer messages are skipped: cutting them would cut off the instruction
MAX_TURNS = 8  # later sharegpt turns are dropped so generated conversations stay in context
BENCH_NGRAM = 13  # word n-gram size of the benchmark overlap check (the README's scan used 13)
EN_SOURCE_EVERY = 4  # every 4th aligned translation pair is asked English -> X, the rest X -> English
DOMAINS = ("chat", "writing", "roleplay", "coding", "math", "qa", "summarization", "translation", "rag")


@dataclass(frozen=True)
class _Item:
    """One candidate prompt, before exclusion, de-duplication and sampling."""

    id: str  # "<source>/<file>:<0-based line or list index>", the index convention of the exclusions
    domain: str
    turns: tuple[str, ...]
    upstream_id: str | None = None  # the record's own id, where the file has one


Loader = Callable[[Path], Iterator[_Item]]


@dataclass(frozen=True)
class _Source:
    loader: Loader
    license: str
    commercial: bool  # False: non-commercial, research-only or unlicensed per the README


def _warn(message: str) -> None:
    print(f"[blockdraft] train prompts: {message}", file=sys.stderr)


def _item(path: Path, index: int, domain: str, *turns: str, upstream_id: str | None = None) -> _Item:
    return _Item(f"{path.parent.name}/{path.name}:{index}", domain, tuple(turns), upstream_id)


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    return value.strip() if isinstance(value, str) else ""


def _join(*parts: str) -> str:
    """Alpaca-style prompt: instruction, blank line, input (when there is one)."""
    return "\n\n".join(p.strip() for p in parts if p and p.strip())


# ---------------------------------------------------------------------------------------------
# File readers (shared by the per-source loaders)


def _files(directory: Path, names: Iterable[str]) -> Iterator[Path]:
    """The named files of a source; a missing one is warned about so the rest still load."""
    for name in names:
        path = directory / name
        if path.is_file():
            yield path
        else:
            _warn(f"{path}: missing, skipped")


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(0-based line index, record); an unparsable line is skipped with a warning naming it."""
    for number, record in read_jsonl(path, on_error="skip"):
        yield number - 1, record


def _json_list(path: Path) -> Iterator[tuple[int, dict]]:
    """(list index, record) of a JSON file holding a list of objects."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        _warn(f"{path}: unreadable ({exc}), skipped")
        return
    if not isinstance(data, list):
        _warn(f"{path}: not a JSON list, skipped")
        return
    for index, record in enumerate(data):
        if isinstance(record, dict):
            yield index, record
        else:
            _warn(f"{path}: item {index} is not an object, skipped")


def _lines(path: Path) -> list[str]:
    """Lines of a plain or gzip text file (one segment per line)."""
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz"
          else path.open(encoding="utf-8")) as handle:
        return handle.read().splitlines()


# ---------------------------------------------------------------------------------------------
# Prompt phrasing helpers

_LANGUAGES = {
    "en": "English", "eng": "English", "de": "German", "deu": "German", "fr": "French",
    "fra": "French", "cs": "Czech", "ces": "Czech", "ja": "Japanese", "jpn": "Japanese",
    "ru": "Russian", "rus": "Russian", "uk": "Ukrainian", "ukr": "Ukrainian", "zh": "Chinese",
    "cmn": "Chinese", "ara": "Arabic", "ben": "Bengali", "bul": "Bulgarian", "dan": "Danish",
    "ell": "Greek", "fin": "Finnish", "heb": "Hebrew", "hin": "Hindi", "hun": "Hungarian",
    "ind": "Indonesian", "ita": "Italian", "kor": "Korean", "nld": "Dutch", "nob": "Norwegian",
    "pes": "Persian", "pol": "Polish", "por": "Portuguese", "ron": "Romanian", "spa": "Spanish",
    "swe": "Swedish", "tha": "Thai", "tur": "Turkish", "vie": "Vietnamese",
}


def _translate(source: str, target: str, text: str) -> str:
    """Spec-Bench's phrasing, "Translate German to English: <sentence>"."""
    text = text.strip()
    if not text:
        return ""
    return f"Translate {_LANGUAGES.get(source, source)} to {_LANGUAGES.get(target, target)}: {text}"


def _detok(text: str) -> str:
    """Undo tokenised spacing ("$ 3 ." -> "$3.") and re-capitalise sentences (MAWPS, SVAMP, MathQA)."""
    text = re.sub(r"[ \t]+([.,?!;:%)])", r"\1", text)
    text = re.sub(r"([$(])[ \t]+", r"\1", text)
    text = re.sub(r"[ \t]+('s|n't)\b", r"\1", text)
    text = re.sub(r"[ \t]+", " ", text).strip()
    return re.sub(r"(^|[.?!] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text, flags=re.M)


def _strip_scaffold(text: str) -> str:
    """Turn eval scaffolding ("Context: ..\\nQuestion: ..\\nAnswer:") into a plain chat question."""
    text = re.sub(r"\n\s*(Answer|A):\s*$", "", text.strip())
    text = re.sub(r"^(Question|Q|Context):\s*", "", text)
    text = re.sub(r"\n(Question|Q):\s*", "\n\n", text)
    return text.strip()


def _choices(question: str, choices: list) -> str:
    """Append answer options as "A. ..." lines (unless the query already lists them)."""
    options = [str(c) for c in choices]
    embedded = all(len(o) == 1 and o.isupper() for o in options)  # ["A", "B", ...]: in the query
    if not options or embedded or options == ["Yes", "No"]:
        return question
    return question + "\n" + "\n".join(f"{chr(65 + k)}. {o}" for k, o in enumerate(options))


# ---------------------------------------------------------------------------------------------
# One loader per source format


def _load_sharegpt(directory: Path) -> Iterator[_Item]:
    for path in _files(directory, ["sharegpt_v3_en_human_turns.jsonl"]):
        for index, record in _jsonl(path):
            upstream = str(record.get("id", ""))
            turns = record.get("turns")
            # later parts of a split conversation start mid-conversation, without their context
            if upstream.endswith("_0") and isinstance(turns, list):
                yield _item(path, index, "chat", *map(str, turns), upstream_id=upstream)


def _load_instructionwild(directory: Path) -> Iterator[_Item]:
    for path in _files(directory, ["user_1.jsonl", "user_2.jsonl", "user_3.jsonl"]):
        for index, record in _jsonl(path):
            yield _item(path, index, "chat", _text(record, "instruction"))


_SELF_INSTRUCT_CODING = {"Leetcode", "GeeksforGeeks", "StackOverflow", "Github", "w3schools"}


def _load_self_instruct(directory: Path) -> Iterator[_Item]:
    for path in _files(directory, ["user_oriented_instructions.jsonl"]):
        for index, record in _jsonl(path):
            instances = record.get("instances") or [{}]
            prompt = _join(_text(record, "instruction"), _text(instances[0], "input"))
            domain = "coding" if record.get("motivation_app") in _SELF_INSTRUCT_CODING else "writing"
            yield _item(path, index, domain, prompt)


_WIZARDLM_SKILLS = {"Math": "math", "Code Generation": "coding", "Code Debug": "coding",
                    "Writting": "writing", "Academic Writing": "writing", "Roleplay": "roleplay"}


def _load_wizardlm(directory: Path) -> Iterator[_Item]:
    for path in _files(directory, ["WizardLM_testset.jsonl"]):
        for index, record in _jsonl(path):
            domain = _WIZARDLM_SKILLS.get(record.get("Skill"), "chat")
            yield _item(path, index, domain, _text(record, "Instruction"))


def _alpaca_loader(domains: dict[str, str]) -> Loader:
    """Loader for JSON lists of {instruction, input, ...}, with one domain per file."""

    def load(directory: Path) -> Iterator[_Item]:
        for path in _files(directory, domains):
            for index, record in _json_list(path):
                prompt = _join(_text(record, "instruction"), _text(record, "input"))
                yield _item(path, index, domains[path.name], prompt)

    return load


def _load_gsm8k(directory: Path) -> Iterator[_Item]:
    for path in _files(directory, ["train.jsonl"]):
        for index, record in _jsonl(path):
            yield _item(path, index, "math", _text(record, "question"))


def _svamp_number(numbers: list[str], k: int) -> str:
    value = float(numbers[k])
    return str(int(value)) if value.is_integer() else numbers[k]


def _load_svamp(directory: Path) -> Iterator[_Item]:
    for path in _files(directory, ["SVAMP.json"]):
        for index, record in _json_list(path):
            body, question = _text(record, "Body"), _text(record, "Question")
            if body and question and body[-1] not in ".?!":  # Body is often a bare "If ..." clause
                question = question[0].lower() + question[1:]
                body += ","
            yield _item(path, index, "math", _detok(f"{body} {question}"))
    for path in _files(directory, ["train.csv"]):
        with path.open(encoding="utf-8", newline="") as handle:
            for index, record in enumerate(csv.DictReader(handle)):
                numbers = (record.get("Numbers") or "").split()
                try:  # numbers are masked as number0, number1, ... in the text
                    text = re.sub(r"number(\d+)", lambda m: _svamp_number(numbers, int(m.group(1))),
                                  record.get("Question") or "")
                except (IndexError, ValueError):
                    _warn(f"{path}: row {index} has unmatched numbers, skipped")
                    continue
                yield _item(path, index, "math", _detok(text))


# file -> (domain, phrasing of the question); the eval sets' few-shot scaffolding is stripped
_FOUNDRY = {
    "arc_easy.jsonl": ("qa", "{q}"), "arc_challenge.jsonl": ("qa", "{q}"),
    "commonsense_qa.jsonl": ("qa", "{q}"), "siqa.jsonl": ("qa", "{q}"),
    "bigbench_strategy_qa.jsonl": ("qa", "{q}"), "logi_qa.jsonl": ("qa", "{q}"),
    "triviaqa_sm_sub.jsonl": ("qa", "{q}"),
    "openbook_qa.jsonl": ("qa", "Complete the sentence: {q}"),
    "piqa.jsonl": ("qa", "Goal: {q}\nWhich solution is better?"),
    "math.jsonl": ("math", "{q}"), "aqua.jsonl": ("math", "{q}"), "math_qa.jsonl": ("math", "{q}"),
    "pubmed_qa_labeled.jsonl": ("rag", "{q}"),
}
_FOUNDRY_TOKENISED = {"math_qa.jsonl"}  # lower-cased, space-tokenised text


def _load_llm_foundry(directory: Path) -> Iterator[_Item]:
    for path in _files(directory, _FOUNDRY):
        domain, phrasing = _FOUNDRY[path.name]
        for index, record in _jsonl(path):
            question = _strip_scaffold(_text(record, "query") or _text(record, "context"))
            if path.name in _FOUNDRY_TOKENISED:
                question = _detok(question)
            if question:
                prompt = _choices(phrasing.format(q=question), record.get("choices") or [])
                yield _item(path, index, domain, prompt)


# T0 file names are "<dataset>_<template>.jsonl": the dataset gives the domain unless the
# template asks for something else (write a question / story / title from the passage)
_T0_TEMPLATES = {
    "generate_question": "writing", "context_answer_to_question": "writing",
    "Generate_the_question": "writing", "build_story": "writing", "Write_a_dialogue": "writing",
    "write_an_article": "writing", "generate_first_utterance": "writing",
    "generate_review": "writing", "generate_paraphrase": "writing",
    "title_generation": "summarization", "Guess_Title": "summarization",
    "Closed_Book": "qa", "convert_to_star_rating": "qa",
}
_T0_DATASETS = {
    **dict.fromkeys(["cnn_dailymail", "xsum", "samsum", "multi_news", "gigaword"], "summarization"),
    **dict.fromkeys(["adversarial_qa", "duorc", "quoref", "ropes", "cosmos_qa", "dream", "sciq",
                     "quartz", "quarel", "wiki_bio", "wiqa"], "rag"),
    **dict.fromkeys(["kilt_tasks_hotpotqa", "commonsense_qa", "social_i_qa", "qasc", "wiki_qa",
                     "trec", "ag_news", "amazon_polarity", "imdb", "yelp_review_full",
                     "rotten_tomatoes", "dbpedia_14", "glue_qqp", "paws_labeled_final"], "qa"),
    **dict.fromkeys(["common_gen", "app_reviews", "glue_mrpc"], "writing"),
}


def _t0_domain(stem: str) -> str | None:
    for key, domain in _T0_TEMPLATES.items():
        if key in stem:
            return domain
    return next((d for name, d in _T0_DATASETS.items() if stem.startswith(name + "_")), None)


def _load_t0(directory: Path) -> Iterator[_Item]:
    for path in sorted(directory.glob("*.jsonl")):
        domain = _t0_domain(path.stem)
        if domain is None:
            _warn(f"{path}: unknown T0 task (no domain), skipped")
            continue
        for index, record in _jsonl(path):
            yield _item(path, index, domain, _text(record, "prompt"))


_SCITLDR_PHRASINGS = (
    "Summarize: {text}",
    "Summarize in one sentence: {text}",
    "Write a one-sentence TL;DR of this paper abstract.\n\n{text}",
    "{text}\n\nWhat is the main contribution of this paper? Answer in one or two sentences.",
)


def _load_scitldr(directory: Path) -> Iterator[_Item]:
    for path in _files(directory, ["train.jsonl"]):
        for index, record in _jsonl(path):
            sentences = record.get("source")
            text = " ".join(map(str, sentences)).strip() if isinstance(sentences, list) else ""
            if text:
                phrasing = _SCITLDR_PHRASINGS[index % len(_SCITLDR_PHRASINGS)]
                yield _item(path, index, "summarization", phrasing.format(text=text))


def _load_wmt22(directory: Path) -> Iterator[_Item]:
    for path in sorted(directory.glob("generaltest2022.*.src.*")):
        source, target = path.name.split(".")[1].split("-")  # generaltest2022.de-en.src.de
        for index, line in enumerate(_lines(path)):
            yield _item(path, index, "translation", _translate(source, target, line))


def _parallel(english: Path, foreign: Path, lang: str, offset: int = 0) -> Iterator[_Item]:
    """One prompt per aligned line pair: X -> English, English -> X every EN_SOURCE_EVERY-th."""
    english_lines = _lines(english) if english.is_file() else []
    for index, line in enumerate(_lines(foreign)):
        if index % EN_SOURCE_EVERY == offset and index < len(english_lines):
            yield _item(english, index, "translation", _translate("en", lang, english_lines[index]))
        else:
            yield _item(foreign, index, "translation", _translate(lang, "en", line))


def _load_tatoeba(directory: Path) -> Iterator[_Item]:
    for path in sorted(directory.glob("tatoeba.*-eng.*")):
        lang = path.name.split(".")[1].split("-")[0]  # tatoeba.deu-eng.deu
        if path.suffix == f".{lang}":
            yield from _parallel(path.with_suffix(".eng"), path, lang)


def _load_multi30k(directory: Path) -> Iterator[_Item]:
    for offset, path in enumerate(_files(directory, ["train.de.gz", "train.fr.gz"])):
        # offsets 0 and 2: an English caption is asked in at most one direction (unique ids)
        yield from _parallel(directory / "train.en.gz", path, path.name.split(".")[1], 2 * offset)


SOURCES: dict[str, _Source] = {
    "sharegpt": _Source(_load_sharegpt, "none (ShareGPT, research only)", False),
    "instructionwild": _Source(_load_instructionwild, "non-commercial research only", False),
    "self_instruct": _Source(_load_self_instruct, "Apache-2.0", True),
    "wizardlm": _Source(_load_wizardlm, "CC BY-NC 4.0", False),
    "llama_factory": _Source(_alpaca_loader({"alpaca_en_demo.json": "chat"}), "CC BY-NC 4.0", False),
    "gpteacher": _Source(_alpaca_loader({
        "codegen-instruct.json": "coding",
        "roleplay-simple-deduped-roleplay-instruct.json": "roleplay"}), "MIT", True),
    "code_alpaca": _Source(_alpaca_loader({"code_alpaca_2k.json": "coding"}), "CC BY-NC 4.0", False),
    "gsm8k": _Source(_load_gsm8k, "MIT", True),
    "svamp": _Source(_load_svamp, "MIT", True),
    "llm_foundry_eval": _Source(_load_llm_foundry, "Apache-2.0 repo, mixed per-set licences", True),
    "t0_train": _Source(_load_t0, "Apache-2.0 repo, mixed (mostly research) underlying data", True),
    "scitldr": _Source(_load_scitldr, "Apache-2.0", True),
    "wmt22": _Source(_load_wmt22, "none (WMT test data, research)", False),
    "tatoeba": _Source(_load_tatoeba, "CC BY 2.0 FR", True),
    "multi30k": _Source(_load_multi30k, "non-commercial research/education (Flickr30K)", False),
}


def default_mix() -> dict[str, int]:
    """Prompts per source (~40k), sized for the domain balance chat/writing/roleplay ~35%,
    coding ~12%, math ~15%, qa ~13%, summarization ~10%, translation ~10%, rag ~5%.

    Multi-domain sources (gpteacher, llm_foundry_eval, t0_train) are sampled uniformly, so they
    contribute to their domains in proportion to their files. The order is the de-duplication
    order: an item already taken from an earlier source is skipped in a later one.
    """
    return {
        "sharegpt": 8150, "instructionwild": 860, "self_instruct": 250, "wizardlm": 215,
        "llama_factory": 980, "gpteacher": 6000, "code_alpaca": 700,
        "gsm8k": 3400, "svamp": 1250, "llm_foundry_eval": 4200,
        "t0_train": 7600, "scitldr": 1990,
        "wmt22": 1500, "tatoeba": 1700, "multi30k": 800,
    }


# ---------------------------------------------------------------------------------------------
# Exclusions, benchmark guard, de-duplication


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(words: list[str], n: int = BENCH_NGRAM) -> Iterator[str]:
    return (" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


@dataclass
class _Exclusions:
    """overlap_exclusions.json: items listed by index and, for sharegpt, by upstream id."""

    ids: set[str]
    upstream: set[tuple[str, str]]

    @classmethod
    def load(cls, root: Path) -> "_Exclusions":
        path = root / "overlap_exclusions.json"
        if not path.is_file():
            _warn(f"{path}: missing; no evaluation-overlap items are excluded")
            return cls(set(), set())
        ids: set[str] = set()
        upstream: set[tuple[str, str]] = set()
        for key, entry in json.loads(path.read_text(encoding="utf-8")).items():
            if isinstance(entry, dict):  # "_about" and notes on files not copied are strings
                ids.update(f"{key}:{i}" for i in entry.get("indices", []))
                upstream.update((key, str(u)) for u in entry.get("ids", []))
        return cls(ids, upstream)

    def __contains__(self, item: _Item) -> bool:
        # both lists are honoured: in the shipped file sharegpt's index and id name different rows
        return item.id in self.ids or (item.id.rsplit(":", 1)[0], item.upstream_id) in self.upstream


@dataclass
class _Benchmark:
    """Spec-Bench questions: a prompt equal to a turn, or sharing a word n-gram with one, is out."""

    texts: set[str]
    ngrams: set[str]

    @classmethod
    def load(cls, directory: Path) -> "_Benchmark":
        files = sorted(directory.glob("question*.jsonl")) if directory.is_dir() else []
        if not files:
            _warn(f"no Spec-Bench questions in {directory}; only overlap_exclusions.json guards it")
        turns = [str(t) for f in files for _, rec in read_jsonl(f, on_error="skip")
                 for t in rec.get("turns", [])]
        return cls({_normalise(t) for t in turns}, {g for t in turns for g in _ngrams(_words(t))})

    def overlaps(self, turns: Iterable[str]) -> bool:
        return any(_normalise(t) in self.texts or any(g in self.ngrams for g in _ngrams(_words(t)))
                   or NEAR_BENCHMARK_TOPICS.search(t) for t in turns)


# Topics of MT-bench coding questions whose paraphrases appear in the training sources (the
# README's exclusion list drops some by index; these patterns drop the rest of the family).
NEAR_BENCHMARK_TOPICS = re.compile(
    r"fibonacci.{0,80}recurs|recurs.{0,80}fibonacci|longest common subsequence", re.IGNORECASE | re.DOTALL)


def _fit(turns: Iterable[str]) -> tuple[str, ...]:
    """Clean turns; keep at most MAX_TURNS, stopping at the first over-long or empty one."""
    kept: list[str] = []
    for turn in turns:
        turn = turn.replace("\r\n", "\n").strip()
        if not turn or len(turn) > MAX_PROMPT_CHARS or len(kept) == MAX_TURNS:
            break
        kept.append(turn)
    return tuple(kept)


def build_training_prompts(root: Path, per_source: dict[str, int] | None = None, seed: int = 0,
                           include_noncommercial: bool = True, *,
                           benchmark_dir: Path | None = None) -> list[dict]:
    """Sample `per_source` prompts (default: default_mix()) from the corpora under `root`.

    Each source's items are shuffled with a seed derived from `seed` and the source name, and
    taken in that order, skipping excluded, benchmark-overlapping, over-long, empty and
    duplicate (normalised text) prompts, so every source gets its count whenever it has enough
    unique items. `benchmark_dir` defaults to <root>/../spec_bench. The result is shuffled.
    """
    root = Path(root)
    mix = default_mix() if per_source is None else per_source
    unknown = sorted(set(mix) - set(SOURCES))
    if unknown:
        raise BlockdraftError(f"unknown training-prompt sources {unknown}; known: {sorted(SOURCES)}")
    excluded = _Exclusions.load(root)
    benchmark = _Benchmark.load(Path(benchmark_dir) if benchmark_dir else root.parent / "spec_bench")
    seen: set[str] = set()
    dropped: Counter[str] = Counter()
    rows: list[dict] = []
    for name, wanted in mix.items():
        source = SOURCES[name]
        if wanted <= 0 or (not include_noncommercial and not source.commercial):
            continue
        directory = root / name
        if not directory.is_dir():
            _warn(f"{directory}: source missing, skipped")
            continue
        pool = list(source.loader(directory))
        random.Random(f"{seed}:{name}").shuffle(pool)
        taken = 0
        for item in pool:
            if taken == wanted:
                break
            turns = _fit(item.turns)
            key = "\n".join(map(_normalise, turns))
            reason = ("excluded" if item in excluded else
                      "empty or too long" if not turns else
                      "duplicate" if key in seen else
                      "benchmark overlap" if benchmark.overlaps(turns) else None)
            if reason:
                dropped[reason] += 1
                continue
            seen.add(key)
            rows.append({"id": item.id, "source": name, "domain": item.domain,
                         "license": source.license, "turns": list(turns)})
            taken += 1
        if taken < wanted:
            _warn(f"{name}: only {taken} of {wanted} prompts available")
    if dropped:
        _warn("dropped while sampling: " + ", ".join(f"{n} {r}" for r, n in sorted(dropped.items())))
    random.Random(seed).shuffle(rows)
    return rows


def long_first(rows: list[dict], chars: int) -> list[dict]:
    """The rows whose first turn has at least `chars` characters first, each part in its order.

    Why: distillation works through a prompt file in order, and long documents to read
    (summarization, RAG-style passages) are a small share of the mix but what drafters see
    least; putting them first makes a session's distillation cover them before the rest."""
    long = [r for r in rows if len(r["turns"][0]) >= chars]
    return long + [r for r in rows if len(r["turns"][0]) < chars]


def write_jsonl(rows: list[dict], path: Path) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped); written to a temp file, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def source_summary(rows: list[dict]) -> dict:
    """Counts per source and domain and the licences seen, for the heads' config."""
    return {
        "total": len(rows),
        "sources": dict(sorted(Counter(r["source"] for r in rows).items())),
        "domains": dict(sorted(Counter(r["domain"] for r in rows).items())),
        "licenses": dict(sorted(Counter(r["license"] for r in rows).items())),
    }
