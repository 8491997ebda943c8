"""CUDA graphs for decode-only steps: one graph per padded batch size, replayed over static input buffers."""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm import tqdm

from lmserve.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class CUDAGraphRunner:
    """Captures model.forward for decode batches of fixed sizes; pads a batch up to the next size.

    Decode steps launch hundreds of small kernels whose launch cost dominates at small batch;
    a replayed graph launches them all at once. Padding rows have slot -1 (no KV write) and
    sequence length 0 (attention reads nothing), so they cannot disturb real sequences.
    """

    def __init__(
        self, model: Any, kv_caches: list[Any], max_batch_size: int, block_size: int, session_len: int
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sizes = sorted({s for s in CAPTURE_SIZES if s < max_batch_size} | {max_batch_size})
        self.max_blocks = -(-session_len // block_size)
        device = next(model.parameters()).device
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.capture_all()

    def _metadata(self, batch_size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            block_size=self.block_size,
            max_query_len=1,
            max_seq_len=self.max_blocks * self.block_size,
            num_decodes=batch_size,
            query_lens_cpu=[1] * batch_size,
            seq_lens_cpu=[1] * batch_size,
        )

    @torch.inference_mode()
    def capture_all(self) -> None:
        for batch_size in tqdm(
            sorted(self.sizes, reverse=True), desc="Capturing CUDA graphs", leave=False, disable=None
        ):
            self._capture(batch_size)
        torch.cuda.synchronize()

    def _capture(self, batch_size: int) -> None:
        meta = self._metadata(batch_size)
        args = (self.input_ids[:batch_size], self.positions[:batch_size], self.kv_caches, meta)
        for _ in range(2):  # warm up: Triton compiles, cuBLAS picks kernels, outside the graph
            self.model(*args)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[batch_size] = self.model(*args)
        self.graphs[batch_size] = graph

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (
            meta.is_decode_only
            and meta.num_seqs <= self.sizes[-1]
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, inputs: Any) -> torch.Tensor:
        """Copy the batch into the static buffers, replay the graph of the next size up."""
        meta: AttentionMetadata = inputs.metadata
        n = meta.num_seqs
        batch_size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(inputs.input_ids)
        self.positions[:n].copy_(inputs.positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if batch_size > n:
            self.slot_mapping[n:batch_size].fill_(-1)
            self.seq_lens[n:batch_size].fill_(0)
        self.graphs[batch_size].replay()
        return self.outputs[batch_size][:n]
