"""Perplexity of a float or quantized model on held-out text (the `eval ppl` command's engine)."""

from __future__ import annotations

import torch
from torch import nn

from lmserve.models.loader import read_json, resolve_model
from lmserve.models.tokenizer import load_tokenizer
from lmserve.quant.calibrate import load_float_model
from lmserve.quant.checkpoint import load_quantized_model
from lmserve.quant.corpus import evaluation_tokens
from lmserve.quant.perplexity import PerplexityResult, perplexity


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
    quant_policy: int = 0,
) -> PerplexityResult:
    if quant_policy != 0:
        raise NotImplementedError(f"{quant_policy=}: KV cache quantization is not wired into eval yet; use 0")
    if num_tokens < 2:
        raise ValueError(f"{num_tokens=} must be >= 2")
    hf_model, tokenizer = load_eval_model(model)
    tokens = evaluation_tokens(tokenizer, dataset, num_tokens)  # type: ignore[arg-type]
    return perplexity(lambda ids: _logits(hf_model, ids), tokens, window, stride)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=False).logits
