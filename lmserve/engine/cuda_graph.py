"""CUDA graphs for decode-only steps: one graph per padded batch size, replayed over static input buffers."""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm import tqdm

from lmserve.attention.backend import AttentionBackend
from lmserve.attention.metadata import AttentionMetadata, StepBatch

logger = logging.getLogger(__name__)

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class CUDAGraphRunner:
    """Captures model.forward for decode batches of fixed sizes; pads a batch up to the next size.

    Decode steps launch hundreds of small kernels whose launch cost dominates at small batch;
    a replayed graph launches them all at once. The backend owns the attention side of the static
    inputs (`backend.graph_inputs`): padding rows have slot -1 (no KV write) and sequence length 0
    (attention reads nothing), so they cannot disturb real sequences.
    """

    def __init__(
        self,
        model: Any,
        backend: AttentionBackend,
        kv_caches: list[Any],
        max_batch_size: int,
        block_size: int,
        session_len: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sorted({s for s in CAPTURE_SIZES if s < max_batch_size} | {max_batch_size})
        self.max_blocks = -(-session_len // block_size)
        device = next(model.parameters()).device
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.attention = backend.graph_inputs(n, self.max_blocks, block_size, device)
        self.plans: dict[int, Any] = {}  # kept alive: a graph reads what its plan points to
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.capture_all()

    @torch.inference_mode()
    def capture_all(self) -> None:
        for batch_size in tqdm(
            sorted(self.sizes, reverse=True), desc="Capturing CUDA graphs", leave=False, disable=None
        ):
            self._capture(batch_size)
        torch.cuda.synchronize()

    def _capture(self, batch_size: int) -> None:
        self.plans[batch_size] = plan = self.attention.plan(batch_size)
        args = (self.input_ids[:batch_size], self.positions[:batch_size], self.kv_caches, plan)
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

    def run(self, batch: StepBatch) -> torch.Tensor:
        """Copy the batch into the static buffers, replay the graph of the next size up."""
        n = batch.metadata.num_seqs
        batch_size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.attention.load(batch.metadata, batch_size)
        self.graphs[batch_size].replay()
        return self.outputs[batch_size][:n]
