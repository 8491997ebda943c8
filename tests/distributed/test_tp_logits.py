"""tp=2 over gloo (two processes on loopback) gives the logits of tp=1: Llama (GQA), Qwen2 (qkv bias), Mistral,
InternLM2 with one KV head (replicated on both ranks), tiny AWQ and W8A8 models, and the mixtures of experts
(Mixtral, Qwen3-MoE with and without dense layers, AWQ experts; every expert layout a checkpoint comes in, each
expert split by its intermediate features); every rank loads only its shard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from lmserve.distributed import parallel_state
from lmserve.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel
from lmserve.distributed.sharding import num_local_kv_heads
from lmserve.engine import builder
from lmserve.layers.quant_formats import w8a8_quantization_config
from lmserve.models.config import ModelConfig
from lmserve.models.loader import load_model_config, resolve_model
from lmserve.models.registry import build_model
from tests.distributed.tp_helpers import (
    awq_config,
    random_awq_tensors,
    random_w8a8_tensors,
    run_ranks,
    save_folder,
)
from tests.models.model_helpers import PagedSequences, hf_config_dict, hf_logits, tiny_hf_model
from tests.models.test_model_logits import internlm2_config, internlm2_state_dict
from tests.models.test_moe_models import (
    awq_checkpoint,
    per_expert_state_dict,
    per_projection_state_dict,
    tiny_moe_model,
    write_moe_gguf,
)

ATOL = 1e-4
"""float32 both ways; the ranks' partial sums add in another order than one matmul does."""
BLOCK_SIZE = 4
CPU = torch.device("cpu")
PROMPTS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0)).tolist()
RESOLVED = builder.ResolvedConfig(CPU, torch.float32, session_len=64, max_batch_size=4)


def tiny_folders(root: Path) -> dict[str, Path]:
    """Checkpoints of every family, vocab 97 (odd: the tp=2 vocabulary gets a padding row)."""
    folders = {}
    for kind in ("llama", "qwen2", "mistral"):
        hf = tiny_hf_model(kind)
        folders[kind] = save_folder(root / kind, hf_config_dict(hf), dict(hf.state_dict()))
    hf = tiny_hf_model("llama_linear", num_key_value_heads=1)
    folders["internlm2_one_kv_head"] = save_folder(
        root / "internlm2", internlm2_config(hf), internlm2_state_dict(hf)
    )
    hf = tiny_hf_model("llama", intermediate_size=128, tie_word_embeddings=False)
    tensors = random_awq_tensors(hf, group_size=32)
    folders["awq"] = save_folder(root / "awq", awq_config(hf_config_dict(hf), 32), tensors)
    hf = tiny_hf_model("qwen2", tie_word_embeddings=False)
    w8a8 = {**hf_config_dict(hf), "quantization_config": w8a8_quantization_config(["lm_head"])}
    folders["w8a8"] = save_folder(root / "w8a8", w8a8, random_w8a8_tensors(hf))
    return folders | moe_folders(root)


MOE_GROUP_SIZE = 8
"""The tiny Mixtral's experts have 48 intermediate features: 24 per rank, three whole AWQ groups."""


def moe_folders(root: Path) -> dict[str, Path]:
    """Mixture-of-experts checkpoints, each in another expert layout: per expert (the hub's), stacked per
        projection (GGUF's), stacked as the model holds them (a transformers 5 state dict), AutoAWQ per expert, and
    a GGUF file (float32 experts stacked per projection, cut after reading)."""
    layouts = {
        "mixtral": ("mixtral", per_expert_state_dict),
        "qwen3_moe": ("qwen3_moe", per_projection_state_dict),
        "qwen3_moe_dense_layers": ("qwen3_moe_dense_layers", lambda hf: dict(hf.state_dict())),
    }
    folders = {}
    for name, (kind, layout) in layouts.items():
        hf = tiny_moe_model(kind)
        folders[name] = save_folder(root / name, hf_config_dict(hf), layout(hf))
    hf = tiny_moe_model("mixtral")
    tensors = awq_checkpoint(hf, MOE_GROUP_SIZE)
    config = awq_config(hf_config_dict(hf), MOE_GROUP_SIZE)
    folders["mixtral_awq"] = save_folder(root / "mixtral_awq", config, tensors)
    folders["mixtral_gguf"] = root / "mixtral.gguf"
    write_moe_gguf(tiny_moe_model("mixtral"), folders["mixtral_gguf"])
    return folders


@torch.no_grad()
def model_logits(folder: Path) -> tuple[torch.Tensor, int]:
    """Logits of a prefill step of two sequences, then a decode step of both, and the number of parameter
    elements this rank holds (its shard)."""
    source = resolve_model(str(folder))
    config = load_model_config(source)
    model = builder.load_model(source, config, RESOLVED)
    caches = model.attention_backend.allocate_kv_cache(
        config.num_hidden_layers,
        32,
        BLOCK_SIZE,
        num_local_kv_heads(config.num_key_value_heads, _tp()),
        config.head_dim,
        torch.float32,
        CPU,
    )
    paged = PagedSequences(32, BLOCK_SIZE)
    steps = [[("a", PROMPTS[0]), ("b", PROMPTS[1][:7])], [("a", [5]), ("b", [9])]]
    logits = []
    for chunks in steps:
        batch = paged.step(chunks)
        plan = model.attention_backend.prepare(batch.metadata)
        hidden = model(batch.input_ids, batch.positions, caches, plan)
        logits.append(model.compute_logits(hidden[batch.logits_indices]))
    return torch.cat(logits), sum(p.numel() for p in model.parameters())


