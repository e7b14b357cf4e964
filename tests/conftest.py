import pytest
import torch

from blockdraft.testing import tiny_llama

# The tests check equality of ids, never speed: one thread keeps the tiny models' many small
# products from spinning against each other on a shared, busy machine (10x faster there).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models():
    """Tiny random Llamas keyed by (seed, dtype); built once per session."""
    cache = {}

    def get(seed: int = 0, dtype: torch.dtype = torch.float64):
        if (seed, dtype) not in cache:
            cache[(seed, dtype)] = tiny_llama(seed, dtype)
        return cache[(seed, dtype)]

    return get
