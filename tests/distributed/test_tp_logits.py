"""tp=2 over gloo (two processes on loopback) gives the logits of tp=1: Llama (GQA), Qwen2 (qkv bias), Mistral,
InternLM2 with one KV head (replicated on both ranks), and a tiny AWQ model; every rank loads only its shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lmserve.attention.torch_backend import TorchAttentionBackend
from lmserve.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel
from lmserve.distributed.sharding import num_local_kv_heads
from lmserve.engine import builder
from lmserve.models.loader import ModelSource, load_model_config
from tests.distributed.tp_helpers import awq_config, random_awq_tensors, run_ranks, save_folder
from tests.models.model_helpers import PagedSequences, hf_config_dict, tiny_hf_model
from tests.models.test_model_logits import internlm2_config, internlm2_state_dict

ATOL = 1e-4
"""float32 both ways; the ranks' partial sums add in another order than one matmul does."""
BLOCK_SIZE = 4
CPU = torch.device("cpu")
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
    return folders


@torch.no_grad()
def model_logits(folder: Path) -> torch.Tensor:
    """Logits of a prefill step of two sequences, then a decode step of both (on this rank's shard)."""
    source = ModelSource(folder, "hf")
    config = load_model_config(source)
    model = builder.load_model(source, config, RESOLVED)
    caches = TorchAttentionBackend().allocate_kv_cache(
        config.num_hidden_layers,
        32,
        BLOCK_SIZE,
        num_local_kv_heads(config.num_key_value_heads, _tp()),
        config.head_dim,
        torch.float32,
        CPU,
    )
    paged = PagedSequences(32, BLOCK_SIZE)
    prompts = torch.randint(
        0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)
    ).tolist()
    steps = [[("a", prompts[0]), ("b", prompts[1][:7])], [("a", [5]), ("b", [9])]]
    logits = []
    for chunks in steps:
        batch = paged.step(chunks)
        plan = model.attention_backend.prepare(batch.metadata)
        hidden = model(batch.input_ids, batch.positions, caches, plan)
        logits.append(model.compute_logits(hidden[batch.logits_indices]))
    return torch.cat(logits)


def _tp() -> int:
    from lmserve.distributed.parallel_state import tp_size

    return tp_size()


def rank_main(rank: int, world_size: int, init_method: str, folders: dict[str, Path], out: Path) -> None:
    init_tensor_parallel(rank, world_size, init_method, CPU)
    try:
        results = {kind: model_logits(folder) for kind, folder in folders.items()}
    finally:
        destroy_tensor_parallel()
    if rank == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def logits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tp-models")
    folders = tiny_folders(root)
    single = {kind: model_logits(folder) for kind, folder in folders.items()}
    run_ranks(rank_main, 2, folders, root / "tp2.pt")
    return {"tp1": single, "tp2": torch.load(root / "tp2.pt")}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "internlm2_one_kv_head", "awq"])
def test_tp2_logits_equal_tp1(logits: dict[str, Any], kind: str) -> None:
    tp1, tp2 = logits["tp1"][kind], logits["tp2"][kind]
    assert tp2.shape == tp1.shape == (4, 97)
    torch.testing.assert_close(tp2, tp1, atol=ATOL, rtol=0)
