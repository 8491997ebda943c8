"""Perplexity of a float or quantized model on held-out text (the `eval ppl` command's engine).

Two ways to run the model: transformers' module (the independent reference; quantized checkpoints run
on lmserve's quantized linears), or lmserve's own engine model over its paged KV cache, which is where
KV cache quantization (`quant_policy` 8 / 4) lives. Each window is one prefill that writes its K/V into
the cache and attends through it, so with a quantized cache every score reads quantized keys and values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmserve.attention.metadata import SequenceChunk, StepBatch, build_step_batch
from lmserve.models.loader import read_json, resolve_model
from lmserve.models.tokenizer import load_tokenizer
from lmserve.quant.calibrate import load_float_model
from lmserve.quant.checkpoint import load_quantized_model
from lmserve.quant.corpus import evaluation_tokens
from lmserve.quant.perplexity import LogitsFn, PerplexityResult, perplexity


def load_eval_model(model: str | None) -> tuple[nn.Module, object]:
    """(HF module in float32, tokenizer): quantized checkpoints run on lmserve's quantized linears."""
    source = resolve_model(model)
    if source.kind == "hf" and read_json(source.path / "config.json").get("quantization_config"):
        return load_quantized_model(source.path), load_tokenizer(source)
    float_model = load_float_model(model)
    return float_model.model, float_model.tokenizer


def evaluate_perplexity(
    model: str | None,
    dataset: str,
    num_tokens: int = 20000,
    window: int = 512,
    stride: int = 512,
    quant_policy: int | str | None = None,
    model_format: str = "auto",
    lm_head_fp8: bool = False,
) -> PerplexityResult:
    """Perplexity with transformers' module, or lmserve's engine when a KV cache policy, a model format other
    than auto or the FP8 lm_head is asked for (`fp8` quantizes a float checkpoint at load time)."""
    if num_tokens < 2:
        raise ValueError(f"{num_tokens=} must be >= 2")
    if quant_policy is None and model_format == "auto" and not lm_head_fp8:
        hf_model, tokenizer = load_eval_model(model)
        logits_fn: LogitsFn = lambda ids: _hf_logits(hf_model, ids)  # noqa: E731
    else:
        logits_fn, tokenizer = engine_logits_fn(model, quant_policy or 0, window, model_format, lm_head_fp8)
    tokens = evaluation_tokens(tokenizer, dataset, num_tokens)  # type: ignore[arg-type]
    return perplexity(logits_fn, tokens, window, stride)


@torch.no_grad()
def _hf_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=False).logits


def engine_logits_fn(
    model: str | None,
    quant_policy: int | str,
    window: int,
    model_format: str = "auto",
    lm_head_fp8: bool = False,
) -> tuple[LogitsFn, Any]:
    """(window scorer, tokenizer) over lmserve's float32 engine model with a KV cache of `quant_policy`."""
    from lmserve.config import QUANT_POLICIES, EngineConfig
    from lmserve.engine.engine import LLMEngine

    if quant_policy not in QUANT_POLICIES:
        raise ValueError(f"{quant_policy=} must be one of {QUANT_POLICIES}")
    config = EngineConfig(
        dtype="float32",
        quant_policy=quant_policy,
        session_len=window,
        max_batch_size=1,
        eager_mode=True,
        model_format=model_format,
        lm_head_fp8=lm_head_fp8,
    )
    engine = LLMEngine.from_pretrained(model, config)
    return EnginePrefill(engine.runner), engine.tokenizer


class EnginePrefill:
    """Scores one window as a single-sequence prefill through the engine's model and KV cache."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [1, length] -> float32 logits [1, length, vocab]."""
        runner = self.runner
        batch = prefill_batch(ids[0].tolist(), runner.block_size, runner.device)
        return runner.model.compute_logits(runner.forward(batch)).unsqueeze(0)


def prefill_batch(token_ids: list[int], block_size: int, device: torch.device) -> StepBatch:
    """One sequence of new tokens in blocks 0, 1, ... (every window reuses them: no prefix)."""
    block_table = list(range(-(-len(token_ids) // block_size)))
    return build_step_batch([SequenceChunk(token_ids, 0, block_table)], block_size, device)
