"""FP8 (e4m3) KV cache on the CPU: rounding, the torch backend against the kernel references, flags, sizing."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

from lmserve.attention.backend import get_attention_backend
from lmserve.attention.kv_fp8 import FP8_KV_DTYPE, TorchFP8KVBackend, store_fp8_kv_ref, to_fp8
from lmserve.cli.engine_args import parse_quant_policy
from lmserve.cli.main import main
from lmserve.config import EngineConfig
from lmserve.engine import builder
from lmserve.kernels.testing import backend_step, make_paged_batch, reference_forward, relative_error
from lmserve.models.config import ModelConfig
from tests.unit.test_kv_quant import BATCHES, LLAMA3_8B, SMOLLM2

CPU = torch.device("cpu")


def test_to_fp8_rounds_to_nearest_and_saturates() -> None:
    x = torch.tensor([1.0, 7.3, -7.3, 0.3, 500.0, -1e4, 1.5 * 2.0**-10, 2.0**-10])
    # e4m3 near 7: steps of 0.5; near 0.3: 2^-5; past 448 it saturates (torch alone would give NaN); the
    # smallest subnormal is 2^-9, and 2^-10, half of it, rounds to even: 0
    assert to_fp8(x).float().tolist() == [1.0, 7.5, -7.5, 0.3125, 448.0, -448.0, 2.0**-9, 0.0]
    assert to_fp8(x).dtype == FP8_KV_DTYPE


def test_store_writes_rounded_values_and_skips_padding() -> None:
    batch = make_paged_batch([1, 5], [7, 9], 4, 3, 16, 4, torch.float32, CPU, num_padding_tokens=2)
    cache = to_fp8(batch.layer_cache)
    before = cache.view(torch.uint8).clone()
    store_fp8_kv_ref(batch.k, batch.v, cache, batch.meta.slot_mapping)
    flat = cache.view(2, -1, 3, 16).float()
    real = batch.meta.num_tokens
    slots = batch.meta.slot_mapping[:real]
    assert torch.equal(flat[0, slots], to_fp8(batch.k[:real]).float())
    assert torch.equal(flat[1, slots], to_fp8(batch.v[:real]).float())
    untouched = torch.ones(flat.shape[1], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(
        cache.view(torch.uint8).view(2, -1, 3, 16)[:, untouched], before.view(2, -1, 3, 16)[:, untouched]
    )


@pytest.mark.parametrize("name", list(BATCHES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 16])
def test_torch_backend_matches_references_over_the_e4m3_cache(
    name: str, dtype: torch.dtype, window: int | None
) -> None:
    """Chunked prefill over an e4m3 prefix, decodes and fresh prompts: the backend attends over exactly what
    the cache holds (the new K/V rounded to e4m3 too)."""
    batch = make_paged_batch(*BATCHES[name], 6, 2, 32, 8, dtype, CPU, num_padding_tokens=1)
    cache = to_fp8(batch.layer_cache)
    out = backend_step(TorchFP8KVBackend(), batch.q, batch.k, batch.v, cache, batch.meta, 0.2, window)
    rows = batch.meta.num_tokens
    assert out.dtype == dtype and not out[rows:].any()
    rounded = dataclasses.replace(
        batch, layer_cache=cache.to(dtype), k=to_fp8(batch.k).to(dtype), v=to_fp8(batch.v).to(dtype)
    )
    ref, stored = reference_forward(rounded, 0.2, window)
    assert torch.equal(cache.to(dtype), stored)
    assert relative_error(out[:rows], ref[:rows]) < (1e-5 if dtype == torch.float32 else 1.5e-2)
    # the rounding is really there: against the unrounded cache the error is e4m3's, not float noise
    error = relative_error(out[:rows], reference_forward(batch, 0.2, window)[0][:rows])
    assert 1e-3 < error < 0.06


def test_get_attention_backend_and_allocation() -> None:
    backend = get_attention_backend(CPU, "fp8")
    assert isinstance(backend, TorchFP8KVBackend)
    caches = backend.allocate_kv_cache(2, 5, 16, 3, 64, torch.bfloat16, CPU)
    assert len(caches) == 2 and caches[0].shape == (2, 5, 16, 3, 64) and caches[0].dtype == FP8_KV_DTYPE


def test_quant_policy_values_and_errors() -> None:
    assert [parse_quant_policy(text) for text in ("0", "8", "4", "fp8")] == [0, 8, 4, "fp8"]
    for bad in ("fp16", "3", "int8"):
        with pytest.raises(argparse.ArgumentTypeError, match="choose one of 0, 4, 8, fp8"):
            parse_quant_policy(bad)
    assert EngineConfig(quant_policy="fp8").quant_policy == "fp8"
    with pytest.raises(ValueError, match=r"quant_policy='fp4' must be one of \(0, 4, 8, 'fp8'\)"):
        EngineConfig(quant_policy="fp4")


def test_cli_rejects_a_bad_policy_with_a_message(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "ppl", "--quant-policy", "e5m2"])
    assert exit_info.value.code == 2
    assert "'e5m2' is not a KV cache policy; choose one of 0, 4, 8, fp8" in capsys.readouterr().err


@pytest.mark.parametrize("model_config", [LLAMA3_8B, SMOLLM2], ids=["llama3_8b", "smollm2"])
def test_same_memory_holds_2x_the_tokens_of_bf16(
    model_config: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**30, 80 * 2**30))

    def num_blocks(policy: int | str) -> int:
        config = EngineConfig(quant_policy=policy, cache_max_entry_count=0.5)
        resolved = builder.ResolvedConfig(
            torch.device("cuda"), torch.bfloat16, 8192, 128, quant_policy=policy
        )
        return builder.num_kv_blocks(config, resolved, model_config)

    bf16, fp8 = num_blocks(0), num_blocks("fp8")
    assert fp8 in (2 * bf16, 2 * bf16 + 1)
    cache = TorchFP8KVBackend().allocate_kv_cache(
        1, 1, 1, model_config.num_key_value_heads, model_config.head_dim, torch.bfloat16, CPU
    )[0]
    allocated = cache.numel() * cache.element_size() * model_config.num_hidden_layers
    assert allocated == builder.kv_bytes_per_token(model_config, torch.bfloat16, "fp8")


def test_eval_ppl_with_fp8_kv_moves_perplexity_a_little(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`lmserve eval ppl --quant-policy fp8` runs the engine over the e4m3 cache: near plain KV, not equal to it."""
    from lmserve.quant.evaluate import evaluate_perplexity
    from tests.unit.test_quant_tiny import _tiny_model

    tiny = _tiny_model(tmp_path / "model")
    plain = evaluate_perplexity(str(tiny), "kjv", 300, 128, 96, quant_policy=0)
    args = ["eval", "ppl", str(tiny), "--quant-policy", "fp8", "--num-tokens", "300", "--window", "128"]
    assert main([*args, "--stride", "96"]) == 0
    fp8 = float(capsys.readouterr().out.split()[1])
    assert fp8 != pytest.approx(plain.perplexity, rel=1e-7)
    assert fp8 == pytest.approx(plain.perplexity, rel=3e-2)
