"""ModelRunner: turns a scheduled batch into a StepBatch, runs the model over the paged KV cache, samples."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from lmserve.attention.backend import AttentionBackend
from lmserve.attention.metadata import SequenceChunk, StepBatch, build_step_batch
from lmserve.distributed.step_channel import StepChannel
from lmserve.engine.cuda_graph import CUDAGraphRunner
from lmserve.engine.pooling import pool_chunk
from lmserve.engine.sampler import Sampler, SampleResult, SamplingBatch, SamplingRequest
from lmserve.engine.scheduler import ScheduledRequest
from lmserve.models.config import ModelConfig

if TYPE_CHECKING:
    from lmserve.lora.manager import LoRAManager

logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model, its attention backend and KV cache, and the sampler; one `execute()` per engine step."""

    def __init__(
        self,
        model: Any,
        model_config: ModelConfig,
        backend: AttentionBackend,
        kv_caches: list[Any],
        block_size: int,
        device: torch.device,
        eos_token_ids: tuple[int, ...],
        graph_runner: CUDAGraphRunner | None = None,
        step_channel: StepChannel | None = None,
        lora: LoRAManager | None = None,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self.graph_runner = graph_runner
        self.vocab_size = model_config.vocab_size
        self.step_channel = step_channel
        """Set on tp rank 0: every step goes to the workers before rank 0 runs it too."""
        self.lora = lora
        """The LoRA adapters loaded into the model (None: none); each step tells them every token's slot."""

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> SampleResult | None:
        """Run one step; returns sampled tokens for the entries whose `samples` is True (in order)."""
        chunks = self.step_chunks(scheduled)
        if self.step_channel is not None:
            self.step_channel.send(chunks)
        if self.lora is not None:
            self.lora.context.begin_step([(s.request.lora_slot, s.num_new_tokens) for s in scheduled])
        hidden, logits = self.run_chunks(chunks)
        self._pool(scheduled, hidden)
        if logits is None:
            return None
        sampling = [s for s in scheduled if s.samples]
        sampling_batch = SamplingBatch.build(
            [self._sampling_request(s) for s in sampling], self.eos_token_ids, logits.shape[-1], self.device
        )
        return self.sampler.sample(logits, sampling_batch)

    @torch.inference_mode()
    def run_chunks(self, chunks: list[SequenceChunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, logits of the sampling rows or None) of one step; every tp rank runs it, workers drop
        both."""
        batch = build_step_batch(chunks, self.block_size, self.device)
        hidden = self.forward(batch)
        if not any(chunk.samples for chunk in chunks):
            return hidden, None
        return hidden, self.model.compute_logits(hidden[batch.logits_indices])

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Hidden states [T, H] of the batch: a graph replay for decode-only batches it covers, else eager."""
        if self.graph_runner is not None and self.graph_runner.can_run(batch.metadata):
            return self.graph_runner.run(batch)
        plan = self.backend.prepare(batch.metadata)
        return self.model(batch.input_ids, batch.positions, self.kv_caches, plan)

    @staticmethod
    def _pool(scheduled: list[ScheduledRequest], hidden: torch.Tensor) -> None:
        """Fold each embedding request's rows of the step into its pooling state (rows follow `scheduled`)."""
        row = 0
        for s in scheduled:
            r = s.request
            if r.pooling is not None:
                chunk = hidden[row : row + s.num_new_tokens]
                r.pooled = pool_chunk(r.pooling, r.pooled, chunk, r.num_computed_tokens, s.reaches_end)
            row += s.num_new_tokens

    @staticmethod
    def _sampling_request(s: ScheduledRequest) -> SamplingRequest:
        r = s.request
        return SamplingRequest(r.gen_config, r.token_ids, r.num_prompt_tokens, r.generator, r.grammar)

    @staticmethod
    def step_chunks(scheduled: list[ScheduledRequest]) -> list[SequenceChunk]:
        """The sequences of this step (the scheduler puts decodes first)."""
        chunks = []
        for s in scheduled:
            r = s.request
            start = r.num_computed_tokens
            tokens = r.token_ids[start : start + s.num_new_tokens]
            chunks.append(SequenceChunk(tokens, start, r.block_table, s.samples))
        return chunks

    def step_batch(self, scheduled: list[ScheduledRequest]) -> StepBatch:
        """The flat batch of this step."""
        return build_step_batch(self.step_chunks(scheduled), self.block_size, self.device)
