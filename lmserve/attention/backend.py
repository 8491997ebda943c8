"""AttentionBackend: the lifecycle every paged-attention implementation follows, and how one is picked."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from lmserve.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """Attention over a paged KV cache for a flat, ragged batch (decodes first, then prefill chunks).

    One instance per engine: `allocate_kv_cache` once, then per step `prepare(metadata)` once and
    `forward(..., plan, ...)` in every layer. Under CUDA graphs, `graph_inputs` replaces `prepare`.
    """

    supports_cuda_graphs: bool = False
    """True when forward reads no host value that changes between steps of a fixed decode batch size."""
    supports_sliding_window: bool = False
    """True when forward honours `sliding_window` (models with windowed layers refuse backends without it)."""
    fuses_rotary: bool = False
    """True when forward takes `rope=` and unrotated q/k, rotating them as it stores the KV cache (one kernel)."""

    @abstractmethod
    def allocate_kv_cache(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> list[Any]:
        """One cache object per layer."""

    @abstractmethod
    def prepare(self, meta: AttentionMetadata) -> Any:
        """The step's plan: whatever every layer of this step shares, computed once."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: Any,
        plan: Any,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> out [T, Hq, D].

        Writes the new k/v at the plan's slot_mapping (slots of -1 are skipped), then each sequence's
        new queries attend causally to all its tokens (cached and new) through its block_tables; with a
        sliding_window W, the query at position i sees only keys i - W + 1 .. i (HF's `kv_idx > q_idx - W`).
        """

    def graph_inputs(
        self, max_num_seqs: int, max_blocks_per_seq: int, block_size: int, device: torch.device
    ) -> DecodeGraphInputs:
        """Static buffers and plans for decode batches captured in CUDA graphs (one token per sequence)."""
        if not self.supports_cuda_graphs:
            raise TypeError(f"{type(self).__name__} reads host lengths: it cannot run under CUDA graphs")
        return DecodeGraphInputs(self, max_num_seqs, max_blocks_per_seq, block_size, device)


class DecodeGraphInputs:
    """Device buffers a captured decode graph reads, sized for the largest batch and sliced per batch size.

    `plan(batch_size)` is captured once; before each replay `load(meta, batch_size)` copies a real batch
    in and pads it: padding sequences get slot -1 (no KV write) and length 0 (attention reads nothing).
    A backend whose plan holds more device state (e.g. FlashInfer's wrappers) subclasses this.
    """

    def __init__(
        self,
        backend: AttentionBackend,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.backend = backend
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.slot_mapping = torch.full((max_num_seqs,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((max_num_seqs, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_num_seqs + 1, dtype=torch.int32, device=device)

    def metadata(self, batch_size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            block_size=self.block_size,
            num_seqs=batch_size,
            num_tokens=batch_size,
            num_decodes=batch_size,
            max_query_len=1,
            max_seq_len=self.max_blocks_per_seq * self.block_size,
            query_lens_cpu=None,
            seq_lens_cpu=None,
        )

    def plan(self, batch_size: int) -> Any:
        """The plan a graph of this batch size is captured with (it stays valid for every replay)."""
        return self.backend.prepare(self.metadata(batch_size))

    def load(self, meta: AttentionMetadata, batch_size: int) -> None:
        """Copy a decode-only batch of at most batch_size sequences into the buffers (device copies only)."""
        n = meta.num_seqs
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if batch_size > n:
            self.slot_mapping[n:batch_size].fill_(-1)
            self.seq_lens[n:batch_size].fill_(0)


def get_attention_backend(device: torch.device, quant_policy: int | str = 0) -> AttentionBackend:
    """The Triton backend on CUDA when it is installed, the heads-first torch backend on the CPU, else the
    plain-torch reference.

    quant_policy 8 / 4 (LMDeploy's flag) gives the int8 / int4 KV cache variant of the same choice, `fp8` the
    float8 e4m3 one.
    """
    if quant_policy == "fp8":
        from lmserve.attention.kv_fp8 import fp8_kv_backend

        return fp8_kv_backend(device)
    if quant_policy:
        from lmserve.attention.kv_quant import quantized_kv_backend

        return quantized_kv_backend(device, quant_policy)
    if device.type == "cuda":
        try:
            from lmserve.attention.triton_backend import TritonAttentionBackend
        except ImportError:
            pass
        else:
            return TritonAttentionBackend()
    if device.type == "cpu":
        from lmserve.attention.torch_backend import CPUAttentionBackend

        return CPUAttentionBackend()
    from lmserve.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()
