"""InternLM2: the Llama decoder under InternLM2's weight names, with its per-KV-group fused wqkv."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from lmserve.layers.linear import output_dims_of
from lmserve.models.llama import LlamaForCausalLM

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

    def split_wqkv(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """wqkv rows are grouped per KV head: [q heads of the group, 1 k head, 1 v head] x num_kv_heads."""
        prefix, _, param = name.partition(".attention.wqkv.")
        layer = int(prefix.rsplit(".", 1)[1])
        dim = output_dims_of(self.get_submodule(f"model.layers.{layer}.self_attn.qkv_proj"))[param]
        num_kv_heads = self.config.num_key_value_heads
        group = self.config.num_attention_heads // num_kv_heads
        heads = tensor.unflatten(dim, (num_kv_heads, group + 2, -1))
        for projection, start, count in (
            ("q_proj", 0, group),
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
