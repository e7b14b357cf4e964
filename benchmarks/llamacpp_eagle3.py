"""llama.cpp with blockdraft's eagle drafter: plain decoding vs EAGLE-3 speculation in llama-server.

Why: users who run llama.cpp on a CPU gain from our drafter only if llama.cpp itself can run it.
This exports the drafter (`blockdraft export --format eagle3`), converts it with llama.cpp's own
`convert_hf_to_gguf.py --target-model-dir`, starts two `llama-server`s on the default model's
Q4_1 GGUF (plain, and `-md draft.gguf --spec-type draft-eagle3`), and sends both the same
chat-formatted first turns of Spec-Bench's dev split, prompt by prompt, one request at a time.
It reports decode tokens/s (llama-server's own `timings`), the drafts' acceptance, the tokens
per target call that implies, and whether the two servers' greedy token ids agree.

llama.cpp's EAGLE-3 graph has one feature norm: an RMSNorm over all fused features together
(`norm_before_fc`); its converter refuses a drafter that normalises each target layer
separately (`fc_norm`, ours). So the export merges them first (`--feature-norm one`,
blockdraft.export.exported_eagle). Any refusal of the converter ends the run, verbatim.

    python benchmarks/llamacpp_eagle3.py --llama-cpp SRC --server BUILD/bin/llama-server \\
        --out runs/llamacpp-eagle3 [--eagle FOLDER] [--per-category N] [--threads 2]

SRC is a llama.cpp source tree (the one vendored in the llama-cpp-python 0.3.36 sdist works:
its `vendor/llama.cpp`), BUILD its cmake build (`cmake -B BUILD -DLLAMA_BUILD_TESTS=OFF
-DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=ON && cmake --build BUILD --target llama-server`, about
6 minutes on 2 cores; on a CPU with AMX add the README's non-AMX flags). The converter imports
`sentencepiece` (`pip install sentencepiece`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

from blockdraft.cpu import cpu_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict, timeout: float = 600.0) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class Server:
    """One llama-server process; stopped on exit."""

    def __init__(self, binary: Path, model: str, threads: int, log: Path, extra: list[str]):
        self.port = free_port()
        self.log = log
        command = [str(binary), "-m", model, "--port", str(self.port), "--host", "127.0.0.1", "-t", str(threads),
                   "-tb", str(threads), "-c", "4096", "-np", "1", "--no-webui", *extra]
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"llama-server exited with {self.process.returncode}; its log: {log}\n"
                         + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.close()
        sys.exit(f"llama-server did not come up in 300 s; its log: {log}")

    def complete(self, ids: list[int], max_new_tokens: int) -> dict:
        began = time.perf_counter()
        out = post(self.port, "/completion", {"prompt": ids, "n_predict": max_new_tokens, "temperature": 0.0,
                                              "top_k": 1, "cache_prompt": False, "return_tokens": True})
        out["wall_s"] = time.perf_counter() - began
        return out

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def convert(src: Path, export: Path, target_dir: str, out: Path, log: Path, outtype: str) -> None:
    """llama.cpp's converter on the exported drafter; its refusal, verbatim, ends the run."""
    run = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(export), "--target-model-dir",
                          target_dir, "--outtype", outtype, "--outfile", str(out)], capture_output=True, text=True)
    log.write_text(run.stdout + run.stderr)
    if run.returncode:
        last = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()][-1:]
        sys.exit(f"convert_hf_to_gguf.py refused the drafter: {last[0] if last else run.returncode} (log: {log})")


def summary(rows: list[dict]) -> dict:
    new = sum(r["timings"]["predicted_n"] for r in rows)
    decode_s = sum(r["timings"]["predicted_ms"] for r in rows) / 1000
    drafted = sum(r["timings"].get("draft_n", 0) for r in rows)
    accepted = sum(r["timings"].get("draft_n_accepted", 0) for r in rows)
    return {"turns": len(rows), "new_tokens": new, "decode_tokens_per_s": new / decode_s,
            "end_to_end_tokens_per_s": new / sum(r["wall_s"] for r in rows),
            "prefill_s_mean": sum(r["timings"]["prompt_ms"] for r in rows) / 1000 / len(rows),
            "drafted": drafted, "accepted": accepted, "acceptance": accepted / drafted if drafted else None,
            # every target call commits its accepted drafts plus one token of its own
            "tokens_per_target_call": new / (new - accepted) if new > accepted else None}


