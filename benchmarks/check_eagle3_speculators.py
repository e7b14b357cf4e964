"""Check `blockdraft export --format eagle3` against the speculators package's own loader.

speculators pins another transformers than blockdraft, so it is installed into its own folder
(`pip install --target`, without dependencies: torch and the rest come from this environment)
and run in a child process with that folder first on the path. The child loads the exported
checkpoint with `Eagle3DraftModel.from_pretrained`, runs one forward (ttt_steps=1) over
random fused features, and compares its draft tokens with the eagle layer's own; it fails
loudly on any missing or unexpected tensor, any config key the loader refuses, or any
draft-token mismatch.

    python benchmarks/check_eagle3_speculators.py --work /tmp/speculators-check [--eagle FOLDER]

The verifier path in the exported config is pointed at the local model folder (the loader
reads the verifier's config to resolve the target layers; nothing is downloaded).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

PACKAGES = ["speculators==0.9.0", "transformers==5.19.0", "loguru", "pydantic-settings", "typer", "rich",
            "datasets<=5.1.0", "dill", "xxhash", "multiprocess", "pyarrow", "pandas", "python-dateutil", "pytz",
            "tzdata", "hs-connectors"]

CHILD = r"""
import json, sys, torch
from speculators.models.eagle3 import Eagle3DraftModel
work = sys.argv[1]
probe = torch.load(f"{work}/probe.pt")
model = Eagle3DraftModel.from_pretrained(f"{work}/export").float().eval()
with torch.no_grad():
    tokens = model(hidden_states=probe["features"][None], input_ids=probe["next_ids"][None],
                   document_ids=torch.zeros(1, len(probe["next_ids"]), dtype=torch.long), ttt_steps=1)[0][0]
same = (tokens == probe["draft_ids"]).float().mean().item()
print(json.dumps({"positions": len(probe["next_ids"]), "same_draft_token": same,
                  "transformers": __import__("transformers").__version__,
                  "speculators": __import__("importlib.metadata").metadata.version("speculators")}))
"""


def main() -> None:
    import blockdraft
    from blockdraft.export import export_eagle3, exported_eagle

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the packages, the export and the probe")
    ap.add_argument("--eagle", default=None, help="eagle drafter folder (default: the shipped one)")
    args = ap.parse_args()
    site = args.work / "site"
    if not (site / "speculators").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                        *PACKAGES], check=True)
    dec = blockdraft.load(eagle=args.eagle)
    layer, model = exported_eagle(dec), dec.loaded.model
    export = args.work / "export"
    if export.exists():
        for f in export.iterdir():
            f.unlink()
    export_eagle3(layer, model, export, verifier="unused")
    config = json.loads((export / "config.json").read_text())
    local = Path(model.name_or_path)
    if not (local / "config.json").exists():
        local = args.work / "verifier"
        model.config.save_pretrained(local)
    config["speculators_config"]["verifier"]["name_or_path"] = str(local)
    (export / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    t = 48
    features = torch.randn(t, len(layer.config.target_layers) * layer.config.hidden_size)
    next_ids = torch.randint(0, layer.config.vocab_size, (t,))
    embed = model.get_input_embeddings().weight.float()
    with torch.no_grad():
        out, _, _ = layer(layer.fuse(features)[None], embed[next_ids][None], torch.arange(t), None, None)
        draft_ids = layer.logits(out)[0].argmax(-1)
    torch.save({"features": features, "next_ids": next_ids, "draft_ids": draft_ids}, args.work / "probe.pt")
    result = subprocess.run([sys.executable, "-c", CHILD, str(args.work)], capture_output=True, text=True,
                            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        sys.exit(f"speculators could not load or run the export:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(report))
    if report["same_draft_token"] < 1.0:
        sys.exit("speculators drafts other tokens from the same inputs: the layouts disagree")


if __name__ == "__main__":
    main()
