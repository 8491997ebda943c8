"""Test helpers: tiny random HF models, and paged-KV metadata built by hand (no scheduler needed)."""

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

from lmserve.attention.metadata import AttentionMetadata

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
    """Hands out KV blocks to sequences as they grow, and builds the metadata of one forward step.

    Blocks are handed out from the top down so block ids never equal a sequence's logical block index.
    """

    num_blocks: int
    block_size: int
    free_blocks: list[int] = field(default_factory=list)
    block_tables: dict[str, list[int]] = field(default_factory=dict)
    seq_lens: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.free_blocks = list(range(self.num_blocks))

    def step(
        self, chunks: list[tuple[str, list[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """input_ids, positions and metadata for new tokens of each sequence (pass decodes first)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for seq_id, tokens in chunks:
            start = self.seq_lens.get(seq_id, 0)
            self._grow(seq_id, start + len(tokens))
            input_ids += tokens
            positions += range(start, start + len(tokens))
            slots += [self._slot(seq_id, p) for p in range(start, start + len(tokens))]
        meta = self._metadata([seq_id for seq_id, _ in chunks], [len(t) for _, t in chunks], slots)
        return torch.tensor(input_ids), torch.tensor(positions), meta

    def _grow(self, seq_id: str, new_len: int) -> None:
        table = self.block_tables.setdefault(seq_id, [])
        while len(table) * self.block_size < new_len:
            table.append(self.free_blocks.pop())
        self.seq_lens[seq_id] = new_len

    def _slot(self, seq_id: str, position: int) -> int:
        return (
            self.block_tables[seq_id][position // self.block_size] * self.block_size
            + position % self.block_size
        )

    def _metadata(self, seq_ids: list[str], query_lens: list[int], slots: list[int]) -> AttentionMetadata:
        seq_lens = [self.seq_lens[s] for s in seq_ids]
        width = max(len(self.block_tables[s]) for s in seq_ids)
        tables = [self.block_tables[s] + [0] * (width - len(self.block_tables[s])) for s in seq_ids]
        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
            num_decodes += 1
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            block_size=self.block_size,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            num_decodes=num_decodes,
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
