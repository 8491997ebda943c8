"""The weight cache of GGUF models on the CPU: a second build reads it and computes the same logits; a changed file is rebuilt."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from lmserve.config import EngineConfig
from lmserve.engine import builder
from lmserve.models import loader
from lmserve.models.loader import ModelSource, load_model_config
from lmserve.models.weight_cache import weight_cache_for
from tests.models.model_helpers import PagedSequences

PROMPT = [1, 504, 3458, 282, 4649, 314, 3726, 30, 378, 3458, 282, 4649, 314]


@pytest.fixture
def gguf_copy(smollm2_gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelSource:
    """A private copy of the embedded GGUF (its mtime is changed below) and a private cache folder."""
    monkeypatch.setenv("LMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LMSERVE_NO_WEIGHT_CACHE", raising=False)
    shutil.copyfile(smollm2_gguf_path, tmp_path / smollm2_gguf_path.name)
    return ModelSource(tmp_path, "gguf", smollm2_gguf_path.name)


def build(source: ModelSource) -> Any:
    model_config = load_model_config(source)
    resolved = builder.resolve_config(EngineConfig(device="cpu", dtype="bfloat16"), model_config)
    return builder.load_model(source, model_config, resolved)


@torch.no_grad()
def prompt_logits(model: Any) -> torch.Tensor:
    """Logits of a prefill (dense path) and of two single-token decodes (the int4 / int8 copies)."""
    config = model.config
    caches = model.attention_backend.allocate_kv_cache(
        config.num_hidden_layers, 8, 16, config.num_key_value_heads, config.head_dim, torch.bfloat16, "cpu"
    )
    sequences = PagedSequences(num_blocks=8, block_size=16)
    logits = []
    for chunk in (PROMPT, [PROMPT[3]], [PROMPT[5]]):
        batch = sequences.step([("a", chunk)])
        plan = model.attention_backend.prepare(batch.metadata)
        hidden = model(batch.input_ids, batch.positions, caches, plan)
        logits.append(model.compute_logits(hidden[-1:]))
    return torch.cat(logits)


def cache_files(source: ModelSource) -> list[Path]:
    return sorted((Path(os.environ["LMSERVE_CACHE_DIR"]) / "weights").glob("*.safetensors"))


def forbid_reading_the_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any) -> Any:
        raise AssertionError("the GGUF weights were read although the cache holds them")

    monkeypatch.setattr(loader, "iter_weights", fail)


def test_second_build_reads_the_cache_and_gives_identical_logits(
    gguf_copy: ModelSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = build(gguf_copy)
    assert len(cache_files(gguf_copy)) == 1
    assert any(module.int4 is not None for module in fresh.modules() if hasattr(module, "int4"))
    expected = prompt_logits(fresh)
    forbid_reading_the_gguf(monkeypatch)
    cached = build(gguf_copy)
    torch.testing.assert_close(prompt_logits(cached), expected, rtol=0, atol=0)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(cached.state_dict()[name], tensor), name


def test_changed_file_is_rebuilt_not_read(gguf_copy: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    build(gguf_copy)
    [first] = cache_files(gguf_copy)
    stat = gguf_copy.gguf_path.stat()
    os.utime(gguf_copy.gguf_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    stale = weight_cache_for(gguf_copy, load_model_config(gguf_copy), torch.bfloat16, torch.device("cpu"))
    assert stale is not None and not stale.path.exists()
    read_weights = []
    original = loader.iter_weights
    monkeypatch.setattr(loader, "iter_weights", lambda *a: read_weights.append(1) or original(*a))
    build(gguf_copy)
    assert read_weights == [1]  # rebuilt from the file, not read from the stale entry
    assert cache_files(gguf_copy) == [stale.path] and first not in cache_files(gguf_copy)


def test_corrupt_entry_is_rebuilt(gguf_copy: ModelSource) -> None:
    build(gguf_copy)
    [entry] = cache_files(gguf_copy)
    entry.write_bytes(entry.read_bytes()[:1000])
    expected = prompt_logits(build(gguf_copy))
    assert entry.stat().st_size > 1000
    torch.testing.assert_close(prompt_logits(build(gguf_copy)), expected, rtol=0, atol=0)


def test_disabled_by_environment(gguf_copy: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSERVE_NO_WEIGHT_CACHE", "1")
    build(gguf_copy)
    assert cache_files(gguf_copy) == []
