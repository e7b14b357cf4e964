"""blockdraft: lossless blockwise parallel decoding with refined block drafts."""
from .api import Decoder, load
from .errors import BlockdraftError
from .heads import DraftHeads, HeadsConfig, load_heads
from .types import DecodeResult

__version__ = "0.1.0"
__all__ = ["BlockdraftError", "DecodeResult", "Decoder", "DraftHeads", "HeadsConfig", "load", "load_heads", "__version__"]
