"""Rotary-embedding tables computed once, so that a position's cos and sin never depend on the call.

Why: transformers computes cos(position * inv_freq) on every forward through torch's float32
cos, which on this CPU is MKL's vector math; in 5 of 66 fresh processes on a busy
machine some of its results came out one bfloat16 step off (positions 1, 5 and 15 of a
39-token prefill), enough to change a sampled answer between two runs of the same command. Here
each position's row is computed once per process in float64 (numpy, no threads), rounded to
float32 as transformers rounds its product, and read by index afterwards: every call, whatever
its size or the machine's load, sees the same bits for a position.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

BLOCK = 512  # positions per computed block: every entry comes from a computation of one shape


class RopeTable:
    """cos and sin rows per position for a Llama-style rotary embedding with fixed frequencies."""

    def __init__(self, rotary: nn.Module):
        self.inv_freq = rotary.inv_freq.detach().float().cpu().numpy()
        self.scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.cos = self.sin = torch.empty(0, 2 * self.inv_freq.shape[0], dtype=torch.float32)

    @staticmethod
    def fixed(rotary: nn.Module) -> bool:
        """Whether the module's frequencies never change with the sequence (no dynamic scaling)."""
        kind = str(getattr(rotary, "rope_type", "default"))
        return hasattr(rotary, "inv_freq") and "dynamic" not in kind and kind != "longrope"

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, 1, N, D] in `dtype` for `positions` [N]."""
        self._cover(int(positions.max()) + 1)
        return self.cos[positions].to(dtype)[None, None], self.sin[positions].to(dtype)[None, None]

    def _cover(self, count: int) -> None:
        done = self.cos.shape[0]
        if count <= done:
            return
        blocks = [self._block(start) for start in range(done, count, BLOCK)]
        self.cos = torch.cat([self.cos] + [c for c, _ in blocks])
        self.sin = torch.cat([self.sin] + [s for _, s in blocks])

    def _block(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        # position * inv_freq rounded to float32 (as transformers' product), then the angle's
        # cos and sin in float64, rounded to float32, then transformers' scaling in float32
        freqs = np.arange(start, start + BLOCK, dtype=np.float32)[:, None] * self.inv_freq[None, :]
        angles = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
        scale = np.float32(self.scaling)
        cos = torch.from_numpy(np.cos(angles).astype(np.float32) * scale)
        sin = torch.from_numpy(np.sin(angles).astype(np.float32) * scale)
        return cos, sin
