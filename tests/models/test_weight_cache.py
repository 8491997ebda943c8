"""The weight cache of GGUF models on the CPU: a second build reads it and computes the same logits; a changed file is rebuilt."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lmserve.config import EngineConfig
from lmserve.engine import builder
from lmserve.kernels import cpu_native
from lmserve.models import loader
from lmserve.models.loader import ModelSource, load_model_config
from lmserve.models.weight_cache import wait_for_writes, weight_cache_for
from tests.models.model_helpers import PagedSequences

PROMPT = [1, 504, 3458, 282, 4649, 314, 3726, 30, 378, 3458, 282, 4649, 314]


@dataclass
class FirstBuild:
    source: ModelSource
    logits: torch.Tensor
    state: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def first_build(smollm2_gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FirstBuild]:
    """A private copy of the embedded GGUF (tests change its mtime), a private cache, and the build that filled it."""
    folder = tmp_path_factory.mktemp("weight-cache")
    shutil.copyfile(smollm2_gguf_path, folder / smollm2_gguf_path.name)
    source = ModelSource(folder, "gguf", smollm2_gguf_path.name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMSERVE_CACHE_DIR", str(folder / "cache"))
        patch.delenv("LMSERVE_NO_WEIGHT_CACHE", raising=False)
        model = build(source)
        assert len(cache_files()) == 1
        assert any(module.has_4bit_copy for module in model.modules() if hasattr(module, "has_4bit_copy"))
        yield FirstBuild(source, prompt_logits(model), model.state_dict())


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


def cache_files() -> list[Path]:
    """The entries on disk, once this process's writes (a thread per build) are done."""
    wait_for_writes()
    return sorted((Path(os.environ["LMSERVE_CACHE_DIR"]) / "weights").glob("*.safetensors"))


def forbid_reading_the_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any) -> Any:
        raise AssertionError("the GGUF weights were read although the cache holds them")

    monkeypatch.setattr(loader, "iter_weights", fail)


def test_second_build_reads_the_cache_and_gives_identical_logits(
    first_build: FirstBuild, monkeypatch: pytest.MonkeyPatch
) -> None:
    forbid_reading_the_gguf(monkeypatch)
    cached = build(first_build.source)
    torch.testing.assert_close(prompt_logits(cached), first_build.logits, rtol=0, atol=0)
    for name, tensor in cached.state_dict().items():
        assert torch.equal(tensor, first_build.state[name]), name
    assert cached.lm_head_int8 is not None  # the derived copies came back too, not only the state dict
    assert all(module.has_4bit_copy for module in cached.modules() if hasattr(module, "has_4bit_copy"))


def test_corrupt_entry_is_rebuilt(first_build: FirstBuild) -> None:
    [entry] = cache_files()
    entry.write_bytes(entry.read_bytes()[:1000])
    torch.testing.assert_close(prompt_logits(build(first_build.source)), first_build.logits, rtol=0, atol=0)
    assert cache_files() == [entry] and entry.stat().st_size > 1000


def test_disabled_by_environment(first_build: FirstBuild, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSERVE_NO_WEIGHT_CACHE", "1")
    read_weights = spy_on_reading_the_gguf(monkeypatch)
    [entry] = cache_files()
    written = entry.stat().st_mtime_ns
    build(first_build.source)
    assert read_weights == [1] and cache_files() == [entry] and entry.stat().st_mtime_ns == written


def test_changed_file_is_rebuilt_not_read(first_build: FirstBuild, monkeypatch: pytest.MonkeyPatch) -> None:
    source = first_build.source
    [first] = cache_files()
    stat = source.gguf_path.stat()
    os.utime(source.gguf_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    stale = weight_cache_for(source, load_model_config(source), torch.bfloat16, torch.device("cpu"))
    assert stale is not None and stale.path != first and not stale.path.exists()
    read_weights = spy_on_reading_the_gguf(monkeypatch)
    build(source)
    assert read_weights == [1]  # rebuilt from the file, not read from the stale entry
    assert cache_files() == [stale.path]  # the stale entry is gone


def spy_on_reading_the_gguf(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = loader.iter_weights
    monkeypatch.setattr(loader, "iter_weights", lambda *args: calls.append(1) or original(*args))
    return calls


def test_only_bfloat16_gguf_on_the_cpu_is_cached(first_build: FirstBuild) -> None:
    source, config = first_build.source, load_model_config(first_build.source)
    assert weight_cache_for(source, config, torch.bfloat16, torch.device("cpu")) is not None
    assert weight_cache_for(source, config, torch.float32, torch.device("cpu")) is None
    assert weight_cache_for(source, config, torch.bfloat16, torch.device("cuda")) is None


def test_another_4bit_layout_gets_another_entry(
    first_build: FirstBuild, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry holds the linears' few-row 4-bit copies in one kernel's layout: a build for the other kernel (no
    AVX512-BF16 or compiler, LMSERVE_CPU_NATIVE=0, a new layout version) must not restore them."""
    source, config = first_build.source, load_model_config(first_build.source)
    current = weight_cache_for(source, config, torch.bfloat16, torch.device("cpu"))
    native = cpu_native.kernel_available()
    monkeypatch.setattr(cpu_native, "kernel_available", lambda: not native)
    other = weight_cache_for(source, config, torch.bfloat16, torch.device("cpu"))
    assert current is not None and other is not None and other.path != current.path
    model = build(source)
    linears = [m for m in model.modules() if hasattr(m, "has_4bit_copy") and m.has_4bit_copy]
    assert linears and all((m.q4 is not None) == (not native) for m in linears)
    assert all((m.q4_panels is not None) == (not native) for m in linears)
    assert all((m.int4 is not None) == native for m in linears)
