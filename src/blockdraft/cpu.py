"""CPU fast path: run the model's linear layers through oneDNN (same fp32 math, faster kernels).

Measured on this project's 2-core AVX-512 machines (fp32, SmolLM2's 49,152 x 576 projection):
MKL's default GEMM takes 11.7 ms for 1 row and 25-31 ms for 2-8 rows, while oneDNN takes
6.0 / 7.9 / 10.8 / 12.9 ms for 1 / 2 / 4 / 8 rows. Verifying a draft costs several rows per
step, so this changes what drafting can win. The swap is in place and reversible
(`restore_linears`); the packed weight replaces the dense one, so the model holds one copy.

Inputs and outputs stay dense: oneDNN's pointwise linear takes them as they are, where the
older path converted every input to oneDNN's layout and every output back (~50 us per layer,
10 ms of a 62 ms SmolLM2 forward here).
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import platform
import sys
from pathlib import Path

import torch
from torch import nn


class OneDNNLinear(nn.Module):
    """y = x W^T + b with the weight pre-packed for oneDNN; a drop-in for nn.Linear at inference.

    keep_dense=False holds the packed weight only, one copy of the weights: `.weight` then
    unpacks a dense copy on each read (oneDNN's reorder back is exact), for code that reads it.
    """

    def __init__(self, linear: nn.Linear, keep_dense: bool = True):
        super().__init__()
        self.dense = linear if keep_dense else None
        self.register_buffer("packed", pack_weight(linear.weight.detach()), persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.dense.weight if self.dense is not None else self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)

    def to_linear(self) -> nn.Linear:
        """The nn.Linear this module stands for (the one it replaced, when it kept it)."""
        return self.dense if self.dense is not None else dense_linear(self.weight, self.bias)


class PackedRows(nn.Module):
    """Rows [start, stop) of a packed fused weight (q|k|v, gate|up) as a stand-in for the nn.Linear
    they came from: the fused product's owner keeps the only copy of the weights.

    The model's own forward (transformers' generate, feature passes) runs one projection at a
    time, so this module packs its rows as a weight of their own on its first call: a second
    copy only where that path is used, and products as fast as a plain OneDNNLinear's.
    """

    def __init__(self, fused: torch.Tensor, start: int, stop: int):
        super().__init__()
        self.register_buffer("fused", fused, persistent=False)  # shared by the rows of one fused product
        self.register_buffer("own", None, persistent=False)  # this module's rows, packed on first use
        self.start, self.stop = start, stop
        self.in_features, self.out_features = fused.shape[1], stop - start
        self.bias = None

    @property
    def weight(self) -> torch.Tensor:
        return self.fused.to_dense()[self.start: self.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.own is None:
            self.own = pack_weight(self.weight.contiguous())
        return packed_linear(x, self.own)

    def to_linear(self) -> nn.Linear:
        return dense_linear(self.weight.contiguous(), None)


def release_pages(tensor: torch.Tensor) -> None:
    """Give the OS back, now, the memory pages that lie wholly inside `tensor`'s own bytes
    (Linux madvise DONTNEED; elsewhere, or for a non-contiguous tensor, nothing). Only for a
    tensor about to be dropped that nothing else reads.

    Why: transformers maps a safetensors checkpoint into memory whole, and the mapping (its
    pages resident once read) lives while any tensor loaded from it lives, so the dense weights
    that packing replaces would stay resident beside their packed copies: SmolLM2-135M took
    0.65 GB of mapped file pages on top of 0.65 GB packed. Pages shared with a neighbouring
    tensor are left alone; a page dropped here reads back as the file's bytes (or zeros), never
    another tensor's data.
    """
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    # the tensor's bytes, not its whole storage: a storage shared with other tensors keeps theirs
    start = -(-tensor.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    stop = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if stop > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), MADV_DONTNEED)


MADV_DONTNEED = 4  # Linux <sys/mman.h>


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding these (dense) weights, for giving a model its plain layers back."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ packed^T (+ bias, dense) with a oneDNN-packed weight [out, in]; a dense result."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).contiguous()
    if pointwise_linear():
        y = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    else:  # older builds: round-trip through oneDNN's own tensor layout
        y = torch._C._nn.mkldnn_linear(flat.to_mkldnn(), packed, None if bias is None else bias.to_mkldnn()).to_dense()
    return y.reshape(*shape[:-1], packed.shape[0])


PACK_ROWS = 16  # the row count oneDNN lays weights out for (see pack_weight)
# Rows per product in a drafted call: bfloat16 products with weights packed for one row give each
# row what a one-row product gives up to 128 rows (SmolLM2's projections, measured), not beyond.
EXACT_ROWS = 64
_REORDER = hasattr(torch.ops.mkldnn, "_reorder_linear_weight")  # older builds: the plain layout


def pack_rows(dtype: torch.dtype) -> int:
    """The row count a model's weights of this dtype are packed for: float32 PACK_ROWS;
    bfloat16 1, whose products then give each row the same result for up to 128 rows (packed
    for 16 rows, or dense, a row's result changes past 32 rows, for some shapes past 17) and
    run ~10x faster than dense bfloat16 products here."""
    return 1 if dtype == torch.bfloat16 else PACK_ROWS


def pack_weight(weight: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """A weight [out, in] in oneDNN's layout for products of up to `rows` rows (default: pack_rows).

    Measured here (the fast path's products over SmolLM2-135M's 30 layers): the plain layout
    (`to_mkldnn`) takes 24.5 / 25.7 / 29.0 / 32.8 ms for 1 / 2 / 4 / 8 rows; this one 22.5 /
    24.4 / 20.2 / 21.6 ms, so a draft of up to 8 tokens costs the body no more than one token.
    Each row's product is also the same whatever the row count (not so with the plain layout);
    attention still differs with the query count (real model: up to 7e-5 in the logits).
    Drafting packs its bfloat16 weights for 1 row: the drafters' one-row products then take
    82 instead of 182 us (4,096 x 576 draft rows) and 78 instead of 170 us (the last chained
    head, 576 x 4,032); the rows' products are bit-identical. Needs `can_pack(weight)` (or bfloat16 for drafting).
    """
    if _REORDER:
        return torch.ops.mkldnn._reorder_linear_weight(weight, pack_rows(weight.dtype) if rows is None else rows)
    return weight.to_mkldnn()


def can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN can run products with this weight: on the CPU, oneDNN built in, float32,
    or bfloat16 where the CPU has native bfloat16."""
    return torch.backends.mkldnn.is_available() and weight.device.type == "cpu" and can_pack_dtype(weight.dtype)


@functools.cache
def pointwise_linear() -> bool:
    """Whether this torch build runs oneDNN's pointwise linear on dense inputs (probed once, on first use)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(2, 3)
        return bool(torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3), w.to_mkldnn(), None, "none", [], "").eq(3).all())
    except (AttributeError, RuntimeError):
        return False


def linear_path(dtype: torch.dtype = torch.float32) -> str:
    """How packed products of weights of this dtype run here; part of the cost curve's cache key."""
    return ("onednn-pointwise" if pointwise_linear() else "onednn-roundtrip") + (f"-rows{pack_rows(dtype)}" if _REORDER else "")


def fast_bfloat16() -> bool:
    """True where bfloat16 matrix products run natively (AVX-512 BF16 / AMX): drafting is then
    done in bfloat16, 2x less memory traffic for the draft heads; verification stays as loaded."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def can_pack_dtype(dtype: torch.dtype) -> bool:
    """oneDNN lays out float32 weights anywhere, bfloat16 ones only where the CPU has native
    bfloat16 (AVX-512 BF16 / AMX); elsewhere bfloat16 drafting keeps the plain layout."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and fast_bfloat16())


def use_onednn_linears(model: nn.Module) -> int:
    """Swap every nn.Linear of a CPU model (float32; bfloat16 on native-bfloat16 CPUs) for a
    OneDNNLinear; returns how many.

    The packed weight replaces the dense one (one copy of the weights), except the output
    projection's: the input embeddings share it where tied, and draft heads read its rows.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return _swap_linears(model, can_pack, lambda linear: linear is output)


def pack_drafter_linears(module: nn.Module) -> int:
    """Swap a CPU drafter's nn.Linear layers for OneDNNLinear where oneDNN lays out their dtype
    (float32; bfloat16 on CPUs with native bfloat16), dense weights kept (drafters are small and
    read their weights' dtype); returns how many. Measured: the eagle layer's drafting took 10.7
    instead of 12.8 ms a step (bfloat16, SmolLM2's layer, 2-core Xeon with AMX), same drafts."""
    return _swap_linears(module, lambda w: w.device.type == "cpu" and torch.backends.mkldnn.is_available()
                         and can_pack_dtype(w.dtype), lambda linear: True)


def _swap_linears(module: nn.Module, packs, keeps_dense) -> int:
    """Replace every plain nn.Linear under `module` whose weight `packs` accepts by a OneDNNLinear
    (keeping its dense weight where `keeps_dense(linear)`); returns how many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and packs(child.weight):
                setattr(parent, name, OneDNNLinear(child, keep_dense=keeps_dense(child)))
                count += 1
    return count


GROUPED_KV_SDPA = "blockdraft_grouped_kv_sdpa"  # the attention implementation's name in transformers' registry


def grouped_kv_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention computed on the key/value heads as they are (torch's enable_gqa).

    With a mask (every multi-token verification step), transformers' own SDPA path first copies
    the whole KV cache once per query-head group (`repeat_kv`); torch >= 2.5 computes masked
    grouped-query attention directly, with the same result: 5 ms less per 2-8 token SmolLM2
    forward on a 2-core CPU.
    """
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, is_causal=is_causal,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def attend_with_grouped_kv(model: nn.Module) -> str | None:
    """Run `model`'s SDPA attention through grouped_kv_sdpa, registered under its own name in
    transformers' attention registry (its documented extension point; no other model changes).
    Returns the implementation it replaced (give it back with restore_attention), or None when
    the model does not use SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    previous = getattr(model.config, "_attn_implementation", None)  # transformers' own way to read it
    if previous != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return None
    AttentionInterface.register(GROUPED_KV_SDPA, grouped_kv_sdpa)
    AttentionMaskInterface.register(GROUPED_KV_SDPA, sdpa_mask)
    model.set_attn_implementation(GROUPED_KV_SDPA)
    return previous


def restore_attention(model: nn.Module, previous: str | None) -> None:
    """Undo attend_with_grouped_kv."""
    if previous is not None:
        model.set_attn_implementation(previous)


def restore_linears(model: nn.Module) -> None:
    """Give the model plain nn.Linear layers back (undo use_onednn_linears and shared projections):
    every stand-in that knows the nn.Linear it replaced (`to_linear`: OneDNNLinear, PackedRows,
    blockdraft.int4's Int4Linear, whose weights come back as the bfloat16 values of its codes)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) and callable(getattr(child, "to_linear", None)):
                setattr(module, name, child.to_linear())


def cpu_model() -> str:
    """The processor's name (/proc/cpuinfo on Linux), for benchmark records and cost-curve keys."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
