"""`python -m lmserve ...` on bad models and bad flags: exit 2 with one `lmserve: error: ...` line, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

TIMEOUT_S = 240
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 16,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


MIXTRAL_ODD_EXPERTS = {
    **TINY_LLAMA,
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 30,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
}
"""Heads that split over 4 ranks, experts of 30 intermediate features that do not."""


def write_tokenizer(folder: Path) -> None:
    """A word-level fast tokenizer: enough for the loader to get past the tokenizer to the weights."""
    vocab = {word: i for i, word in enumerate(["<unk>", "<s>", "</s>", "hello", "world"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def llama_folder(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    write_tokenizer(folder)
    return folder


def serve_cpu(folder: Path) -> list[str]:
    return ["serve", "api_server", str(folder), "--device", "cpu"]


def build_cases(root: Path) -> dict[str, list[str]]:
    """Case name -> lmserve arguments; folders are made under `root`."""
    unknown = root / "unknown_arch"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({**TINY_LLAMA, "architectures": ["FooForCausalLM"]}))
    garbage = llama_folder(root, "garbage_weights")
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    truncated = llama_folder(root, "truncated_weights")
    save_file({"model.embed_tokens.weight": torch.ones(16, 16)}, str(truncated / "model.safetensors"))
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    no_weights = llama_folder(root, "no_weights")
    missing_shard = llama_folder(root, "missing_shard")
    no_template = llama_folder(root, "no_chat_template")
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(no_template)
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (missing_shard / "model.safetensors.index.json").write_text(json.dumps(index))
    mixtral = root / "mixtral_config_only"  # --tp is checked before any weight is read
    mixtral.mkdir()
    (mixtral / "config.json").write_text(json.dumps(MIXTRAL_ODD_EXPERTS))
    write_tokenizer(mixtral)
    return {
        "tp_heads": [*serve_cpu(no_template), "--dtype", "float32", "--tp", "3"],
        "tp_more_gpus_than_present": ["serve", "api_server", str(no_template), "--device=cuda", "--tp=2"],
        "tp_zero": [*serve_cpu(no_template), "--tp", "0"],
        "tp_experts": [*serve_cpu(mixtral), "--dtype", "float32", "--tp", "4"],
        "serve_missing_path": ["serve", "api_server", "/no/such/model"],
        "chat_missing_path": ["chat", "/no/such"],
        "chat_missing_hub_id": ["chat", "no-org/no-model"],
        "unknown_architecture": ["chat", str(unknown)],
        "garbage_safetensors": ["chat", str(garbage), "--dtype", "float32"],
        "truncated_safetensors": ["chat", str(truncated), "--dtype", "float32"],
        "no_weights": ["chat", str(no_weights), "--dtype", "float32"],
        "missing_shard": ["chat", str(missing_shard), "--dtype", "float32"],
        "chat_without_template": ["chat", str(no_template), "--dtype", "float32"],
        "cache_block_seq_len": ["chat", "--cache-block-seq-len", "3"],
        "session_len": ["serve", "api_server", "--session-len", "1"],
        "max_batch_size": ["chat", "--max-batch-size", "0"],
        "server_port": ["serve", "api_server", "--server-port", "70000"],
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli_errors")


@pytest.fixture(scope="module")
def results(root: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every case run at once (each is mostly interpreter start-up), collected by name."""
    env = {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HOME": str(root / "hf_home")}
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "lmserve", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=root,
        )
        for name, args in build_cases(root).items()
    }
    done = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a clean failure (exit 2, nothing else printed)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("lmserve: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("serve_missing_path", ["'/no/such/model' not found", "local path /no/such/model"]),
        ("chat_missing_path", ["'/no/such' not found", "local path /no/such"]),
        ("chat_missing_hub_id", ["'no-org/no-model' not found", "local path", "models--no-org--no-model"]),
    ],
)
def test_missing_model_names_what_was_tried(results, case: str, expected: list[str]) -> None:
    line = error_line(results[case])
    for text in expected:
        assert text in line


def test_missing_hub_id_names_each_cache_tried(results, root: Path) -> None:
    line = error_line(results["chat_missing_hub_id"])
    assert str(root / "hub" / "models--no-org--no-model") in line
    assert str(root / "hf_home" / "hub" / "models--no-org--no-model") in line


def test_unknown_architecture_is_named(results, root: Path) -> None:
    line = error_line(results["unknown_architecture"])
    assert "'FooForCausalLM'" in line and str(root / "unknown_arch" / "config.json") in line
    assert "LlamaForCausalLM" in line  # the supported list


@pytest.mark.parametrize("case", ["garbage_safetensors", "truncated_safetensors"])
def test_corrupt_weight_file_is_named(results, root: Path, case: str) -> None:
    line = error_line(results[case])
    assert f"{root / case.replace('safetensors', 'weights') / 'model.safetensors'}:" in line
    assert "corrupt" in line


def test_missing_weights_name_the_folder_and_file(results, root: Path) -> None:
    assert str(root / "no_weights") in error_line(results["no_weights"])
    line = error_line(results["missing_shard"])
    assert "model-00002-of-00002.safetensors" in line and "missing" in line


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("cache_block_seq_len", "cache_block_seq_len=3 must be a power of two"),
        ("session_len", "session_len=1 must be >= 2"),
        ("max_batch_size", "max_batch_size=0 must be >= 1"),
        ("server_port", "server_port=70000 must be in 1..65535"),
    ],
)
def test_bad_flag_value_names_the_field(results, case: str, field: str) -> None:
    assert field in error_line(results[case])


def test_chat_on_a_model_without_template_says_so_before_any_input(results, root: Path) -> None:
    line = error_line(results["chat_without_template"])
    assert str(root / "no_chat_template") in line and "no chat template" in line
    assert "--chat-template" in line and "gemma3" in line  # the built-in names


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tp_heads", "--tp 3 must divide num_attention_heads=2"),
        ("tp_zero", "tp=0 must be >= 1"),
        ("tp_experts", "--tp 4 must divide the experts' intermediate size 30"),
    ],
)
def test_bad_tp_names_the_flag(results, case: str, message: str) -> None:
    """serve api_server checks in its engine core process: the same one line, no traceback from there."""
    assert message in error_line(results[case])


def test_tp_beyond_the_gpus_present_names_the_flag(results) -> None:
    """CI has no GPU; a machine with one says how many it sees (tests/gpu/test_tp_cuda.py)."""
    assert "--tp 2 needs 2 GPUs but " in error_line(results["tp_more_gpus_than_present"])
