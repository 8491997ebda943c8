"""FP8 W8A8 (`--model-format fp8`) on the CPU: e4m3 rounding, the three checkpoint layouts, the engine, eval ppl."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig
from lmserve.kernels.fp8 import FP8, FP8_MAX, quantize_rows_fp8
from lmserve.layers.fp8 import Fp8Linear, fp8_layout
from lmserve.layers.quant_formats import quant_method
from lmserve.models.loader import check_model_format, load_model_config, resolve_model
from tests.unit.test_quant_tiny import _tiny_model

E4M3_HALF_ULP = 2.0**-4
"""e4m3 keeps 3 mantissa bits: a normal value rounds to within 2**-4 of itself, relatively."""


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_rows_round_to_e4m3_with_the_row_absmax_at_448() -> None:
    x = torch.randn(8, 256) * torch.logspace(-3, 3, 8).unsqueeze(1)  # rows six decades apart
    q, scale = quantize_rows_fp8(x)
    assert q.dtype == FP8 and scale.shape == (8, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((8,), FP8_MAX))
    dequantized = q.float() * scale
    normal = x.abs() > scale * 2.0**-6  # e4m3's smallest normal, in the row's units
    assert ((dequantized - x).abs() <= E4M3_HALF_ULP * x.abs() + 1e-12)[normal].all()
    assert torch.equal(quantize_rows_fp8(torch.zeros(2, 16))[0].float(), torch.zeros(2, 16))


def quantized_linear(weight: torch.Tensor, layout: str, block: tuple[int, int] | None = None) -> Fp8Linear:
    """An Fp8Linear loaded the way a checkpoint of `layout` stores `weight`."""
    n, k = weight.shape
    linear = Fp8Linear(k, n, False, layout, block)
    if layout == "dynamic":
        linear.weight.data.copy_(weight)
    elif layout == "channel":
        q, scale = quantize_rows_fp8(weight)
        linear.weight.data.copy_(q)
        linear.weight_scale.data.copy_(scale)
    else:  # block: one scale per block_n x block_k tile, as HF / DeepSeek FP8 checkpoints store it
        assert block is not None
        tiles = weight.reshape(n // block[0], block[0], k // block[1], block[1])
        scale_inv = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(1e-12)
        q = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(n, k)
        linear.weight.data.copy_(q)
        linear.weight_scale_inv.data.copy_(scale_inv)
    linear.prepare_for_inference()
    return linear


@pytest.mark.parametrize("layout,block", [("dynamic", None), ("channel", None), ("block", (32, 64))])
def test_every_layout_tracks_the_float_linear(layout: str, block: tuple[int, int] | None) -> None:
    torch.manual_seed(0)
    weight, x = torch.randn(96, 128) * 0.02, torch.randn(5, 128)
    linear = quantized_linear(weight, layout, block)
    assert linear.weight.dtype == FP8 and linear.weight_scale.shape == (96, 1)
    error = relative_error(linear(x), F.linear(x, weight))
    # weights and activations each rounded once to e4m3: a few percent, and never zero (it did quantize)
    assert 1e-3 < error < 0.06, error


def test_fp8_configs_are_recognized_and_unsupported_ones_named() -> None:
    channel = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
            }
        },
    }
    assert quant_method(channel) == "fp8" and fp8_layout(channel) == ("channel", None)
    block = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert quant_method(block) == "fp8" and fp8_layout(block) == ("block", (128, 128))
    with pytest.raises(ValueError, match="one scale per tensor"):
        fp8_layout({"quant_method": "fp8", "activation_scheme": "dynamic"})
    with pytest.raises(ValueError, match="static activation scales"):
        fp8_layout({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]})


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float Llama with a tokenizer (eval ppl needs one)."""
    return _tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_model_format_fp8_quantizes_a_float_checkpoint_at_load(tiny_folder: Path) -> None:
    source = resolve_model(str(tiny_folder))
    check_model_format("fp8", source, load_model_config(source))  # a float checkpoint: accepted
    config = EngineConfig(device="cpu", dtype="float32", model_format="fp8")
    engine = LLMEngine.from_pretrained(str(tiny_folder), config)
    layer = engine.runner.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Fp8Linear) and layer.mlp.down_proj.weight.dtype == FP8
    float_engine = LLMEngine.from_pretrained(str(tiny_folder), EngineConfig(device="cpu", dtype="float32"))
    hidden = torch.randn(3, engine.model_config.hidden_size)
    fp8_logits = engine.runner.model.compute_logits(layer.mlp(hidden))
    float_logits = float_engine.runner.model.compute_logits(
        float_engine.runner.model.model.layers[0].mlp(hidden)
    )
    assert 1e-4 < relative_error(fp8_logits, float_logits) < 0.1


