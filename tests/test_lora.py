"""LoRA adapters on a tiny Llama against PEFT: merged-model logits, mixed batches, engine greedy, prefix cache."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

from lmserve.attention.backend import get_attention_backend
from lmserve.attention.metadata import SequenceChunk, build_step_batch
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig
from lmserve.lora.adapter import load_adapter, parse_adapters
from lmserve.lora.manager import attach_adapters
from lmserve.models.config import ModelConfig
from lmserve.models.registry import build_model
from tests.models.model_helpers import hf_config_dict, hf_logits, tiny_hf_model

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_CONFIGS = {
    # every target, rank 8; a second with rank 4, rsLoRA and only some targets (padding, empty slices)
    "alpha": LoraConfig(r=8, lora_alpha=16, target_modules=ALL_TARGETS, init_lora_weights=False),
    "beta": LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
    ),
}
CPU = torch.device("cpu")


def save_adapter(base: PreTrainedModel, config: LoraConfig, folder: Path, seed: int) -> PreTrainedModel:
    """Write a random PEFT adapter of `base` to folder; returns PEFT's merged model (the truth)."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    with torch.no_grad():  # PEFT's random init is small: scale B up so the adapter visibly changes the logits
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(20.0)
    peft_model.save_pretrained(str(folder))
    return peft_model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def tiny(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[PreTrainedModel, dict[str, str], dict[str, PreTrainedModel]]:
    """(base HF model, {name: adapter folder}, {name: PEFT merged model})."""
    base = tiny_hf_model("llama", tie_word_embeddings=False)
    root = tmp_path_factory.mktemp("adapters")
    folders, merged = {}, {}
    for seed, (name, config) in enumerate(ADAPTER_CONFIGS.items()):
        folders[name] = str(root / name)
        merged[name] = save_adapter(base, config, root / name, seed + 1)
    return base, folders, merged


def our_model(base: PreTrainedModel, device: torch.device = CPU) -> tuple[torch.nn.Module, ModelConfig]:
    model_config = ModelConfig.from_hf_config(hf_config_dict(base))
    net = build_model(model_config, get_attention_backend(device), torch.float32, device)
    net.load_weights(base.state_dict().items())
    return net, model_config


def batch_logits(
    net: torch.nn.Module, sequences: list[tuple[int, list[int]]], device: torch.device = CPU
) -> list[torch.Tensor]:
    """Logits (on the CPU) of every position of each (slot, prompt), all prefilled in one step."""
    chunks, next_block = [], 31  # block ids from the top, so none equals its logical index
    for _, prompt in sequences:
        num_blocks = -(-len(prompt) // 8)
        chunks.append(SequenceChunk(prompt, 0, list(range(next_block, next_block - num_blocks, -1))))
        next_block -= num_blocks
    batch = build_step_batch(chunks, 8, device)
    net.lora_context.begin_step([(slot, len(prompt)) for slot, prompt in sequences])
    kv = net.attention_backend.allocate_kv_cache(2, 32, 8, 2, 16, torch.float32, device)
    with torch.inference_mode():
        hidden = net(batch.input_ids, batch.positions, kv, net.attention_backend.prepare(batch.metadata))
        logits = net.compute_logits(hidden).cpu()
    return list(logits.split([len(p) for _, p in sequences]))


MIXED_PROMPTS = [[5, 17, 3, 44, 9, 60, 2], [8, 1, 90, 33, 4, 4, 12, 70, 21, 6, 5], [11, 22, 33, 44, 55]]
MIXED_ADAPTERS = ["alpha", None, "beta"]


def mixed_batch_logits(
    base: PreTrainedModel, folders: dict[str, str], device: torch.device
) -> list[torch.Tensor]:
    """Our logits of MIXED_PROMPTS, each under its MIXED_ADAPTERS entry, in one batch on device."""
    net, model_config = our_model(base, device)
    manager = attach_adapters(net, model_config, folders, device, torch.float32)
    net.lora_context = manager.context
    slots = [manager.slot_of(name) for name in MIXED_ADAPTERS]
    return batch_logits(net, list(zip(slots, MIXED_PROMPTS, strict=True)), device)


def test_mixed_batch_logits_equal_peft_merged_models(tiny) -> None:
    base, folders, merged = tiny
    ours = mixed_batch_logits(base, folders, CPU)
    for logits, name, prompt in zip(ours, MIXED_ADAPTERS, MIXED_PROMPTS, strict=True):
        truth = base if name is None else merged[name]
        torch.testing.assert_close(logits, hf_logits(truth, prompt), atol=2e-4, rtol=1e-4)
    # the adapters really change the answer (else the test above could pass with LoRA ignored)
    for name in folders:
        prompt = MIXED_PROMPTS[0]
        assert (hf_logits(merged[name], prompt) - hf_logits(base, prompt)).abs().max() > 0.05


def make_engine(base: PreTrainedModel, **config: object) -> LLMEngine:
    net, model_config = our_model(base)
    engine_config = EngineConfig(dtype="float32", device="cpu", **config)  # type: ignore[arg-type]
    return LLMEngine.build(engine_config, model_config, net)


@torch.no_grad()
def hf_greedy(model: PreTrainedModel, prompt: list[int], num_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


def run_all(engine: LLMEngine, requests: list[tuple[list[int], GenerationConfig]]) -> list[list[int]]:
    ids = [engine.add_request(prompt, config) for prompt, config in requests]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    return [tokens[i] for i in ids]


def greedy(adapter: str | None, num_tokens: int = 10) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=num_tokens, ignore_eos=True, do_sample=False, adapter_name=adapter)


def test_engine_batch_mixing_adapters_and_base_gives_each_its_own_answer(tiny) -> None:
    base, folders, merged = tiny
    engine = make_engine(base, adapters=folders, max_prefill_token_num=16)  # chunked prefill, mixed steps
    prompts = [[3, 9, 27, 81, 50, 1, 7, 7, 19, 2, 40, 41], [4, 8, 15, 16, 23, 42], [60, 61, 62, 5, 5, 9, 1]]
    names = ["alpha", "beta", None, "alpha", "beta", None]
    requests = [(prompts[i % 3], greedy(name)) for i, name in enumerate(names)]
    outputs = run_all(engine, requests)
    for (prompt, config), tokens in zip(requests, outputs, strict=True):
        truth = base if config.adapter_name is None else merged[config.adapter_name]
        assert tokens == hf_greedy(truth, prompt, 10), config.adapter_name
    by_adapter = {name: run_all(engine, [(prompts[0], greedy(name))])[0] for name in ["alpha", "beta", None]}
    assert len({tuple(tokens) for tokens in by_adapter.values()}) == 3, by_adapter


def test_prefix_cache_keys_include_the_adapter(tiny) -> None:
    base, folders, merged = tiny
    engine = make_engine(base, adapters=folders, enable_prefix_caching=True, cache_block_seq_len=4)
    prompt = list(range(1, 30))
    first = run_all(engine, [(prompt, greedy("alpha"))])[0]
    hits = engine.block_manager.num_prefix_hits
    # the same tokens under another adapter (or the base) have other K/V: no hit, and the right answer
    assert run_all(engine, [(prompt, greedy("beta"))])[0] == hf_greedy(merged["beta"], prompt, 10)
    assert run_all(engine, [(prompt, greedy(None))])[0] == hf_greedy(base, prompt, 10)
    assert engine.block_manager.num_prefix_hits == hits
    # the same adapter again hits its own blocks
    assert run_all(engine, [(prompt, greedy("alpha"))])[0] == first
    assert engine.block_manager.num_prefix_hits > hits


def test_unknown_adapter_and_bad_folders_are_clear_errors(tiny, tmp_path: Path) -> None:
    base, folders, _ = tiny
    engine = make_engine(base, adapters=folders)
    with pytest.raises(ValueError, match="'gamma' is not loaded"):
        engine.add_request([1, 2, 3], greedy("gamma"))
    with pytest.raises(ValueError, match="no adapters"):
        make_engine(base).add_request([1, 2, 3], greedy("alpha"))
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapter("missing", str(tmp_path))
    with pytest.raises(ValueError, match="tp=2"):
        EngineConfig(adapters=folders, tp=2)


def test_parse_adapters_flag() -> None:
    assert parse_adapters(["a=/x", "b=/y"]) == {"a": "/x", "b": "/y"}
    assert parse_adapters(["/only/path"]) == {"default": "/only/path"}
    assert parse_adapters(None) is None
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_adapters(["a=/x", "/y"])
    with pytest.raises(ValueError, match="twice"):
        parse_adapters(["a=/x", "a=/y"])


def test_biased_base_qwen2_with_adapter_equals_peft(tmp_path: Path) -> None:
    base = tiny_hf_model("qwen2", tie_word_embeddings=False)  # q/k/v biases: the fused CPU GEMM carries them
    merged = save_adapter(base, ADAPTER_CONFIGS["alpha"], tmp_path / "alpha", seed=7)
    net, model_config = our_model(base)
    manager = attach_adapters(net, model_config, {"alpha": str(tmp_path / "alpha")}, CPU, torch.float32)
    net.lora_context = manager.context
    prompts = [[7, 3, 9, 1, 44, 2], [5, 6]]
    logits = batch_logits(net, [(1, prompts[0]), (0, prompts[1])])
    torch.testing.assert_close(logits[0], hf_logits(merged, prompts[0]), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], hf_logits(base, prompts[1]), atol=2e-4, rtol=1e-4)