def main() -> None:
    import torch

    import blockdraft
    from blockdraft.bench.datasets import load_questions
    from blockdraft.export import export_eagle3, exported_eagle
    from blockdraft.models import gguf_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree (convert_hf_to_gguf.py)")
    ap.add_argument("--server", type=Path, required=True, help="the llama-server binary built from that tree")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--eagle", default=None, help="eagle drafter folder (default: the shipped one)")
    ap.add_argument("--per-category", type=int, default=0, help="questions per category (0: the whole dev split)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-max", type=int, default=3, help="llama.cpp's --spec-draft-n-max")
    ap.add_argument("--draft-type", default="q8_0", choices=["f16", "bf16", "q8_0", "f32"],
                    help="the drafter's weight type in the GGUF (convert_hf_to_gguf.py --outtype)")
    args = ap.parse_args()
    for path, what in ((args.llama_cpp / "convert_hf_to_gguf.py", "converter"), (args.server, "llama-server")):
        if not path.exists():
            sys.exit(f"no {what} at {path}")
    args.out.mkdir(parents=True, exist_ok=True)

    dec = blockdraft.load(eagle=args.eagle)
    layer = exported_eagle(dec, "one" if dec.eagle().config.fc_norm else "as-trained")
    model = dec.loaded.model
    export = args.out / "eagle3-export"
    shutil.rmtree(export, ignore_errors=True)
    export_eagle3(layer, model, export, verifier=str(dec.loaded.model.name_or_path))
    draft = args.out / "eagle3-draft.gguf"
    began = time.perf_counter()
    convert(args.llama_cpp, export, str(dec.loaded.model.name_or_path), draft, args.out / "convert.log",
            args.draft_type)
    convert_s = time.perf_counter() - began

    questions = load_questions(per_category=args.per_category or None)
    prompts = [(q["question_id"], q["category"], dec.encode(q["turns"][:1])) for q in questions]
    target = gguf_file()
    plain = Server(args.server, target, args.threads, args.out / "server-plain.log", [])
    eagle = Server(args.server, target, args.threads, args.out / "server-eagle3.log",
                   ["-md", str(draft), "--spec-type", "draft-eagle3", "--spec-draft-n-max", str(args.draft_max),
                    "-td", str(args.threads)])
    rows: dict[str, list[dict]] = {"llama.cpp": [], "llama.cpp + eagle3": []}
    servers = list(zip(rows, (plain, eagle)))
    try:
        for i in range(2):  # warm-up, not recorded
            for _, server in servers:
                server.complete(prompts[i][2], 16)
        for i, (qid, category, ids) in enumerate(tqdm(prompts, desc="llama-server", unit="prompt")):
            for name, server in servers[i % 2:] + servers[: i % 2]:  # order alternates per prompt
                out = server.complete(ids, args.max_new_tokens)
                rows[name].append({"question_id": qid, "category": category, "prompt_tokens": len(ids),
                                   "tokens": out.get("tokens", []), "timings": out["timings"], "wall_s": out["wall_s"]})
    finally:
        plain.close()
        eagle.close()

    same = [a["tokens"] == b["tokens"] for a, b in zip(*rows.values())]
    results = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()} ({os.cpu_count()} CPUs), {torch.get_num_threads()} torch threads, "
                   f"llama-server threads {args.threads}",
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "draft_max": args.draft_max,
        "draft_type": args.draft_type,
        "convert_seconds": round(convert_s, 1), "draft_gguf_mb": round(draft.stat().st_size / 2**20, 1),
        "same_ids_as_plain": sum(same) / len(same),
        "methods": {name: summary(r) for name, r in rows.items()},
        "by_category": {c: {name: summary([x for x in r if x["category"] == c]) for name, r in rows.items()}
                        for c in dict.fromkeys(p[1] for p in prompts)},
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "turns.jsonl").write_text("".join(json.dumps(x) + "\n" for r in rows.values() for x in r))
    for name, s in results["methods"].items():
        print(f"{name}: decode {s['decode_tokens_per_s']:.1f} tok/s, end to end {s['end_to_end_tokens_per_s']:.1f}, "
              f"acceptance {s['acceptance'] if s['acceptance'] is None else round(s['acceptance'], 3)}, "
              f"tokens per target call {s['tokens_per_target_call'] or 1:.2f}")
    print(f"same ids as plain: {results['same_ids_as_plain']:.2f}; results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
