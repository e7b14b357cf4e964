"""The eagle drafter: lossless in the engine, and trained on exactly what drafting computes."""
import pytest
import torch

from blockdraft.eagle.drafter import EagleDrafter
from blockdraft.eagle.model import random_eagle
from blockdraft.engine import DecodeConfig, generate
from blockdraft.refine.base import TreeRefiner
from blockdraft.target import TargetModel
from blockdraft.testing import reference_greedy, tiny_llama, transformers_reads_rope_table
from blockdraft.train.eagle import ttt_outputs

SHAPES = [dict(max_nodes=24, depth=6, branch=8, beam=8), dict(max_nodes=1, depth=1, branch=1, beam=1),
          dict(max_nodes=5, depth=5, branch=1, beam=1), dict(max_nodes=40, depth=3, branch=16, beam=4)]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("shape", range(len(SHAPES)))
@pytest.mark.parametrize("fast_path", [True, False])
def test_greedy_ids_equal_the_models_own(seed, shape, fast_path):
    model = tiny_llama(seed, torch.float64, layers=4)
    layer = random_eagle(model, seed, draft_vocab=48, norm_before_fc=seed % 2 == 1)
    drafter = EagleDrafter(layer, model.get_input_embeddings().weight, **SHAPES[shape])
    prompt = [(seed * 7 + 3 * i) % 64 for i in range(9)]
    got = generate(TargetModel(model, fast_path=fast_path), drafter, TreeRefiner(), prompt,
                   DecodeConfig(max_new_tokens=40))
    assert got.ids == reference_greedy(model, prompt, 40)
    # its cache holds every committed position up to the last step's (which drafts nothing after it)
    assert drafter.length == len(prompt) - 1 + sum(s.committed for s in got.stats[:-1])
    if shape != 1:
        assert max(s.tree_nodes for s in got.stats) > 1


