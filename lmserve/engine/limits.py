"""What a request may ask of an engine (context, KV capacity, vocabulary), checked before it is queued."""

from __future__ import annotations

from dataclasses import dataclass

from lmserve.generation import GenerationConfig


@dataclass(frozen=True)
class EngineLimits:
    """The facts validation needs; front ends of an engine-core process get them in its ready message."""

    session_len: int
    num_blocks: int
    block_size: int
    vocab_size: int

    @property
    def kv_capacity(self) -> int:
        """Tokens the whole KV cache holds."""
        return self.num_blocks * self.block_size


def validate_request(prompt_token_ids: list[int], gen_config: GenerationConfig, limits: EngineLimits) -> int:
    """Check a request can ever run; returns its resolved max new tokens. ValueError naming the limit otherwise."""
    num_prompt = len(prompt_token_ids)
    if num_prompt == 0:
        raise ValueError("the prompt is empty: at least one token is needed")
    session_len = limits.session_len
    if num_prompt >= session_len:
        raise ValueError(
            f"the prompt has {num_prompt} tokens but this model's context (session_len) is {session_len}; "
            "shorten the prompt"
        )
    room = session_len - num_prompt
    if gen_config.max_new_tokens is not None and gen_config.max_new_tokens > room:
        raise ValueError(
            f"prompt ({num_prompt} tokens) + max_new_tokens ({gen_config.max_new_tokens}) = "
            f"{num_prompt + gen_config.max_new_tokens} exceeds the context of {session_len} tokens"
        )
    max_new = gen_config.max_new_tokens or room
    if -(-(num_prompt + max_new) // limits.block_size) > limits.num_blocks:
        raise ValueError(
            f"prompt + max_new_tokens = {num_prompt + max_new} tokens exceed the whole KV cache "
            f"({limits.kv_capacity} tokens); raise --cache-max-entry-count or lower max_tokens"
        )
    _check_token_ids(prompt_token_ids, gen_config, limits.vocab_size)
    if gen_config.n != 1:
        raise ValueError(
            f"n={gen_config.n}: the engine runs one sequence per request; submit GenerationConfig.fan_out()"
        )
    return max_new


def validate_embedding_request(prompt_token_ids: list[int], limits: EngineLimits) -> None:
    """Check a prompt can be embedded (a whole context's worth may be); ValueError naming the limit otherwise."""
    num_prompt = len(prompt_token_ids)
    if num_prompt == 0:
        raise ValueError("the input is empty: at least one token is needed")
    if num_prompt > limits.session_len:
        raise ValueError(
            f"the input has {num_prompt} tokens but this model's context (session_len) is "
            f"{limits.session_len}; shorten the input"
        )
    if -(-num_prompt // limits.block_size) > limits.num_blocks:
        raise ValueError(
            f"the input ({num_prompt} tokens) exceeds the whole KV cache ({limits.kv_capacity} tokens)"
        )
    _check_token_ids(prompt_token_ids, GenerationConfig(), limits.vocab_size)


def _check_token_ids(prompt_token_ids: list[int], gen_config: GenerationConfig, vocab_size: int) -> None:
    if any(t < 0 or t >= vocab_size for t in prompt_token_ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    outside = sorted(t for t in gen_config.logit_bias or {} if t >= vocab_size)
    if outside:
        raise ValueError(f"logit_bias token ids {outside} are outside the vocabulary [0, {vocab_size})")
