import pytest
import torch

from blockdraft.testing import tiny_llama, tiny_tokenizer

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


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama and its tokenizer saved as a model folder (for --model PATH)."""
    folder = tmp_path_factory.mktemp("models") / "tiny"
    tiny_llama(4, dtype=torch.float32).save_pretrained(folder)
    tiny_tokenizer(64).save_pretrained(folder)
    return folder