class _FullDepth(EagleDrafter):
    """Grows every level, as the drafter did before it stopped where deeper nodes cannot pay."""

    def _deeper_pays(self, scores, best_new):
        return True


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("slope", [0.002, 0.02, 0.2])
def test_stopping_where_deeper_nodes_cannot_pay_keeps_the_tree(seed, slope):
    """On a cost curve that grows linearly, a level whose likeliest node is outside the profitable
    nodes ends the tree: the drafts equal those of the full-depth tree, in fewer layer calls."""
    from blockdraft.sizing import CostCurve

    sizes = tuple(range(1, 65))
    cost = CostCurve(sizes, tuple(1.0 + slope * (n - 1) for n in sizes))
    model = tiny_llama(seed, torch.float64, layers=4, vocab=16)
    layer = random_eagle(model, seed)
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))
    embed = model.get_input_embeddings().weight
    feats = torch.randn(12, 3 * 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ids = [(seed * 5 + 3 * i) % 16 for i in range(13)]
    trees, counts = [], []
    for kind in (EagleDrafter, _FullDepth):
        drafter = kind(layer, embed, depth=6, cost=cost)
        drafter.begin(feats[:8], ids[:9])
        calls.clear()
        trees.append([drafter.propose(feats[t:t + 1], ids[: t + 2]) for t in range(8, 12)])
        counts.append(len(calls))
    assert [(t.paths, t.scores) if t else None for t in trees[0]] == [(t.paths, t.scores) if t else None for t in trees[1]]
    assert any(trees[0]) and counts[0] < counts[1]
    target = TargetModel(model)
    got = generate(target, EagleDrafter(layer, embed, cost=cost), TreeRefiner(), ids[:6], DecodeConfig(max_new_tokens=30))
    assert got.ids == reference_greedy(model, ids[:6], 30)


def test_some_drafts_are_accepted():
    accepted = 0
    for seed in range(6):
        model = tiny_llama(seed, torch.float64, layers=4, vocab=16)
        drafter = EagleDrafter(random_eagle(model, seed), model.get_input_embeddings().weight)
        got = generate(TargetModel(model), drafter, TreeRefiner(), [1, 2, 3, 4], DecodeConfig(max_new_tokens=30))
        assert got.ids == reference_greedy(model, [1, 2, 3, 4], 30)
        accepted += sum(s.accepted for s in got.stats)
    assert accepted > 10


def test_states_equal_on_both_bodies():
    model = tiny_llama(3, torch.float64, layers=4)
    transformers_reads_rope_table(model)  # both bodies' rotary embedding from the same table
    layers = (0, 2)
    got = []
    for fast_path in (True, False):
        target = TargetModel(model, fast_path=fast_path)
        _, prompt_states = target.prefill([5, 6, 7, 8], layers=layers)
        from blockdraft.tree import build_tree
        _, states = target.forward(build_tree(9, [[10, 11], [12]]), layers=layers)
        got.append((prompt_states, states))
    assert got[0][0].shape == (4, 64) and got[0][1].shape == (4, 64)
    torch.testing.assert_close(got[0][0], got[1][0])
    torch.testing.assert_close(got[0][1], got[1][1])


@pytest.mark.parametrize("t", [0, 3, 7])
def test_training_time_test_computes_what_drafting_computes(t):
    """Step j of training at s = t + j scores the token that drafting after t scores at depth
    j + 1, on every path of a branching tree (a node attends to its ancestors, not its cousins)."""
    model = tiny_llama(1, torch.float64, layers=4)
    layer = random_eagle(model, 5, draft_vocab=40).double()
    embed = model.get_input_embeddings().weight
    torch.manual_seed(0)
    depth = 4
    feats = torch.randn(t + 1 + depth, 3 * 32, dtype=torch.float64)
    ids = torch.randint(0, 64, (t + 2,)).tolist()
    drafter = EagleDrafter(layer, embed, max_nodes=30, depth=depth, branch=3, beam=3)  # every node: 3 + 3 x 9
    drafter.begin(feats[:t], ids[: t + 1])
    tree = drafter.propose(feats[t:t + 1], ids[: t + 2])
    assert len(tree.paths) > 3 and max(map(len, tree.paths)) == depth
    draft_ids = layer.target_ids(torch.arange(40))
    for path, drafted_score in zip(tree.paths, tree.scores):
        seq = torch.tensor(ids + path)
        with torch.no_grad():
            outs = list(ttt_outputs(layer, embed, feats[None, : len(seq) - 1], seq[None, 1:], len(path)))
        score = 0.0
        for j, out in enumerate(outs):
            with torch.no_grad():
                logp = torch.log_softmax(layer.logits(out[0, t + j]), -1)
            score += float(logp[int((draft_ids == path[j]).nonzero())])
        assert score == pytest.approx(drafted_score, abs=1e-5)  # the drafter sums its scores in float32


def _tiny_corpus(tmp_path, model, n=24):
    from blockdraft.corpus import Corpus, CorpusRecord
    from blockdraft.models import model_fingerprint
    import numpy as np

    identity = {"model": "tiny", "model_fingerprint": model_fingerprint(model), "dtype": "float64", "vocab_size": 64,
                "generation": {"decoding": "greedy", "max_new_tokens": 16}}
    corpus = Corpus.create_or_open(tmp_path / "corpus", identity)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        prompt = rng.integers(0, 64, 6).tolist() if i < 6 else records[i % 6].prompt_ids.tolist()  # answers recur
        records.append(CorpusRecord(f"src/f:{i}", "chat", "src", np.array(prompt, dtype=np.uint16),
                                    np.array(reference_greedy(model, prompt, 16), dtype=np.uint16)))
    corpus.append(records, {"src": "MIT"})
    return tmp_path / "corpus"


def test_training_learns_saves_loads_and_resumes(tmp_path, monkeypatch):
    from blockdraft.eagle.model import load_eagle
    from blockdraft.models import LoadedModel, model_fingerprint
    from blockdraft.testing import tiny_tokenizer
    from blockdraft.train.eagle import EagleTrainConfig, train_eagle

    monkeypatch.setenv("BLOCKDRAFT_CACHE", str(tmp_path / "cache"))
    model = tiny_llama(4, torch.float32, layers=6)
    loaded = LoadedModel(model, tiny_tokenizer(64), "tiny", model_fingerprint(model))
    corpus = _tiny_corpus(tmp_path, model)
    cfg = EagleTrainConfig(draft_vocab=48, intermediate_size=64, epochs=30, lr=3e-3, warmup=0.05, batch_tokens=128,
                           heldout=0.2)
    first = train_eagle(loaded, corpus, tmp_path / "e1", cfg)
    assert list((tmp_path / "cache" / "eagle-features").glob("*.f16"))  # features cached, not in the corpus
    layer = load_eagle(tmp_path / "e1")
    assert layer.config.target_layers == [2, 3, 4] and layer.config.training["corpus_answers"] == 24
    assert len(layer.config.feature_rms) == 3 and min(layer.config.feature_rms) > 0  # for one_feature_norm
    # held-out answers recur in training (a tiny model's text does not generalise): learnt, not guessed (2%)
    assert first["heldout_top1_by_step"][0] > 0.3
    more = train_eagle(loaded, corpus, tmp_path / "e2", EagleTrainConfig(**{**cfg.__dict__, "epochs": 2}), init=tmp_path / "e1")
    assert more["before"]["epochs"] == first["epochs"]
    prompt = [3, 9, 27, 17, 51]
    drafter = EagleDrafter(load_eagle(tmp_path / "e2"), model.get_input_embeddings().weight)
    got = generate(TargetModel(model), drafter, TreeRefiner(), prompt, DecodeConfig(max_new_tokens=24))
    assert got.ids == reference_greedy(model, prompt, 24)


def test_bad_drafter_folders_are_one_line(tmp_path):
    from blockdraft.eagle.model import load_eagle, save_eagle
    from blockdraft.errors import BlockdraftError
    from blockdraft.testing import tiny_decoder

    model = tiny_llama(0, torch.float64, layers=4)
    good = save_eagle(random_eagle(model, 0), tmp_path / "good")
    problems = {}
    problems["missing"] = tmp_path / "nowhere"
    trunc = tmp_path / "truncated"
    save_eagle(random_eagle(model, 0), trunc)
    data = (trunc / "eagle.safetensors").read_bytes()
    (trunc / "eagle.safetensors").write_bytes(data[: len(data) // 2])
    problems["truncated"] = trunc
    other = save_eagle(random_eagle(tiny_llama(0, torch.float64, hidden=48, layers=4), 0), tmp_path / "other")
    problems["other model"] = other
    import json
    cfg = json.loads((good / "config.json").read_text())
    for name, change in [("bad layers", {"target_layers": ["x"]}), ("bad heads", {"num_attention_heads": 5}),
                         ("two norms", {"norm_before_fc": True}), ("wrong format", {"format": "blockdraft-heads/1"})]:
        folder = tmp_path / name.replace(" ", "_")
        save_eagle(random_eagle(model, 0), folder)
        (folder / "config.json").write_text(json.dumps({**cfg, **change}))
        problems[name] = folder
    dec = tiny_decoder(0)
    for name, folder in problems.items():
        with pytest.raises(BlockdraftError) as info:
            layer = load_eagle(folder)
            layer.check_compatible(dec.loaded.model if name == "other model" else model, None)
        assert "\n" not in str(info.value) and len(str(info.value)) < 300, name
    # through the Decoder: refused at first use, nothing generated
    dec.use_eagle(other)
    with pytest.raises(BlockdraftError, match="trained for hidden size"):
        dec.generate(ids=[1, 2, 3], method="eagle", max_new_tokens=4)


def test_a_drafter_for_other_weights_is_refused(tmp_path):
    from blockdraft.errors import BlockdraftError

    model = tiny_llama(0, torch.float64, layers=4)
    layer = random_eagle(model, 0)
    layer.config.base_fingerprint = "0123456789abcdef"
    with pytest.raises(BlockdraftError, match="not these weights"):
        layer.check_compatible(model, "fedcba9876543210")
    layer.check_compatible(model, "0123456789abcdef")


@pytest.mark.parametrize("norm_before_fc", [False, True])
def test_eagle3_export_round_trips(tmp_path, norm_before_fc):
    """The speculators layout read back drafts exactly what the layer drafts (float32 weights,
    rounded through float16 on export: the same rounding on both sides), with either feature norm."""
    import json

    from blockdraft.export import export_eagle3, read_eagle3

    model = tiny_llama(2, torch.float32, layers=6)
    layer = random_eagle(model, 2, draft_vocab=40, norm_before_fc=norm_before_fc)
    with torch.no_grad():  # a norm weight of ones would hide a norm that is read back wrong or not at all
        for p in layer.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    layer = layer.half().float()
    export_eagle3(layer, model, tmp_path / "e3", "tiny/verifier")
    cfg = json.loads((tmp_path / "e3" / "config.json").read_text())
    assert cfg["norm_before_fc"] is norm_before_fc and cfg["fc_norm"] is not norm_before_fc
    assert cfg["speculators_model_type"] == "eagle3" and cfg["draft_vocab_size"] == 40
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in layer.config.target_layers]
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "e3" / "model.safetensors"))
    assert tensors["t2d"].sum() == 40 and tensors["d2t"].dtype == torch.int64
    assert {"fc.weight", "layers.0.hidden_norm.weight", "layers.0.self_attn.q_proj.weight", "embed_tokens.weight",
            "layers.0.mlp.down_proj.weight", "norm.weight", "lm_head.weight"} <= set(tensors)
    assert ("input_norm.weight" in tensors) is norm_before_fc and ("fc_norm.0.weight" in tensors) is not norm_before_fc
    back = read_eagle3(tmp_path / "e3")
    embed = model.get_input_embeddings().weight
    feats, ids = torch.randn(12, 3 * 32), list(range(5, 18))
    trees = []
    for drafter_layer in (layer, back):
        drafter = EagleDrafter(drafter_layer, embed)
        drafter.begin(feats[:10], ids[:11])
        trees.append(drafter.propose(feats[10:12], ids))
    assert trees[0] == trees[1]


