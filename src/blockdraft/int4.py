"""4-bit weight-only products on the CPU (`--dtype int4`): the decoder body's projections stored
as 4-bit codes in groups of 32 inputs with a scale and an offset per group, inputs in bfloat16.

Why: a decode step on this project's 2-core CPUs is bound by reading the weights (SmolLM2-135M's
30 layers: 212 MB in bfloat16). torch's own 4-bit kernel (`_weight_int4pack_mm_for_cpu`) reads
a quarter of the bytes: the 30 layers' products take 6.9 ms for one token instead of 17.2
(packed bfloat16), 9.0 for 4, 15.0 for 8 and 27.0 for 16 (it decodes the weights again for
every 4 rows; bfloat16's cost hardly grows with the rows: 17.6 for 16), and every row's result
is the same whatever the row count (checked for 1-128 rows), which keeps drafted decoding
exact. Measured with `benchmarks/weight_formats.py` (docs/results/weight-formats/). Groups of 32 with a minimum and a step are what the default
model's Q4_1 GGUF stores, so its codes come back as they were; the group's scale and offset
are rounded to bfloat16.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32  # inputs per scale and offset (Q4_1's block)
LEVELS = 15  # codes 0..15
BLOCK = 64  # output rows per block of torch's CPU layout: byte (block, input, j) holds rows j and j + 32
# From this many rows on, decoding the weights to bfloat16 and one dense product beat the 4-bit
# kernel, which decodes them again for every 4 rows (SmolLM2's layer: 3.1 ms to decode all four
# weights, the kernel 1.5 ms per row for the whole body); for calls whose rows need not each be
# exact (a prompt's prefill).
DENSE_ROWS = 64


def available() -> bool:
    """Whether this torch build has the CPU 4-bit kernels (torch >= 2.5)."""
    return all(hasattr(torch.ops.aten, op) for op in ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"))


def unsupported(weight: torch.Tensor) -> str | None:
    """Why this weight [out, in] cannot be stored in 4 bits here (None when it can)."""
    if not available():
        return f"torch {torch.__version__} has no CPU 4-bit kernels"
    if weight.device.type != "cpu":
        return "4-bit weights run on the CPU only"
    return _ungrouped(weight)


def _ungrouped(weight: torch.Tensor) -> str | None:
    """Why this weight's inputs do not split into groups of GROUP (None when they do)."""
    return f"its {weight.shape[1]} inputs are not a multiple of {GROUP}" if weight.shape[1] % GROUP else None


def group_levels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group of GROUP inputs rounded to 16 levels between its minimum and maximum: codes
    [out, in] (int32, 0..15), step and minimum [out, in / GROUP] (float32); w ~ code * step + minimum."""
    reason = _ungrouped(weight)
    if reason is not None:
        raise ValueError(f"cannot store a {tuple(weight.shape)} weight in 4 bits: {reason}")
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    step = (high - low) / LEVELS
    divisor = torch.where(step > 0, step, torch.ones_like(step))
    codes = ((groups - low[..., None]) / divisor[..., None]).round().clamp(0, LEVELS).to(torch.int32)
    return codes.reshape(out_features, in_features), step, low


class FourBitWeight:
    """A weight [out, in] in 4-bit codes, multiplied by a row-exact kernel (`__call__`: each row's
    result is what the row gets alone) or, for rows that need not be exact, densely. Int4Weight
    (torch's kernel) is the one the package uses; benchmarks/int4_tiles measures another."""

    out_features: int
    in_features: int
    dense_rows = DENSE_ROWS  # from this many rows on, `prefill` takes the dense product

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] in bfloat16 as the dense product uses it."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T through the weights decoded to bfloat16: faster for many rows, and a row's
        result then depends on the row count (fine for a prefill, not for drafted rows)."""
        return F.linear(x, self.dequantize())

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T for rows that need not each be exact (a prompt's prefill, transformers' own
        forward): the dense product from `dense_rows` rows on, the kernel below."""
        return self.dense(x) if x.numel() >= self.dense_rows * self.in_features else self(x)

    def rows(self, start: int, stop: int) -> FourBitWeight | None:
        """Output rows [start, stop) as a weight of their own over the same codes (no copy), or
        None where this weight cannot lend them."""
        return None


