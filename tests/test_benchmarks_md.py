"""docs/benchmarks.md is generated from docs/results/*/results.json and kept current."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("benchmarks_md", ROOT / "scripts" / "benchmarks_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(date: str, sampling: dict | None, fast_be: float) -> dict:
    overall = lambda be: {"block_efficiency": be, "tokens_per_s": 10 * be, "speedup_vs_ar": be / 1.1,  # noqa: E731
                          "lossless_rate": None if sampling else 1.0}
    return {"command": "blockdraft bench --methods ar,fast", "config": {"questions": 3, "max_new_tokens": 16, "sampling": sampling},
            "environment": {"date": date, "model": "m", "dtype": "torch.float32", "heads": "/x/heads/smollm2-135m",
                            "cpu": "cpu", "cpu_count": 2, "torch_threads": 2,
                            "versions": {"torch": "2", "transformers": "5"}},
            "methods": {"ar": {"overall": overall(1.0)}, "fast": {"overall": overall(fast_be)}}}


def test_runs_newest_first_with_their_settings(tmp_path):
    for name, date, sampling, be in [("old", "2026-01-01T10:00:00", None, 2.5),
                                     ("new", "2026-02-01T10:00:00", {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "seed": 0}, 2.1)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(date, sampling, be)))
    page = _script().render(tmp_path)
    assert page.index("## 2026-02-01: new") < page.index("## 2026-01-01: old")
    assert "sampling: temperature 0.7" in page and "greedy" in page
    assert "| `fast` | 2.10 | 21.0 | 1.91 | – |" in page and "| `fast` | 2.50 | 25.0 | 2.27 | 1.00 |" in page


def test_the_committed_page_is_current():
    assert _script().main(["--check"]) == 0, "run: python scripts/benchmarks_md.py"