def test_model_format_fp8_is_refused_for_another_quantized_checkpoint(
    tmp_path: Path, tiny_folder: Path
) -> None:
    from lmserve.layers.quant_formats import awq_quantization_config
    from lmserve.models.config import ModelConfig
    from lmserve.models.loader import ModelSource

    hf = json.loads((tiny_folder / "config.json").read_text())
    awq = ModelConfig.from_hf_config({**hf, "quantization_config": awq_quantization_config(4, 128)})
    with pytest.raises(ValueError, match="model_format='fp8' but .* holds a 'awq' checkpoint"):
        check_model_format("fp8", ModelSource(tiny_folder, "hf"), awq)


def test_eval_ppl_model_format_fp8_is_close_to_float(tiny_folder: Path) -> None:
    from lmserve.quant.evaluate import evaluate_perplexity

    plain = evaluate_perplexity(str(tiny_folder), "kjv", 300, 128, 128, quant_policy=0)
    fp8 = evaluate_perplexity(str(tiny_folder), "kjv", 300, 128, 128, model_format="fp8")
    assert fp8.num_scored_tokens == plain.num_scored_tokens
    assert fp8.perplexity != plain.perplexity and fp8.perplexity == pytest.approx(plain.perplexity, rel=0.02)


def test_lm_head_fp8_is_the_rows_of_the_float_head_rounded_to_e4m3(tiny_folder: Path) -> None:
    """--lm-head-fp8 (untied head): the 16-bit lm_head is replaced by quantize_rows_fp8 of the checkpoint's, the
    logits are its product (float32 off CUDA), and they stay within e4m3's rounding of the float logits."""
    from lmserve.cli.engine_args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--device", "cpu", "--dtype", "float32", "--lm-head-fp8"])
    config = engine_config_from_args(args)
    assert config.lm_head_fp8
    engine = LLMEngine.from_pretrained(str(tiny_folder), config)
    float_engine = LLMEngine.from_pretrained(str(tiny_folder), EngineConfig(device="cpu", dtype="float32"))
    model, float_model = engine.runner.model, float_engine.runner.model
    assert model.lm_head is None and model.lm_head_fp8 is not None
    with pytest.raises(RuntimeError, match="replaced by its FP8 copy"):
        model.lm_head_weight()
    q, scale = model.lm_head_fp8
    q_ref, scale_ref = quantize_rows_fp8(float_model.lm_head.weight)
    assert q.dtype == FP8 and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(scale, scale_ref)
    hidden = torch.randn(5, engine.model_config.hidden_size)
    logits, float_logits = model.compute_logits(hidden), float_model.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == float_logits.shape
    assert 1e-4 < relative_error(logits, float_logits) < 4 * E4M3_HALF_ULP


def test_lm_head_fp8_of_a_tied_model_keeps_the_embedding(tmp_path: Path) -> None:
    folder = _tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    engine = LLMEngine.from_pretrained(
        str(folder), EngineConfig(device="cpu", dtype="float32", lm_head_fp8=True)
    )
    model = engine.runner.model
    embedding = model.model.embed_tokens.weight
    assert embedding.dtype == torch.float32  # the token lookup still reads the float rows
    q, scale = model.lm_head_fp8
    q_ref, _ = quantize_rows_fp8(embedding)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    config = GenerationConfig(max_new_tokens=6, ignore_eos=True, do_sample=False)
    engine.add_request([3, 5, 7], config)
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.token_ids)
    assert len(tokens) == 6


def test_eval_ppl_lm_head_fp8_is_close_to_float(tiny_folder: Path) -> None:
    from lmserve.quant.evaluate import evaluate_perplexity

    plain = evaluate_perplexity(str(tiny_folder), "kjv", 300, 128, 128, quant_policy=0)
    fp8 = evaluate_perplexity(str(tiny_folder), "kjv", 300, 128, 128, lm_head_fp8=True)
    assert fp8.num_scored_tokens == plain.num_scored_tokens
    assert fp8.perplexity != plain.perplexity and fp8.perplexity == pytest.approx(plain.perplexity, rel=0.02)
