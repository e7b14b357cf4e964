"""Benchmark questions in the Spec-Bench / FastChat format, their selection and category groups.

A question is {"question_id", "category", "turns": [user messages], "reference"?}; later turns
are asked after the model's own answers to the earlier ones (see runner.py).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import BlockdraftError
from ..jsonl import read_jsonl

DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "assets" / "spec_bench" / "question_dev.jsonl"
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
GROUPS = {"mt_bench": MT_BENCH}  # report-level groups of fine categories


# Spec-Bench categories -> the training-prompt domain whose held-out prompts tuned the refiners'
# rescoring weight (alpha): Decoder.generate(domain=...) picks that alpha.
CATEGORY_DOMAIN = {"writing": "writing", "roleplay": "roleplay", "reasoning": "chat", "math": "math",
                   "coding": "coding", "extraction": "rag", "stem": "qa", "humanities": "chat",
                   "translation": "translation", "summarization": "summarization", "qa": "qa",
                   "math_reasoning": "math", "rag": "rag"}


def domain_of(category: str | None) -> str | None:
    """The training domain of a Spec-Bench category (an unknown category names its own domain)."""
    return CATEGORY_DOMAIN.get(category, category) if category else None


def group_of(category: str) -> str:
    """The report category: the group a fine category belongs to, else the category itself."""
    return next((name for name, members in GROUPS.items() if category in members), category)


def _problem(record: dict) -> str | None:
    """Why a record is not a usable question (None if it is)."""
    if not isinstance(record.get("question_id"), (int, str)) or isinstance(record.get("question_id"), bool):
        return "'question_id' must be an integer or a string"
    if not isinstance(record.get("category"), str) or not record["category"]:
        return "'category' must be a non-empty string"
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        return "'turns' must be a non-empty list of non-empty strings"
    return None


def load_questions(path: str | Path | None = None, categories: list[str] | None = None,
                   per_category: int | None = None, limit: int | None = None) -> list[dict]:
    """Questions of a JSONL file in file order: categories (fine names or groups such as
    mt_bench) are kept, then the first `per_category` of each fine category, then `limit`."""
    for name, value in (("per-category", per_category), ("limit", limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BlockdraftError(f"--{name} must be a whole number >= 1, got {value!r}")
    path = Path(path) if path else DEFAULT_PROMPTS
    questions, seen = [], set()
    for number, record in read_jsonl(path, validate=_problem):
        if record["question_id"] in seen:
            raise BlockdraftError(f"{path}:{number}: duplicate question_id {record['question_id']!r}")
        seen.add(record["question_id"])
        questions.append(record)
    if categories:
        questions = _in_categories(questions, categories, path)
    if per_category is not None:
        counts: dict[str, int] = {}
        questions = [q for q in questions if _count(counts, q["category"]) <= per_category]
    return questions[:limit] if limit is not None else questions


def _in_categories(questions: list[dict], categories: list[str], path: Path) -> list[dict]:
    """The questions whose fine category or group is named; an unknown name is an error."""
    present = {q["category"] for q in questions} | {group_of(q["category"]) for q in questions}
    unknown = [c for c in categories if c not in present]
    if unknown:
        raise BlockdraftError(f"{path}: no questions in categories {', '.join(unknown)}; "
                              f"present: {', '.join(sorted(present))}")
    wanted = set(categories)
    return [q for q in questions if q["category"] in wanted or group_of(q["category"]) in wanted]


def _count(counts: dict[str, int], key: str) -> int:
    counts[key] = counts.get(key, 0) + 1
    return counts[key]
