"""Checkpoints for engines that serve at scale, written from blockdraft's drafters.

`eagle3`: the `speculators` EAGLE-3 layout that vLLM (`speculative_config` method `eagle3`) and
SGLang (`--speculative-algorithm EAGLE3`) load: config keys `speculators_model_type`,
`transformer_layer_config` (a one-layer Llama config), `draft_vocab_size`,
`norm_before_residual`, `target_hidden_size`, `speculators_config` (algorithm, proposal
method, verifier), and `eagle_aux_hidden_state_layer_ids` (vLLM's name for the target layers
whose *inputs* are fused: our layer outputs + 1); tensors `fc`, `layers.0.*`, `norm`,
`lm_head`, `d2t`, `t2d` and `embed_tokens` (the target's embedding, which the draft layer
reads). Our layer's math is the layout's: [norm(e); norm(g)] into a 2H-wide attention, the
residual taken before hidden_norm, rotate-half RoPE, a bias-free fc.

`medusa`: plain BPD heads (h + SiLU(W h + b), each through the shared output projection) in
vLLM's Medusa layout, with `token_map` for a draft vocabulary. Chained heads (each reads the
drafted tokens before it) have no place in that layout and are refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .eagle.model import EagleLayer, load_eagle, one_feature_norm
from .errors import BlockdraftError
from .heads import DraftHeads

FORMATS = ("eagle3", "medusa")


def exported_eagle(decoder, feature_norm: str = "as-trained") -> EagleLayer:
    """The decoder's eagle layer as the eagle3 export writes it: checked against the decoder's
    model, read from its folder as trained (the decoder's own copy is fused for drafting), and
    with feature_norm "one" its per-layer feature norms merged into one (the layout llama.cpp's
    converter reads; blockdraft.eagle.model.one_feature_norm)."""
    decoder.eagle()  # one line when the folder is broken or made for another model
    layer = load_eagle(decoder.eagle_path)
    return one_feature_norm(layer) if feature_norm == "one" else layer


def export_eagle3(layer: EagleLayer, model: torch.nn.Module, out: Path, verifier: str) -> Path:
    """Write `layer` (the eagle drafter of `model`) in the speculators EAGLE-3 layout."""
    from safetensors.torch import save_file

    c, mc = layer.config, model.config
    d2t = layer.d2t.detach().cpu().long()
    t2d = torch.zeros(c.vocab_size, dtype=torch.bool)
    t2d[d2t + torch.arange(len(d2t))] = True
    names = {"fc": "fc", "input_layernorm": "layers.0.input_layernorm", "hidden_norm": "layers.0.hidden_norm",
             "post_attention_layernorm": "layers.0.post_attention_layernorm", "norm": "norm", "lm_head": "lm_head",
             **{p: f"layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
             **{p: f"layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}}
    state = {f"{names[name]}.weight": getattr(layer, name).weight.detach().to("cpu", torch.float16).contiguous()
             for name in names}
    if layer.fc_norm is not None:
        for i, norm in enumerate(layer.fc_norm):
            state[f"fc_norm.{i}.weight"] = norm.weight.detach().to("cpu", torch.float16).contiguous()
    if layer.input_norm is not None:
        state["input_norm.weight"] = layer.input_norm.weight.detach().to("cpu", torch.float16).contiguous()
    state["embed_tokens.weight"] = model.get_input_embeddings().weight.detach().to("cpu", torch.float16).contiguous()
    state["d2t"], state["t2d"] = d2t, t2d
    layer_config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": 1,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "max_position_embeddings": int(getattr(mc, "max_position_embeddings", 8192)), "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": "float16"}
    config = {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
        "transformer_layer_config": layer_config, "draft_vocab_size": c.draft_vocab_size,
        "norm_before_residual": False, "target_hidden_size": c.hidden_size, "fc_norm": c.fc_norm,
        "norm_before_fc": c.norm_before_fc,
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in c.target_layers],
        "speculators_config": {
            "algorithm": "eagle3", "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 5}],
            "verifier": {"name_or_path": verifier, "architectures": list(getattr(mc, "architectures", None) or
                                                                         [type(model).__name__])}},
        "blockdraft": {"target_layers": list(c.target_layers), "base_fingerprint": c.base_fingerprint,
                       "training": c.training},
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def export_medusa(heads: DraftHeads, model: torch.nn.Module, out: Path) -> Path:
    """Write plain BPD heads in vLLM's Medusa layout (one residual block and one projection per head)."""
    from safetensors.torch import save_file

    c = heads.config
    if c.chain:
        raise BlockdraftError("these heads are chained (each reads the drafted tokens before it), which vLLM's "
                              "Medusa layout cannot express: export heads trained without --chain")
    full = model.get_output_embeddings().weight.detach().to("cpu", torch.float16)
    vocab = getattr(heads, "draft_vocab", None)
    rows = full if vocab is None or not len(vocab) else full[vocab.cpu()]
    state = {}
    for j, block in enumerate(heads.blocks):
        state[f"blocks.{j}.layers.0.weight"] = block.weight.detach().to("cpu", torch.float16).contiguous()
        state[f"blocks.{j}.layers.0.bias"] = block.bias.detach().to("cpu", torch.float16).contiguous()
        state[f"lm_heads.{j}.weight"] = rows.clone().contiguous()
    if rows is not full:
        state["token_map"] = vocab.detach().cpu().long()
    config = {"architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": c.hidden_size,
              "vocab_size": c.vocab_size, "num_heads": c.num_heads, "num_hidden_layers": 1,
              "truncated_vocab_size": len(rows), "original_lm_head": False, "medusa_fc_bias": True,
              "blockdraft": {"base_fingerprint": c.base_fingerprint, "training": c.training}}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_eagle3(folder: str | Path) -> EagleLayer:
    """An eagle layer from a speculators EAGLE-3 checkpoint whose layout this module writes (the round trip
    the tests make; also reads other one-layer Llama EAGLE-3 drafters with a bias-free fc)."""
    from . import validate
    from .eagle.model import EagleConfig

    folder = Path(folder)
    raw = validate.json_object(folder / "config.json")
    if raw.get("speculators_model_type") != "eagle3":
        raise validate.fault(folder / "config.json", "not a speculators eagle3 checkpoint")
    lc = raw.get("transformer_layer_config") or {}
    ours = raw.get("blockdraft") or {}
    layers = ours.get("target_layers") or [i - 1 for i in raw.get("eagle_aux_hidden_state_layer_ids", [])]
    try:
        config = EagleConfig(hidden_size=int(lc["hidden_size"]), vocab_size=int(lc["vocab_size"]), target_layers=layers,
                             draft_vocab_size=int(raw["draft_vocab_size"]),
                             num_attention_heads=int(lc["num_attention_heads"]),
                             num_key_value_heads=int(lc["num_key_value_heads"]),
                             intermediate_size=int(lc["intermediate_size"]), rope_theta=float(lc["rope_theta"]),
                             rms_norm_eps=float(lc["rms_norm_eps"]), fc_norm=bool(raw.get("fc_norm", False)),
                             norm_before_fc=bool(raw.get("norm_before_fc", False)),
                             base_fingerprint=ours.get("base_fingerprint", ""),
                             training=ours.get("training") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise validate.fault(folder / "config.json", f"missing or bad field {exc}") from None
    state = validate.safetensors(folder / "model.safetensors")
    layer = EagleLayer(config)
    renamed = {}
    for name in [n for n, _ in layer.named_parameters()]:
        if name.startswith(("fc_norm.", "input_norm.")):
            renamed[name] = state[name].float()
            continue
        key = {"fc": "fc", "norm": "norm", "lm_head": "lm_head"}.get(name.split(".")[0])
        if key is None:
            part = name.split(".")[0]
            key = f"layers.0.self_attn.{part}" if part.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else \
                f"layers.0.mlp.{part}" if part in ("gate_proj", "up_proj", "down_proj") else f"layers.0.{part}"
        if f"{key}.weight" not in state:
            raise validate.fault(folder / "model.safetensors", f"no tensor {key}.weight")
        renamed[name] = state[f"{key}.weight"].float()
    renamed["d2t"] = state["d2t"].long()
    layer.load_state_dict(renamed)
    return layer.eval().requires_grad_(False)
