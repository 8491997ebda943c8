"""loader.py / gguf.py against transformers: model resolution, configs and weights (GGUF and HF folders)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lmserve.models.gguf import unpermute_rope_rows
from lmserve.models.loader import (
    ModelSource,
    iter_weights,
    load_generation_defaults,
    load_model_config,
    resolve_model,
)

TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_theta=50000.0,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(scope="session")
def smollm2_source(smollm2_gguf_path: Path) -> ModelSource:
    return ModelSource(smollm2_gguf_path.parent, "gguf", smollm2_gguf_path.name)


@pytest.fixture(scope="session")
def smollm2_hf_state_dict(smollm2_gguf_path: Path) -> dict[str, torch.Tensor]:
    """transformers' own GGUF loader: the independent truth for names, dequantization and un-permuting."""
    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name, dtype=torch.float32
    )
    return model.state_dict()


@pytest.fixture(scope="session")
def tiny_llama_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    model.generation_config.temperature = 0.7
    model.generation_config.top_p = 0.9
    model.generation_config.do_sample = True
    model.generation_config.eos_token_id = [2, 5]
    return model


def _save(model: LlamaForCausalLM, folder: Path, **kwargs: object) -> Path:
    model.save_pretrained(str(folder), **kwargs)
    return folder


# ------------------------------------------------------------------ GGUF (embedded SmolLM2)


def test_none_resolves_to_the_embedded_gguf(smollm2_gguf_path: Path) -> None:
    source = resolve_model(None)
    assert source == ModelSource(smollm2_gguf_path.parent.resolve(), "gguf", smollm2_gguf_path.name)
    assert source.gguf_path.is_file()


def test_gguf_config(smollm2_source: ModelSource) -> None:
    config = load_model_config(smollm2_source)
    assert config.architecture == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152
    assert config.rope_theta == 100000.0
    assert config.max_position_embeddings == 8192
    assert config.tie_word_embeddings is True
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
    assert config.rope_scaling is None and config.quantization_config is None


def test_gguf_weights_equal_transformers(
    smollm2_source: ModelSource, smollm2_hf_state_dict: dict[str, torch.Tensor]
) -> None:
    config = load_model_config(smollm2_source)
    ours = dict(iter_weights(smollm2_source, config))
    # tied: transformers lists lm_head.weight (the embedding); the checkpoint has no output.weight
    assert set(ours) == set(smollm2_hf_state_dict) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        torch.testing.assert_close(tensor, smollm2_hf_state_dict[name], rtol=0, atol=0, msg=name)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute, written out independently
    def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
        return (
            weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape)
        )

    weights = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    np.testing.assert_array_equal(unpermute_rope_rows(permute(weights, 8), 8), weights)


def test_gguf_file_and_folder_resolve(smollm2_gguf_path: Path, tmp_path: Path) -> None:
    expected = ModelSource(smollm2_gguf_path.parent.resolve(), "gguf", smollm2_gguf_path.name)
    assert resolve_model(str(smollm2_gguf_path)) == expected
    assert resolve_model(str(smollm2_gguf_path.parent)) == expected
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"several \.gguf files.*a\.gguf.*b\.gguf"):
        resolve_model(str(tmp_path))


def test_gguf_unknown_architecture(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"gpt2\.gguf.*'gpt2'.*not supported.*llama"):
        load_model_config(resolve_model(str(path)))


def test_corrupt_gguf_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 7)
    with pytest.raises(ValueError, match="broken.gguf"):
        load_model_config(resolve_model(str(path)))


# ------------------------------------------------------------------ HF folders


@pytest.mark.parametrize(
    "save_kwargs",
    [{}, {"safe_serialization": False}, {"max_shard_size": "40KB"}],
    ids=["safetensors", "bin", "sharded"],
)
def test_hf_folder_round_trip(tiny_llama_model: LlamaForCausalLM, tmp_path: Path, save_kwargs: dict) -> None:
    folder = _save(tiny_llama_model, tmp_path / "tiny", **save_kwargs)
    if save_kwargs.get("max_shard_size"):
        assert (folder / "model.safetensors.index.json").is_file()
    source = resolve_model(str(folder))
    assert source == ModelSource(folder.resolve(), "hf")
    config = load_model_config(source)
    assert config.architecture == "LlamaForCausalLM"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (64, 32, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 8)
    assert config.rope_theta == 50000.0 and config.rms_norm_eps == 1e-5
    expected = tiny_llama_model.state_dict()
    ours = dict(iter_weights(source, config))
    assert set(ours) == set(expected) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_generation_defaults(
    tiny_llama_model: LlamaForCausalLM, tmp_path: Path, smollm2_source: ModelSource
) -> None:
    source = resolve_model(str(_save(tiny_llama_model, tmp_path / "tiny")))
    defaults = load_generation_defaults(source)
    assert defaults["temperature"] == 0.7 and defaults["top_p"] == 0.9
    assert defaults["eos_token_id"] == [2, 5]
    (source.path / "generation_config.json").unlink()
    assert load_generation_defaults(source) == {}
    assert load_generation_defaults(smollm2_source) == {}


