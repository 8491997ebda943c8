"""Test helpers: tiny random HF models, and paged-KV step batches over hand-run block tables (no scheduler)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lmserve.attention.metadata import SequenceChunk, StepBatch, build_step_batch

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so all three llama3 frequency bands occur at head_dim 16
}


def tiny_hf_model(kind: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random float32 HF model: llama (GQA, tied, llama3 rope), llama_linear, mistral, qwen2."""
    torch.manual_seed(seed)
    model: PreTrainedModel
    if kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(**{**TINY, "tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE, **overrides})
        )
    elif kind == "llama_linear":
        rope = {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}
        model = LlamaForCausalLM(
            LlamaConfig(**{**TINY, "rope_parameters": rope, "attention_bias": True, **overrides})
        )
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**{**TINY, "head_dim": 16, **overrides}))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{**TINY, **overrides}))
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    model.config.architectures = [type(model).__name__]
    _randomize_biases(model)
    return model.float().eval()


def _randomize_biases(model: PreTrainedModel) -> None:
    # HF initializes biases to zero, which would let a bias-loading bug pass unseen
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)


def hf_config_dict(model: PreTrainedModel) -> dict[str, Any]:
    """The dict that model.save_pretrained would write as config.json."""
    return model.config.to_dict()


@torch.no_grad()
def hf_logits(model: PreTrainedModel, token_ids: list[int]) -> torch.Tensor:
    """float32 logits [len(token_ids), V] of one full sequence."""
    return model(torch.tensor([token_ids])).logits[0].float()


@dataclass
class PagedSequences:
    """Hands out KV blocks to sequences as they grow, and builds the batch of one forward step.

    Blocks are handed out from the top down so block ids never equal a sequence's logical block index.
    """

    num_blocks: int
    block_size: int
    free_blocks: list[int] = field(default_factory=list)
    block_tables: dict[str, list[int]] = field(default_factory=dict)
    seq_lens: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.free_blocks = list(range(self.num_blocks))

    def step(self, chunks: list[tuple[str, list[int]]]) -> StepBatch:
        """The batch of one forward step over new tokens of each sequence (pass decodes first)."""
        sequence_chunks = []
        for seq_id, tokens in chunks:
            start = self.seq_lens.get(seq_id, 0)
            self._grow(seq_id, start + len(tokens))
            sequence_chunks.append(SequenceChunk(tokens, start, self.block_tables[seq_id]))
        return build_step_batch(sequence_chunks, self.block_size, "cpu")

    def _grow(self, seq_id: str, new_len: int) -> None:
        table = self.block_tables.setdefault(seq_id, [])
        while len(table) * self.block_size < new_len:
            table.append(self.free_blocks.pop())
        self.seq_lens[seq_id] = new_len
