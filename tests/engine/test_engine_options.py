"""Engine options that must be honoured or refused: tp, model_format, seed, num_cpu_threads (CPU, tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig
from lmserve.layers.quant_formats import awq_quantization_config
from lmserve.models.config import ModelConfig
from lmserve.models.loader import ModelSource, check_model_format, load_model_config, resolve_model
from tests.models.model_helpers import tiny_hf_model

SAMPLED = GenerationConfig(do_sample=True, temperature=1.0, max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama").save_pretrained(folder)
    return folder


def config_json(folder: Path) -> str:
    return str(folder / "config.json")


def sampled_tokens(engine: LLMEngine, prompt: list[int]) -> list[int]:
    engine.add_request(prompt, SAMPLED)
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.token_ids)
    return tokens


def test_tp_that_cannot_split_the_model_is_refused_naming_the_flag(tiny_folder: Path) -> None:
    # tiny llama: 4 query heads, 2 KV heads
    with pytest.raises(ValueError, match="--tp 3 must divide num_attention_heads=4"):
        LLMEngine.from_pretrained(str(tiny_folder), EngineConfig(tp=3, device="cpu", dtype="float32"))
    with pytest.raises(
        ValueError, match="--tp 2 on the CPU runs over gloo, which has no bfloat16 all-reduce"
    ):
        LLMEngine.from_pretrained(str(tiny_folder), EngineConfig(tp=2, device="cpu", dtype="bfloat16"))
    with pytest.raises(ValueError, match="distributed_executor_backend='slurm' must be one of"):
        EngineConfig(tp=2, distributed_executor_backend="slurm")


def test_model_format_must_match_the_checkpoint(tiny_folder: Path) -> None:
    with pytest.raises(ValueError, match="model_format='awq' but .* holds a 'hf' checkpoint"):
        LLMEngine.from_pretrained(str(tiny_folder), EngineConfig(model_format="awq", device="cpu"))
    with pytest.raises(ValueError, match="model_format='hf' but .* holds a 'gguf' checkpoint"):
        LLMEngine.from_pretrained(None, EngineConfig(model_format="hf", device="cpu"))
    source = resolve_model(str(tiny_folder))
    for accepted in ("auto", "hf"):
        check_model_format(accepted, source, load_model_config(source))


def test_explicit_quantized_format_is_checked_against_quantization_config(tiny_folder: Path) -> None:
    source = ModelSource(tiny_folder, "hf")
    awq = ModelConfig.from_hf_config(
        {
            **json.loads((tiny_folder / "config.json").read_text()),
            "quantization_config": awq_quantization_config(4, 128),
        }
    )
    check_model_format("awq", source, awq)
    with pytest.raises(ValueError, match="model_format='w8a8' but .* holds a 'awq' checkpoint"):
        check_model_format("w8a8", source, awq)


def test_engine_seed_makes_unseeded_sampling_reproducible(tiny_folder: Path) -> None:
    def run(seed: int) -> list[int]:
        config = EngineConfig(device="cpu", dtype="float32", session_len=64, max_batch_size=2, seed=seed)
        return sampled_tokens(LLMEngine.from_random_weights(config_json(tiny_folder), config), [1, 2, 3])

    first = run(1)
    assert len(first) == SAMPLED.max_new_tokens
    assert run(1) == first
    assert run(2) != first


def test_num_cpu_threads_applies_to_random_weight_engines(tiny_folder: Path) -> None:
    previous = torch.get_num_threads()
    try:
        config = EngineConfig(device="cpu", session_len=64, max_batch_size=1, num_cpu_threads=1)
        LLMEngine.from_random_weights(config_json(tiny_folder), config)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
