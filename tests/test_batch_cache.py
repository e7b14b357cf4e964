"""The growing KV cache that batched distillation uses: rows are taken over by new prompts and
leave without changing any other row's logits."""
import torch

from blockdraft.testing import tiny_llama
from blockdraft.train.batch_cache import drop_left, growing_cache, place_rows


def _alone(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits of one sequence decoded on its own, no padding, no cache."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def _prefill(model, prompts: list[list[int]]):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cache = growing_cache(model.config.num_hidden_layers)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       cache=cache).logits[:, -1]
    return cache, mask, logits


def _step(model, cache, mask, seqs: list[list[int]], tokens: list[int]):
    mask = torch.cat([mask, mask.new_ones((len(seqs), 1))], 1)
    position = torch.tensor([[len(s)] for s in seqs])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(tokens)[:, None], attention_mask=mask, position_ids=position,
                       cache=cache).logits[:, -1]
    for s, t in zip(seqs, tokens):
        s.append(t)
    return mask, logits


def test_rows_taken_over_and_left_keep_every_other_rows_logits():
    model = tiny_llama(5)
    g = torch.Generator().manual_seed(0)
    prompt = lambda n: torch.randint(1, 64, (n,), generator=g).tolist()
    seqs = [prompt(7), prompt(5), prompt(3), prompt(6)]
    cache, mask, logits = _prefill(model, [list(s) for s in seqs])
    for _ in range(3):  # the batch runs ahead: its cache is now wider than the next prompt
        mask, logits = _step(model, cache, mask, seqs, logits.argmax(-1).tolist())
    # a narrower prompt takes over row 2 (a finished answer's); then a wider one row 0, and another row 3
    for slots, new in (([2], [prompt(4)]), ([0, 3], [prompt(16), prompt(2)])):
        other, other_mask, other_logits = _prefill(model, new)
        index = torch.tensor(slots)
        place_rows(cache, index, other)
        width = max(mask.shape[1], other_mask.shape[1])
        pad = lambda m: torch.nn.functional.pad(m, (width - m.shape[1], 0))
        mask = pad(mask)
        mask[index] = pad(other_mask)
        logits[index] = other_logits
        for r, p in zip(slots, new):
            seqs[r] = list(p)
        mask, logits = _step(model, cache, mask, seqs, logits.argmax(-1).tolist())
        for row, s in enumerate(seqs):
            assert torch.allclose(logits[row], _alone(model, s), atol=1e-9), (slots, row)
    assert cache.get_seq_length() == mask.shape[1] == 17
    keep = torch.tensor([1, 2, 3])  # the widest row (16 prompt tokens) leaves: the columns only it used go too
    cache.batch_select_indices(keep)
    mask, logits, seqs = mask[keep], logits[keep], [seqs[i] for i in keep.tolist()]
    unused = int(mask.any(0).int().argmax())
    assert unused > 0
    drop_left(cache, unused)
    mask = mask[:, unused:]
    for _ in range(70):  # past the first buffers' room: they grow, keeping what they hold
        mask, logits = _step(model, cache, mask, seqs, logits.argmax(-1).tolist())
    for row, s in enumerate(seqs):
        assert torch.allclose(logits[row], _alone(model, s), atol=1e-9), row
    assert cache.get_seq_length() == mask.shape[1]
