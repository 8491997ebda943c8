"""ModelRunner: turns a scheduled batch into a StepBatch, runs the model over the paged KV cache, samples."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmserve.attention.backend import AttentionBackend
from lmserve.attention.metadata import SequenceChunk, StepBatch, build_step_batch
from lmserve.distributed.step_channel import StepChannel
from lmserve.engine.cuda_graph import CUDAGraphRunner
from lmserve.engine.pooling import pool_chunk
from lmserve.engine.request import Request
from lmserve.engine.sampler import DeviceSample, Sampler, SamplingBatch
from lmserve.engine.scheduler import ScheduledRequest
from lmserve.models.config import ModelConfig

if TYPE_CHECKING:
    from lmserve.lora.manager import LoRAManager

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingTokens:
    """The tokens a launched step sampled, still on the device, where the next step's decodes read them.

    A request with a pending token (overlap scheduling) is scheduled a decode of it before anyone knows
    it: its input id is a placeholder, -1 - row, replaced on the device by row `row` of `token_ids`.
    """

    token_ids: torch.Tensor
    row_of: dict[Request, int]

    def placeholder(self, request: Request) -> int:
        return -1 - self.row_of[request]


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
    def execute(
        self, scheduled: list[ScheduledRequest], pending: PendingTokens | None = None
    ) -> DeviceSample | None:
        """Launch one step; its sampled tokens (entries whose `samples` is True, in order) stay on the device.

        `pending`: the previous step's tokens, the input of this step's decodes of pending tokens.
        Nothing here waits for the device on CUDA, so the host can go on while the step runs.
        """
        chunks = self.step_chunks(scheduled, pending)
        if self.step_channel is not None:
            self.step_channel.send(chunks)
        if self.lora is not None:
            self.lora.context.begin_step([(s.request.lora_slot, s.num_new_tokens) for s in scheduled])
        feed = pending.token_ids if pending is not None else None
        hidden, logits = self.run_chunks(chunks, feed)
        self._pool(scheduled, hidden)
        if logits is None:
            return None
        # the requests are the sampler's rows as they are (a Request has every SamplingRow field)
        sampling = [s.request for s in scheduled if s.samples]
        sampling_batch = SamplingBatch.build(sampling, self.eos_token_ids, logits.shape[-1], self.device)
        return self.sampler.sample_on_device(logits, sampling_batch)

    @torch.inference_mode()
    def run_chunks(
        self, chunks: list[SequenceChunk], feed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, logits of the sampling rows or None) of one step; every tp rank runs it, workers drop
        both. `feed`: the tokens that placeholder input ids (`PendingTokens`) stand for."""
        batch = build_step_batch(chunks, self.block_size, self.device)
        if feed is not None:
            batch = _feed_placeholders(batch, chunks, feed)
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
    def step_chunks(
        scheduled: list[ScheduledRequest], pending: PendingTokens | None = None
    ) -> list[SequenceChunk]:
        """The sequences of this step (the scheduler puts decodes first); pending tokens become placeholders."""
        chunks = []
        for s in scheduled:
            r = s.request
            start = r.num_computed_tokens
            end = start + s.num_new_tokens
            token_ids = r.token_ids
            tokens = token_ids[start:end]
            if end > len(token_ids):
                assert pending is not None and len(tokens) + 1 == s.num_new_tokens, (
                    "one pending token, in flight"
                )
                tokens.append(pending.placeholder(r))
            chunks.append(SequenceChunk(tokens, start, r.block_table_ints(), s.samples))
        return chunks

    def step_batch(self, scheduled: list[ScheduledRequest]) -> StepBatch:
        """The flat batch of this step."""
        return build_step_batch(self.step_chunks(scheduled), self.block_size, self.device)


def _feed_placeholders(batch: StepBatch, chunks: list[SequenceChunk], feed: torch.Tensor) -> StepBatch:
    """The batch with its placeholder input ids (`PendingTokens`) replaced by their tokens in `feed`.

    Read on the host from the chunks (a placeholder is only ever a chunk's last token): none, nothing to do;
    the overlapped decode batch, every token a placeholder for consecutive rows, is a slice of `feed`
    (no kernel); anything else goes through `_fill_placeholders` on the device.
    """
    rows = [-1 - c.token_ids[-1] for c in chunks if c.token_ids[-1] < 0]
    if not rows:
        return batch
    first = rows[0]
    if len(rows) == batch.metadata.num_tokens and rows == list(range(first, first + len(rows))):
        return dataclasses.replace(batch, input_ids=feed[first : first + len(rows)])
    return _fill_placeholders(batch, feed)


def _fill_placeholders(batch: StepBatch, feed: torch.Tensor) -> StepBatch:
    """Input ids -1 - row become feed[row], on the device: no wait for the step that sampled them."""
    ids = batch.input_ids
    rows = (-1 - ids).clamp_(min=0)
    return dataclasses.replace(batch, input_ids=torch.where(ids < 0, feed[rows], ids))
