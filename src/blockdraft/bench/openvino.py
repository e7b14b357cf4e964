"""OpenVINO GenAI as a CPU peer: the same model exported to OpenVINO IR with int8 weights, run
greedy and with OpenVINO's own prompt-lookup decoding.

The export needs optimum-intel, which pins an older transformers than blockdraft's. So the
export tools are installed once into a package folder of their own under the cache (pip
--target, versions pinned below) and run in a child process with that folder first on the
path: nothing in this environment changes. The IR is cached like the dequantised weights,
keyed by the weights' fingerprint. The runtime (`openvino-genai`, the `openvino` extra) needs
no transformers at all. OpenVINO's tokens are its own ids (no re-tokenizing of its text).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..errors import BlockdraftError

EXPORT_TOOLS = [  # optimum-intel 2.2.0 and what its export imports, installed without dependencies
    "optimum-intel==2.2.0", "optimum==2.3.0", "transformers==5.5.4", "tokenizers==0.22.2", "huggingface-hub==1.21.0",
    "nncf==3.4.0", "openvino==2026.4.1", "openvino-tokenizers==2026.4.1.0", "openvino-telemetry==2025.2.0",
    "scikit-learn==1.9.1", "scipy==1.17.1", "joblib==1.6.0", "threadpoolctl==3.8.0", "narwhals==2.29.0",
    "pydot==4.0.1", "pyparsing==3.3.3", "tabulate==0.10.0", "ninja==1.13.2", "cloudpickle==3.1.3",
    "httpx==0.29.0", "httpcore==1.0.9", "anyio==4.16.0", "h11==0.16.0", "idna==3.21", "certifi", "hf-xet==1.8.0",
    "typing-extensions==4.16.0"]
WEIGHTS = "int8"  # optimum-cli's --weight-format: what OpenVINO's own CPU guidance uses for small LLMs


def ir_folder(model_dir: str | Path, fingerprint: str, cache: Path) -> Path:
    """The model's OpenVINO IR (int8 weights), exported on first use (a few minutes) and cached."""
    folder = cache / "openvino" / f"{fingerprint}-{WEIGHTS}"
    if (folder / "openvino_model.xml").exists() and (folder / "openvino_tokenizer.xml").exists():
        return folder
    if not (Path(model_dir) / "config.json").exists():
        raise BlockdraftError(f"openvino needs the model as a local folder with config.json, not {model_dir!r}")
    tools = cache / "openvino" / "export-tools"
    if not (tools / "optimum" / "intel").is_dir():
        print(f"[blockdraft] installing the OpenVINO export tools into {tools} (once)", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tools),
                               *EXPORT_TOOLS], capture_output=True, text=True)
        if done.returncode:
            shutil.rmtree(tools, ignore_errors=True)
            raise BlockdraftError(f"cannot install the OpenVINO export tools: {_last_line(done.stderr)}")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"[blockdraft] exporting the model to OpenVINO IR ({WEIGHTS} weights) into {folder} (once)",
          file=sys.stderr, flush=True)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tools), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    done = subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model",
                           str(model_dir), "--task", "text-generation-with-past", "--weight-format", WEIGHTS, str(partial)],
                          capture_output=True, text=True, env=env)
    if done.returncode or not (partial / "openvino_model.xml").exists():
        shutil.rmtree(partial, ignore_errors=True)
        raise BlockdraftError(f"the OpenVINO export failed: {_last_line(done.stderr)}")
    partial.rename(folder)
    return folder


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["no message"])[-1][:200]


class OpenVinoPeer:
    """One OpenVINO GenAI pipeline over the IR: greedy, or with prompt lookup (`lookup_tokens` > 0)."""

    def __init__(self, folder: Path, threads: int, stop_ids: tuple[int, ...], lookup_tokens: int = 0,
                 lookup_ngram: int = 3):
        import openvino_genai

        options = {"prompt_lookup": True} if lookup_tokens else {}
        self.pipe = openvino_genai.LLMPipeline(str(folder), "CPU", INFERENCE_NUM_THREADS=threads, **options)
        self.stop_ids, self.lookup_tokens, self.lookup_ngram = stop_ids, lookup_tokens, lookup_ngram

    def generate(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], int]:
        """New token ids (stop id included) and the number of model calls OpenVINO made."""
        import openvino
        import openvino_genai

        config = self.pipe.get_generation_config()
        config.max_new_tokens, config.do_sample = max_new_tokens, False
        config.stop_token_ids = set(self.stop_ids)
        if self.lookup_tokens:
            config.num_assistant_tokens, config.max_ngram_size = self.lookup_tokens, self.lookup_ngram
        prompt = np.array([ids], dtype=np.int64)
        inputs = openvino_genai.TokenizedInputs(openvino.Tensor(prompt), openvino.Tensor(np.ones_like(prompt)))
        result = self.pipe.generate(inputs, config)
        return [int(t) for t in result.tokens[0]], len(result.perf_metrics.raw_metrics.token_infer_durations)