def _tp() -> int:
    from lmserve.distributed.parallel_state import tp_size

    return tp_size()


def rank_main(rank: int, world_size: int, init_method: str, folders: dict[str, Path], out: Path) -> None:
    init_tensor_parallel(rank, world_size, init_method, CPU)
    try:
        results = {kind: model_logits(folder) for kind, folder in folders.items()}
    finally:
        destroy_tensor_parallel()
    torch.save(results, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def logits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tp-models")
    folders = tiny_folders(root)
    single = {kind: model_logits(folder) for kind, folder in folders.items()}
    run_ranks(rank_main, 2, folders, root)
    ranks = [torch.load(root / f"rank{rank}.pt") for rank in range(2)]
    return {
        "tp1": {kind: result[0] for kind, result in single.items()},
        "tp2": {kind: result[0] for kind, result in ranks[0].items()},
        "tp1_params": {kind: result[1] for kind, result in single.items()},
        "tp2_params": [{kind: result[1] for kind, result in rank.items()} for rank in ranks],
        "w8a8_float": float_w8a8_logits(folders["w8a8"]),
    }


def float_w8a8_logits(folder: Path) -> torch.Tensor:
    """The rows model_logits computes, from HF Qwen2 holding the dequantized int8 weights (float activations)."""
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    hf = Qwen2ForCausalLM(Qwen2Config(**config)).eval()
    tensors = load_file(str(folder / "model.safetensors"))
    state = {
        name: tensors[name].float() * tensors[name.removesuffix("weight") + "weight_scale"]
        if tensors[name].dtype == torch.int8
        else tensors[name]
        for name in tensors
        if not name.endswith("weight_scale")
    }
    hf.load_state_dict(state)
    a, b = PROMPTS
    rows = [
        hf_logits(hf, a)[-1],
        hf_logits(hf, b[:7])[-1],
        hf_logits(hf, [*a, 5])[-1],
        hf_logits(hf, [*b[:7], 9])[-1],
    ]
    return torch.stack(rows)


@pytest.mark.parametrize(
    "kind",
    [
        "llama",
        "qwen2",
        "mistral",
        "internlm2_one_kv_head",
        "awq",
        "mixtral",
        "qwen3_moe",
        "qwen3_moe_dense_layers",
        "mixtral_awq",
        "mixtral_gguf",
    ],
)
def test_tp2_logits_equal_tp1(logits: dict[str, Any], kind: str) -> None:
    tp1, tp2 = logits["tp1"][kind], logits["tp2"][kind]
    assert tp2.shape == tp1.shape == (4, 97)
    torch.testing.assert_close(tp2, tp1, atol=ATOL, rtol=0)


def test_each_rank_holds_about_half_the_parameters(logits: dict[str, Any]) -> None:
    """Everything but the norms, the routers (and, for the one-KV-head model, the replicated K/V) is split in
    two."""
    for kind, whole in logits["tp1_params"].items():
        for rank_params in logits["tp2_params"]:
            assert 0.45 * whole <= rank_params[kind] <= 0.6 * whole, (kind, rank_params[kind], whole)


def test_tp2_w8a8_is_as_close_to_float_as_tp1(logits: dict[str, Any]) -> None:
    """W8A8 quantizes activations per token on each rank's slice of the features (as vLLM does), so tp=2
    rounds differently from tp=1: both must be near the float model of the same int8 weights, tp=2 no worse."""
    reference = logits["w8a8_float"]
    tp1_error = (logits["tp1"]["w8a8"] - reference).abs().max().item()
    tp2_error = (logits["tp2"]["w8a8"] - reference).abs().max().item()
    assert tp1_error < 0.1 * reference.std().item()
    assert tp2_error <= 1.25 * tp1_error


def test_row_parallel_awq_needs_whole_groups_per_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the check runs while the model is built, before any collective: rank 0 of 2 without a process group
    monkeypatch.setattr(parallel_state, "_group", parallel_state.TensorParallelGroup(0, 2))
    hf = tiny_hf_model("llama", intermediate_size=128, tie_word_embeddings=False)
    folder = save_folder(tmp_path / "awq64", awq_config(hf_config_dict(hf), 64), random_awq_tensors(hf, 64))
    with pytest.raises(
        ValueError, match="--tp 2: o_proj gets 32 input features per rank, not a whole number"
    ):
        model_logits(folder)


def test_awq_experts_need_whole_groups_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel_state, "_group", parallel_state.TensorParallelGroup(0, 2))
    hf = tiny_moe_model("mixtral")  # 48 intermediate features per expert: 24 per rank, not whole groups of 16
    config = ModelConfig.from_hf_config(awq_config(hf_config_dict(hf), 16))
    with pytest.raises(ValueError, match="--tp 2: the experts' down_proj gets 24 input features per rank"):
        build_model(config, builder.attention_backend(RESOLVED), torch.float32, CPU)


def test_experts_that_do_not_split_name_the_flag() -> None:
    hf = tiny_moe_model("qwen3_moe")
    config = ModelConfig.from_hf_config({**hf_config_dict(hf), "moe_intermediate_size": 30})
    with pytest.raises(ValueError, match="--tp 4 must divide the experts' intermediate size 30"):
        builder.check_tp_shape(4, config)