class Int4Weight(FourBitWeight):
    """A weight for torch's 4-bit kernel: w = code * step + minimum per group of GROUP inputs.

    torch's kernel reads w = (code - 8) * scale + zero, so the scale is the step and the zero
    the group's middle (minimum + 8 steps), both in the inputs' dtype (bfloat16).
    """

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, out_features: int, in_features: int):
        self.packed, self.scales_zeros = packed, scales_zeros
        self.out_features, self.in_features = out_features, in_features

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int4Weight:
        """Round each group of GROUP inputs to 16 levels between its minimum and maximum."""
        reason = unsupported(weight)
        if reason is not None:
            raise ValueError(f"cannot store a {tuple(weight.shape)} weight in 4 bits: {reason}")
        codes, step, low = group_levels(weight)
        out_features, in_features = weight.shape
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scales_zeros = torch.stack([step.t(), (low + 8 * step).t()], -1).to(torch.bfloat16).contiguous()
        return cls(packed, scales_zeros, out_features, in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] (bfloat16) @ W^T -> [..., out]."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_zeros)
        return y.reshape(*shape[:-1], self.out_features)

    def rows(self, start: int, stop: int) -> Int4Weight | None:
        """Rows [start, stop) sharing this weight's packed codes: torch's layout keeps each BLOCK
        of output rows together, so whole blocks are a slice of it (where the layout is the one
        this module knows); their scales are copied (a few KB)."""
        if not (self._in_known_layout() and start % BLOCK == 0 and stop % BLOCK == 0 and 0 <= start < stop <= self.out_features):
            return None
        return Int4Weight(self.packed[start:stop], self.scales_zeros[:, start:stop].contiguous(), stop - start,
                          self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] as the kernel sees it, rounded to bfloat16: decoded from torch's
        layout where it is the one this module knows (checked once against the kernel), else the
        kernel's product with the identity (slow: a row per input)."""
        if self._in_known_layout():
            return _decode(self.packed, self.scales_zeros, self.out_features, self.in_features)
        eye = torch.eye(self.in_features, dtype=self.scales_zeros.dtype)
        return self(eye).t().contiguous()

    def _in_known_layout(self) -> bool:
        """Whether the packed codes are laid out as _decode reads them: torch's layout as probed
        (`_layout_known`), whole BLOCKs of output rows, two codes a byte."""
        return _layout_known() and self.out_features % BLOCK == 0 and 2 * self.packed.numel() == self.out_features * self.in_features


def _decode(packed: torch.Tensor, scales_zeros: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """(code - 8) * scale + zero in float32 (as the kernel computes it), rounded to bfloat16."""
    blocks = packed.view(out_features // BLOCK, in_features, BLOCK // 2)
    codes = torch.empty(out_features // BLOCK, BLOCK, in_features)
    codes[:, : BLOCK // 2] = (blocks & 15).transpose(1, 2)
    codes[:, BLOCK // 2:] = (blocks >> 4).transpose(1, 2)
    groups = codes.view(out_features, in_features // GROUP, GROUP).sub_(8)
    scales_zeros = scales_zeros.float()
    groups.mul_(scales_zeros[..., 0].t()[..., None]).add_(scales_zeros[..., 1].t()[..., None])
    return groups.view(out_features, in_features).bfloat16()


@functools.cache
def _layout_known() -> bool:
    """Whether this torch lays 4-bit weights out as _decode reads them (probed once, on first use)."""
    if not available():
        return False
    g = torch.Generator().manual_seed(0)
    weight = Int4Weight.quantize(torch.randn(2 * BLOCK, 2 * GROUP, generator=g))
    eye = torch.eye(weight.in_features, dtype=torch.bfloat16)
    try:
        decoded = _decode(weight.packed, weight.scales_zeros, weight.out_features, weight.in_features)
    except RuntimeError:  # another packed shape
        return False
    return torch.equal(decoded, weight(eye).t())


class Int4Linear(nn.Module):
    """Rows [start, stop) of a 4-bit weight as a stand-in for the nn.Linear they came from (all
    rows by default). Rows of a fused weight (q|k|v, gate|up) share its one copy: the model's own
    forward (transformers' generate) multiplies by its rows alone where the weight lends them
    (`FourBitWeight.rows`), else computes the fused product and keeps its rows; the fast path
    runs the fused product once for all of them."""

    def __init__(self, weight: FourBitWeight, start: int = 0, stop: int | None = None):
        super().__init__()
        self.fused = weight
        self.start, self.stop = start, weight.out_features if stop is None else stop
        self.in_features, self.out_features = weight.in_features, self.stop - self.start
        self.bias = None
        self.own = None if self.whole else weight.rows(self.start, self.stop)

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.fused.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The rows' weight as the kernel sees it (bfloat16), unpacked on each read."""
        return self.fused.dequantize()[self.start: self.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """transformers' forward: rows need not each be exact here."""
        if self.own is not None:
            return self.own.prefill(x)
        y = self.fused.prefill(x)
        return y if self.whole else y[..., self.start: self.stop]

    def to_linear(self) -> nn.Linear:
        from .cpu import dense_linear

        return dense_linear(self.weight.contiguous(), None)