def test_medusa_export_refuses_chained_heads(tmp_path):
    from blockdraft.errors import BlockdraftError
    from blockdraft.export import export_medusa
    from blockdraft.testing import random_heads

    model = tiny_llama(2, torch.float32)
    with pytest.raises(BlockdraftError, match="chained"):
        export_medusa(random_heads(model, 3, chain=True), model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    export_medusa(random_heads(model, 3), model, tmp_path / "m2")
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "m2" / "model.safetensors"))
    assert set(tensors) == {f"{k}.{j}.{w}" for j in range(3) for k, w in
                            [("blocks", "layers.0.weight"), ("blocks", "layers.0.bias"), ("lm_heads", "weight")]}


def test_export_cli_refuses_unknown_formats_and_occupied_folders(tmp_path, capsys):
    from blockdraft.cli import main

    with pytest.raises(SystemExit) as info:
        main(["export", "--format", "gguf", "--out", str(tmp_path / "x")])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "model.safetensors").write_text("keep me")
    assert main(["export", "--format", "eagle3", "--out", str(tmp_path / "busy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "busy" in err
    assert (tmp_path / "busy" / "model.safetensors").read_text() == "keep me"  # nothing overwritten
    assert main(["export", "--format", "medusa", "--feature-norm", "one", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--feature-norm" in err and not (tmp_path / "m").exists()


def test_the_decoders_eagle_layer_runs_packed_and_stays_lossless(tmp_path):
    from blockdraft.cpu import OneDNNLinear, can_pack_dtype
    from blockdraft.eagle.model import save_eagle
    from blockdraft.testing import tiny_decoder

    dec = tiny_decoder(3)
    dec.loaded.model.float()
    dec.use_eagle(save_eagle(random_eagle(dec.loaded.model, 3), tmp_path / "eagle"))
    layer = dec.eagle()
    packed = [m for m in layer.modules() if isinstance(m, OneDNNLinear)]
    assert bool(packed) == (can_pack_dtype(layer.fc.weight.dtype) and torch.backends.mkldnn.is_available())
    prompt = [4, 8, 15, 16, 23]
    assert dec.generate(ids=prompt, method="eagle", max_new_tokens=20).ids == dec.generate(ids=prompt, method="ar", max_new_tokens=20).ids


def test_merging_the_feature_norms_keeps_fuse_where_the_recorded_rms_hold():
    """one_feature_norm (llama.cpp's one norm over all features) computes what the per-layer norms
    do wherever each layer's RMS is the one recorded at training; a drafter without it is one line."""
    from blockdraft.eagle.model import median_feature_rms, one_feature_norm
    from blockdraft.errors import BlockdraftError

    model = tiny_llama(3, torch.float64, layers=6)
    layer = random_eagle(model, 3).float()
    with torch.no_grad():
        for norm in layer.fc_norm:
            norm.weight.uniform_(0.5, 1.5)
    with pytest.raises(BlockdraftError, match="feature_rms"):
        one_feature_norm(layer)
    h = model.config.hidden_size
    raw = torch.randn(20, 3 * h)
    layer.config.feature_rms = [1.5, 6.0, 40.0]
    feats = torch.cat([c / c.pow(2).mean(-1, keepdim=True).sqrt() * r
                       for c, r in zip(raw.chunk(3, -1), layer.config.feature_rms)], -1)
    assert median_feature_rms(feats, 3) == pytest.approx(layer.config.feature_rms, rel=1e-4)
    merged = one_feature_norm(layer)
    assert merged.config.norm_before_fc and not merged.config.fc_norm and merged.fc_norm is None
    torch.testing.assert_close(merged.fuse(feats), layer.fuse(feats), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged.fuse(raw), layer.fuse(raw), rtol=1e-2)  # elsewhere: an approximation
    with pytest.raises(BlockdraftError, match="already has one norm"):
        one_feature_norm(merged)


def test_fusing_q_k_v_for_drafting_keeps_the_layers_outputs_and_refuses_saving(tmp_path):
    """fuse_qkv stacks three products into one: the same outputs, keys and values (float64, where
    one product over stacked rows sums each row as three do), and such a layer is not saved."""
    from blockdraft.eagle.model import save_eagle

    model = tiny_llama(2, torch.float64, layers=4)
    layer = random_eagle(model, 7, draft_vocab=40).double()
    fused = random_eagle(model, 7, draft_vocab=40).double()
    fused.fuse_qkv()
    assert fused.qkv is not None and not hasattr(fused, "q_proj")
    torch.manual_seed(1)
    g, emb = torch.randn(1, 3, 32, dtype=torch.float64), torch.randn(1, 3, 32, dtype=torch.float64)
    past = (torch.randn(1, 2, 5, 8, dtype=torch.float64), torch.randn(1, 2, 5, 8, dtype=torch.float64))
    allowed = torch.ones(3, 8, dtype=torch.bool).tril(5)
    with torch.no_grad():
        for a, b in zip(layer(g, emb, torch.arange(5, 8), past, allowed), fused(g, emb, torch.arange(5, 8), past, allowed)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="fused for drafting"):
        save_eagle(fused, tmp_path / "fused")


def test_the_decoders_drafter_exports_as_trained_though_it_drafts_fused(tmp_path):
    """A Decoder fuses its eagle layer's q|k|v for drafting; the export reads the folder's
    weights, so the eagle3 layout keeps the three projections, equal to the saved ones."""
    from safetensors.torch import load_file

    from blockdraft.eagle.model import save_eagle
    from blockdraft.export import export_eagle3, exported_eagle
    from blockdraft.testing import tiny_decoder

    dec = tiny_decoder(3)
    dec.loaded.model.float()
    saved = random_eagle(dec.loaded.model, 3)
    dec.use_eagle(save_eagle(saved, tmp_path / "eagle"))
    assert dec.eagle().qkv is not None
    export_eagle3(exported_eagle(dec), dec.loaded.model, tmp_path / "e3", "tiny/verifier")
    tensors = load_file(str(tmp_path / "e3" / "model.safetensors"))
    for name in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(tensors[f"layers.0.self_attn.{name}.weight"].float(),
                                   getattr(saved, name).weight.half().float(), rtol=0, atol=0)


def test_a_drafting_cache_that_grows_keeps_what_it_held():
    """The drafter's cache starts small and grows by copying: a prompt taken in at once and one
    taken in as a short prefill plus a long committed block (which outgrows the first size)
    draft the same tree."""
    model = tiny_llama(1, torch.float64, layers=4)
    layer = random_eagle(model, 4, draft_vocab=40).double()
    embed = model.get_input_embeddings().weight
    torch.manual_seed(2)
    feats = torch.randn(302, 3 * 32, dtype=torch.float64)
    ids = torch.randint(0, 64, (303,)).tolist()
    at_once = EagleDrafter(layer, embed, max_nodes=20, depth=3, branch=3, beam=3)
    at_once.begin(feats[:300], ids[:301])
    grown = EagleDrafter(layer, embed, max_nodes=20, depth=3, branch=3, beam=3)
    grown.begin(feats[:20], ids[:21])
    grown.propose(feats[20:300], ids[:301])  # 280 committed rows: past the cache's first 256 places
    a, b = at_once.propose(feats[300:302], ids), grown.propose(feats[300:302], ids)
    assert a.paths == b.paths and a.scores == pytest.approx(b.scores, abs=1e-9)
