"""ModelRunner: turns a scheduled batch into flat tensors, runs the model over the paged KV cache, samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from lmserve.attention.metadata import AttentionMetadata
from lmserve.engine.sampler import Sampler, SampleResult, SamplingBatch, SamplingRequest
from lmserve.engine.scheduler import ScheduledRequest
from lmserve.models.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class BatchInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor
    """Row of the last new token of each sequence that samples this step."""


class ModelRunner:
    """Owns the model, its KV cache and the sampler; one `execute()` per engine step."""

    def __init__(
        self,
        model: Any,
        model_config: ModelConfig,
        kv_caches: list[Any],
        block_size: int,
        device: torch.device,
        eos_token_ids: tuple[int, ...],
        graph_runner: Any = None,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self.graph_runner = graph_runner
        self.vocab_size = model_config.vocab_size

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> SampleResult | None:
        """Run one step; returns sampled tokens for the entries whose `samples` is True (in order)."""
        inputs = self.prepare_inputs(scheduled)
        hidden = self._forward(inputs)
        sampling = [s for s in scheduled if s.samples]
        if not sampling:
            return None
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        batch = SamplingBatch.build(
            [self._sampling_request(s) for s in sampling], self.eos_token_ids, logits.shape[-1], self.device
        )
        return self.sampler.sample(logits, batch)

    def _forward(self, inputs: BatchInputs) -> torch.Tensor:
        if self.graph_runner is not None and self.graph_runner.can_run(inputs.metadata):
            return self.graph_runner.run(inputs)
        return self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)

    @staticmethod
    def _sampling_request(s: ScheduledRequest) -> SamplingRequest:
        r = s.request
        return SamplingRequest(r.gen_config, r.token_ids, r.num_prompt_tokens, r.generator)

    def prepare_inputs(self, scheduled: list[ScheduledRequest]) -> BatchInputs:
        """Flatten the batch: token ids, positions, KV slots, block tables (decodes first)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        bs = self.block_size
        for s in scheduled:
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            input_ids.extend(r.token_ids[start:end])
            positions.extend(range(start, end))
            table = r.block_table
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(s.num_new_tokens)
            seq_lens.append(end)
            if s.samples:
                logits_indices.append(len(input_ids) - 1)
        max_blocks = max(len(s.request.block_table) for s in scheduled)
        block_tables = [
            s.request.block_table + [0] * (max_blocks - len(s.request.block_table)) for s in scheduled
        ]
        num_decodes = sum(1 for q in query_lens if q == 1)
        query_start_loc = [0]
        for q in query_lens:
            query_start_loc.append(query_start_loc[-1] + q)
        metadata = AttentionMetadata(
            slot_mapping=self._tensor(slot_mapping, torch.int64),
            query_start_loc=self._tensor(query_start_loc, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            block_tables=self._tensor(block_tables, torch.int32),
            block_size=bs,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            num_decodes=num_decodes,
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        return BatchInputs(
            input_ids=self._tensor(input_ids, torch.int64),
            positions=self._tensor(positions, torch.int64),
            metadata=metadata,
            logits_indices=self._tensor(logits_indices, torch.int64),
        )

    def _tensor(self, values: list[Any], dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cpu":
            return torch.tensor(values, dtype=dtype)
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)
