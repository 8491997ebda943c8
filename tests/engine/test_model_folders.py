"""Model folders as users have them, loaded by pipeline() and checked against HF transformers greedy tokens.

An internlm2_5-7b-chat-shaped folder (remote code that must not run), a hub id in a fake offline HF cache,
and Mistral / Qwen2 folders written by save_pretrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from lmserve import pipeline
from lmserve.config import EngineConfig
from lmserve.generation import GenerationConfig, Response
from tests.models.model_helpers import tiny_hf_model
from tests.models.test_model_logits import internlm2_config, internlm2_state_dict
from tests.models.test_tokenizer import write_internlm2_tokenizer_files

NUM_TOKENS = 10
NUM_TOP = 5
GREEDY = GenerationConfig(max_new_tokens=NUM_TOKENS, ignore_eos=True, do_sample=False, logprobs=NUM_TOP)
ENGINE = EngineConfig(dtype="float32", device="cpu", session_len=128, max_batch_size=2)
MESSAGES = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
REMOTE_CODE = 'raise RuntimeError("the model folder\'s own Python code must not run")\n'
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "serving large language models on a small cpu is slow but it works",
    "paged attention keeps the kv cache in fixed size blocks",
] * 20


@torch.no_grad()
def hf_greedy(model: PreTrainedModel, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Argmax tokens and their log-softmax rows [NUM_TOKENS, V], over full forward passes (no generate())."""
    ids, rows = list(prompt), []
    for _ in range(NUM_TOKENS):
        rows.append(torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1))
        ids.append(int(rows[-1].argmax()))
    return ids[len(prompt) :], torch.stack(rows)


def assert_matches_hf(model: PreTrainedModel, prompt: list[int], response: Response) -> None:
    """Same greedy tokens as HF, and the same logprobs (chosen token and top values) at every step."""
    tokens, rows = hf_greedy(model, prompt)
    assert response.token_ids == tokens
    assert response.logprobs is not None and len(response.logprobs) == NUM_TOKENS
    ours = torch.tensor([[entry.logprob, *(value for _, value in entry.top)] for entry in response.logprobs])
    expected = torch.cat([rows.gather(1, torch.tensor(tokens)[:, None]), rows.topk(NUM_TOP).values], dim=1)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def hf_chat_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    encoding = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoding["input_ids"])


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here, with ChatML specials and template."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return bpe_tokenizer()


def save_hf_folder(
    folder: Path, kind: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides: Any
) -> PreTrainedModel:
    model = tiny_hf_model(kind, seed=seed, vocab_size=len(tokenizer), **overrides)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def load_and_generate(model: str) -> tuple[list[int], Response]:
    """(prompt ids, greedy response with logprobs) of pipeline(model) for MESSAGES."""
    pipe = pipeline(model, backend_config=ENGINE)
    return pipe.encode(MESSAGES), pipe(MESSAGES, GREEDY)  # type: ignore[return-value]


# ------------------------------------------------------------------ InternLM2 (internlm2_5-7b-chat shape)


def write_internlm2_folder(folder: Path) -> PreTrainedModel:
    """Tokenizer and config as internlm2_5-7b-chat ships them; weights are a tiny HF Llama's, renamed."""
    # 300 pieces; <|im_start|> = 3, <|im_end|> = 4
    hf = tiny_hf_model(
        "llama_linear", rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, vocab_size=300
    )
    auto_map = {
        "AutoConfig": "configuration_internlm2.InternLM2Config",
        "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
    }
    config = {
        **internlm2_config(hf),
        "model_type": "internlm2",
        "auto_map": auto_map,
        "torch_dtype": "bfloat16",
    }
    config |= {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "attn_implementation": "eager"}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in internlm2_state_dict(hf).items()}, str(folder / "model.safetensors")
    )
    write_internlm2_tokenizer_files(folder)
    for name in ("configuration_internlm2.py", "modeling_internlm2.py", "tokenization_internlm2.py"):
        (folder / name).write_text(REMOTE_CODE)
    return hf


def test_internlm2_chat_folder_loads_without_remote_code_and_matches_hf_llama(tmp_path: Path) -> None:
    hf = write_internlm2_folder(tmp_path)
    prompt, response = load_and_generate(str(tmp_path))
    assert prompt[:2] == [1, 3] and prompt.count(3) == 2 and prompt.count(4) == 1  # <s><|im_start|>user...
    assert_matches_hf(hf, prompt, response)


# ------------------------------------------------------------------ hub id in the offline HF cache


def write_cache_snapshot(repo: Path, revision: str, source: Path) -> Path:
    """A snapshot as huggingface_hub lays it out: files are symlinks into blobs/ named by content hash."""
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in source.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_hub_id_loads_the_snapshot_refs_main_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer: PreTrainedTokenizerFast
) -> None:
    hf = save_hf_folder(tmp_path / "model", "llama", tokenizer, tie_word_embeddings=False)
    decoy = save_hf_folder(tmp_path / "other", "llama", tokenizer, seed=1, tie_word_embeddings=False)
    repo = tmp_path / "hub" / "models--org--name"
    write_cache_snapshot(repo, "a" * 40, tmp_path / "model")
    newer = write_cache_snapshot(repo, "b" * 40, tmp_path / "other")
    future = time.time() + 60
    os.utime(newer, (future, future))  # the newest snapshot is not the one refs/main names
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))
    monkeypatch.chdir(tmp_path)  # no local folder called org/name
    prompt, response = load_and_generate("org/name")
    assert prompt == hf_chat_ids(tokenizer)
    assert_matches_hf(hf, prompt, response)
    assert (
        response.token_ids != hf_greedy(decoy, prompt)[0]
    )  # so loading the newest snapshot would have failed


# ------------------------------------------------------------------ save_pretrained folders


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_save_pretrained_folder_matches_hf(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, kind: str
) -> None:
    hf = save_hf_folder(tmp_path, kind, tokenizer)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [type(hf).__name__]
    prompt, response = load_and_generate(str(tmp_path))
    assert prompt == hf_chat_ids(AutoTokenizer.from_pretrained(str(tmp_path)))
    assert_matches_hf(hf, prompt, response)