def test_awq_tensors_pass_through(tmp_path: Path) -> None:
    quantization_config = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "zero_point": True,
        "version": "gemm",
    }
    config = {**TINY_LLAMA, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    config["quantization_config"] = quantization_config
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = {
        "model.layers.0.mlp.down_proj.qweight": torch.randint(
            -(2**31), 2**31 - 1, (128, 4), dtype=torch.int32
        ),
        "model.layers.0.mlp.down_proj.qzeros": torch.randint(0, 2**31 - 1, (1, 4), dtype=torch.int32),
        "model.layers.0.mlp.down_proj.scales": torch.rand(1, 32, dtype=torch.float16),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    source = resolve_model(str(tmp_path))
    model_config = load_model_config(source)
    assert model_config.quantization_config == quantization_config
    ours = dict(iter_weights(source, model_config))
    assert set(ours) == set(tensors)
    for name, tensor in tensors.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def test_corrupt_safetensors_names_the_file(tiny_llama_model: LlamaForCausalLM, tmp_path: Path) -> None:
    folder = _save(tiny_llama_model, tmp_path / "tiny")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    source = resolve_model(str(folder))
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        list(iter_weights(source, load_model_config(source)))


def test_missing_shard_names_the_file(tiny_llama_model: LlamaForCausalLM, tmp_path: Path) -> None:
    folder = _save(tiny_llama_model, tmp_path / "tiny", max_shard_size="40KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    source = resolve_model(str(folder))
    with pytest.raises(FileNotFoundError, match=shard.name):
        list(iter_weights(source, load_model_config(source)))


def test_unknown_hf_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(ValueError, match=r"config\.json.*'GPT2LMHeadModel'.*not supported.*LlamaForCausalLM"):
        load_model_config(resolve_model(str(tmp_path)))


# ------------------------------------------------------------------ hub ids in the local HF cache


def _fake_cache_repo(cache: Path, repo_id: str, revisions: list[str]) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for revision in revisions:
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return repo


def test_hub_id_prefers_refs_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    repo = _fake_cache_repo(cache, "internlm/internlm2_5-7b-chat", ["aaa", "bbb"])
    os.utime(repo / "snapshots" / "bbb", (1e9, 2e9))  # bbb is the newest, but refs/main says aaa
    os.utime(repo / "snapshots" / "aaa", (1e9, 1e9))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa")  # as huggingface_hub writes it: no newline
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    source = resolve_model("internlm/internlm2_5-7b-chat")
    assert source == ModelSource((repo / "snapshots" / "aaa").resolve(), "hf")
    (repo / "refs" / "main").unlink()  # no main revision: huggingface_hub (and so transformers) finds nothing
    with pytest.raises(FileNotFoundError, match="internlm2_5-7b-chat"):
        resolve_model("internlm/internlm2_5-7b-chat")


def test_hub_id_in_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _fake_cache_repo(tmp_path / "home" / "hub", "org/model", ["rev"])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("rev")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve_model("org/model").path == (repo / "snapshots" / "rev").resolve()


def test_missing_model_lists_every_place_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    with pytest.raises(FileNotFoundError) as error:
        resolve_model("nobody/nothing")
    message = str(error.value)
    assert "'nobody/nothing'" in message and "local path nobody/nothing" in message
    for place in (
        tmp_path / "hub",
        tmp_path / "home" / "hub",
        tmp_path / "user" / ".cache" / "huggingface" / "hub",
    ):
        assert str(place / "models--nobody--nothing") in message


# ------------------------------------------------------------------ GGUF files written from tiny HF models


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _write_gguf(model: torch.nn.Module, arch: str, path: Path) -> None:
    """Convert like llama.cpp: gguf-py's own tensor name map, q/k rows permuted for llama."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, 2)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(TINY_LLAMA["rope_theta"])
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(5)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        weights = tensor.numpy()
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if base.endswith("q_proj") else config.num_key_value_heads
            weights = _llama_cpp_permute(weights, heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_written_from_hf_model_round_trips(arch: str, tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = (
        LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
        if arch == "llama"
        else Qwen2ForCausalLM(Qwen2Config(**TINY_LLAMA, tie_word_embeddings=False))
    )
    _write_gguf(model, arch, tmp_path / "tiny.gguf")
    source = resolve_model(str(tmp_path / "tiny.gguf"))
    config = load_model_config(source)
    assert config.architecture == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert config.attention_bias is (arch == "qwen2")
    assert config.tie_word_embeddings is False and config.eos_token_ids == (2, 5)
    assert (config.vocab_size, config.head_dim, config.rope_theta) == (64, 8, 50000.0)
    ours = dict(iter_weights(source, config))
    expected = model.state_dict()
    assert set(ours) == set(expected)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
