"""InternLM2: the Llama decoder under InternLM2's weight names, with its per-KV-group fused wqkv."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from lmserve.distributed.parallel_state import tp_rank, tp_size
from lmserve.distributed.sharding import TensorSlice, part
from lmserve.layers.linear import output_dims_of
from lmserve.models.llama import LlamaAttention, LlamaForCausalLM

# InternLM2 name piece -> HF Llama name piece
RENAMES = {
    "model.tok_embeddings.": "model.embed_tokens.",
    ".attention.wo.": ".self_attn.o_proj.",
    ".feed_forward.w1.": ".mlp.gate_proj.",
    ".feed_forward.w3.": ".mlp.up_proj.",
    ".feed_forward.w2.": ".mlp.down_proj.",
    ".attention_norm.": ".input_layernorm.",
    ".ffn_norm.": ".post_attention_layernorm.",
}


class InternLM2ForCausalLM(LlamaForCausalLM):
    """Same compute as Llama; load_weights translates names and splits wqkv into q/k/v."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self.to_llama_weights(weights))

    def to_llama_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """InternLM2 checkpoint names/layout -> HF Llama names/layout."""
        for name, tensor in weights:
            if ".attention.wqkv." in name:
                yield from self.split_wqkv(name, tensor)
            else:
                yield rename(name), tensor

    def weight_slice(self, name: str, shape: tuple[int, ...]) -> TensorSlice | None:
        """Under tp: wqkv keeps the rank's whole KV groups (contiguous rows); split_wqkv cuts the q heads
        of a replicated group. Other tensors split as their Llama names do."""
        if tp_size() == 1 or ".attention.wqkv." not in name:
            return super().weight_slice(rename(name), shape)
        attention, param = self.wqkv_target(name)
        dim = output_dims_of(attention.qkv_proj)[param]
        return part(
            shape, dim, attention.first_kv_head, attention.num_kv_heads, self.config.num_key_value_heads, name
        )

    def wqkv_target(self, name: str) -> tuple[LlamaAttention, str]:
        """(the layer's LlamaAttention, param name) of a wqkv checkpoint tensor."""
        prefix, _, param = name.partition(".attention.wqkv.")
        layer = int(prefix.rsplit(".", 1)[1])
        attention = self.get_submodule(f"model.layers.{layer}.self_attn")
        assert isinstance(attention, LlamaAttention)
        return attention, param

    def split_wqkv(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """wqkv rows are grouped per KV head: [q heads of the group, 1 k head, 1 v head] x num_kv_heads.

        `tensor` holds this rank's KV groups (all of them at tp 1). When KV heads are replicated
        (num_key_value_heads < tp) several ranks share a group and each keeps its run of its q heads.
        """
        prefix, _, param = name.partition(".attention.wqkv.")
        attention, _ = self.wqkv_target(name)
        dim = output_dims_of(attention.qkv_proj)[param]
        group = self.config.num_attention_heads // self.config.num_key_value_heads
        heads = tensor.unflatten(dim, (attention.num_kv_heads, group + 2, -1))
        first_q = tp_rank() * attention.num_heads % group  # 0 unless the group is shared by several ranks
        num_q = min(group, attention.num_heads)
        for projection, start, count in (
            ("q_proj", first_q, num_q),
            ("k_proj", group, 1),
            ("v_proj", group + 1, 1),
        ):
            yield (
                f"{prefix}.self_attn.{projection}.{param}",
                heads.narrow(dim + 1, start, count).flatten(dim, dim + 2),
            )


def rename(name: str) -> str:
    if name.startswith("output."):
        return "lm_head." + name.removeprefix("output.")
    for old, new in RENAMES.items():
        name = name.replace(old, new)
    return name
