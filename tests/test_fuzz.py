"""Random requests through every drafting method on a tiny model: ids and text equal `ar`'s.

Hypothesis draws the prompt ids, the budget, a stop string cut from `ar`'s own answer (so stops
do fire) and the method; a failure is shrunk to a minimal request and printed.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from blockdraft.testing import tiny_decoder

METHODS = ["bpd", "bpd-full", "lookup", "bpd-0gram-p4", "bpd-0gram-p3-ctx", "bpd-ctx"]


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return tiny_decoder(seed=7, num_heads=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(st.integers(3, 63), min_size=1, max_size=40), budget=st.integers(1, 48),
       method=st.sampled_from(METHODS), stop_at=st.one_of(st.none(), st.integers(0, 40)), repeat=st.booleans())
def test_random_requests_equal_plain_decoding(decoder, prompt, budget, method, stop_at, repeat):
    if repeat:  # repeated text gives the context lookup long matches
        prompt = (prompt * 4)[:60]
    stop = ()
    if stop_at is not None:
        text = decoder.generate(ids=prompt, method="ar", max_new_tokens=budget).text
        words = text.split()
        stop = (words[stop_at % len(words)],) if words else ()
    want = decoder.generate(ids=prompt, method="ar", max_new_tokens=budget, stop=stop)
    got = decoder.generate(ids=prompt, method=method, max_new_tokens=budget, stop=stop)
    assert (got.ids, got.text, got.stop_reason) == (want.ids, want.text, want.stop_reason)
    assert got.steps <= want.steps


def test_a_stop_string_before_an_end_of_turn_in_one_block_stops_as_plain_decoding_does(decoder):
    """Found by the test above: `bpd` committed "which" and <|im_end|> in one step and reported
    the end of turn, keeping its id, where plain decoding stops at the stop string first."""
    prompt, stop = [23] * 4, ("which",)
    want = decoder.generate(ids=prompt, method="ar", max_new_tokens=4, stop=stop)
    got = decoder.generate(ids=prompt, method="bpd", max_new_tokens=4, stop=stop)
    assert want.stop_reason == "stop_string" and any(s.accepted for s in got.stats)  # a drafted block
    assert (got.ids, got.text, got.stop_reason) == (want.ids, want.text, want.stop_reason)
