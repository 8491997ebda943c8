"""Quantized KV cache on the CPU: round trips, int4 packing, the torch backend against plain attention, sizing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmserve.attention.backend import get_attention_backend
from lmserve.attention.kv_quant import QuantizedKVCache, TorchQuantKVBackend
from lmserve.attention.torch_backend import TorchAttentionBackend
from lmserve.config import EngineConfig
from lmserve.engine import builder
from lmserve.kernels.decode_attention import paged_decode_attention_ref
from lmserve.kernels.kv_quant import dequantize_kv_ref, quantize_kv_ref
from lmserve.kernels.prefill_attention import paged_prefill_attention_ref
from lmserve.kernels.testing import PagedBatch, make_paged_batch, relative_error
from lmserve.models.config import ModelConfig

CPU = torch.device("cpu")
# ||dequantize(quantize(x)) - x|| / ||x|| on standard normal heads of 64: a uniform rounding error of
# scale / 2 with scale = range / (2**bits - 1), range ~ 5 sigma, gives ~0.6% (int8) and ~10% (int4).
ROUND_TRIP_ERROR = {8: 0.01, 4: 0.12}
# attention output vs the unquantized cache on random data (scores and values both perturbed)
ATTENTION_ERROR = {8: 0.01, 4: 0.15}


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_bounded_by_half_a_step(bits: int) -> None:
    x = torch.randn(50, 3, 64) * torch.linspace(0.1, 30, 50)[:, None, None] + 5
    codes, params = quantize_kv_ref(x, bits)
    assert codes.dtype == torch.uint8 and codes.shape == (50, 3, 64 * bits // 8)
    assert params.dtype == torch.float16 and params.shape == (50, 3, 2)
    restored = dequantize_kv_ref(codes, params, bits, torch.float32)
    step = params[..., :1].float()
    # half a step from rounding, plus the float16 rounding of zero (relative 2^-11) felt at the range's ends
    bound = step / 2 + x.abs().amax(-1, keepdim=True) * 2.0**-11
    assert ((restored - x).abs() <= bound).all()
    unit = torch.randn(200, 4, 64)
    error = relative_error(dequantize_kv_ref(*quantize_kv_ref(unit, bits), bits, torch.float32), unit)
    assert error < ROUND_TRIP_ERROR[bits]


def test_int4_packs_dim_j_low_and_dim_j_plus_half_high() -> None:
    x = torch.tensor([[0.0, 1, 2, 3, 15, 14, 13, 12]])  # scale 1, zero 0: codes equal the values
    codes, params = quantize_kv_ref(x, 4)
    assert params.tolist() == [[1.0, 0.0]]
    assert codes.tolist() == [[0 | 15 << 4, 1 | 14 << 4, 2 | 13 << 4, 3 | 12 << 4]]
    assert torch.equal(dequantize_kv_ref(codes, params, 4, torch.float32), x)


@pytest.mark.parametrize("bits", [8, 4])
def test_constant_head_round_trips_exactly(bits: int) -> None:
    x = torch.full((2, 1, 16), -3.25)
    assert torch.equal(dequantize_kv_ref(*quantize_kv_ref(x, bits), bits, torch.float32), x)


def quantized(batch: PagedBatch, bits: int) -> QuantizedKVCache:
    return QuantizedKVCache(*quantize_kv_ref(batch.layer_cache, bits), bits)


def attention_over(cache: torch.Tensor, batch: PagedBatch, scale: float) -> torch.Tensor:
    """The kernel references over a plain cache that already holds the new K/V."""
    meta = batch.meta
    args = (batch.q, cache[0], cache[1], meta.block_tables, meta.seq_lens)
    out = paged_prefill_attention_ref(
        *args,
        meta.query_start_loc,
        scale,
        first_seq=meta.num_decodes,
        num_seqs=meta.num_seqs - meta.num_decodes,
    )
    out[: meta.num_decodes] = paged_decode_attention_ref(batch.q[: meta.num_decodes], *args[1:], scale)
    return out[: meta.num_tokens]


BATCHES = {  # (query_lens, seq_lens): decodes first, then prefill chunks (a chunk shorter than its sequence has a prefix)
    "mixed": ([1, 1, 1, 30, 7], [5, 1, 70, 30, 50]),
    "decode_only": ([1, 1, 1], [1, 9, 66]),
    "prefill_only": ([40, 3], [40, 20]),
}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(BATCHES))
def test_torch_backend_is_plain_attention_over_the_dequantized_cache(bits: int, name: str) -> None:
    batch = make_paged_batch(*BATCHES[name], 6, 2, 32, 8, torch.float32, CPU, num_padding_tokens=2)
    cache, scale = quantized(batch, bits), 32**-0.5
    out = TorchQuantKVBackend(bits).forward(batch.q, batch.k, batch.v, cache, batch.meta, scale)
    rows = batch.meta.num_tokens
    # independent truth 1: the new tokens went in quantized, padding rows wrote nothing
    expected = quantized(batch, bits)
    valid = batch.meta.slot_mapping[:rows]
    for index, x in enumerate((batch.k, batch.v)):
        codes, params = quantize_kv_ref(x[:rows], bits)
        expected.codes[index].view(-1, *codes.shape[1:])[valid] = codes
        expected.params[index].view(-1, *params.shape[1:])[valid] = params
    assert torch.equal(cache.codes, expected.codes) and torch.equal(cache.params, expected.params)
    # 2: attention is the reference math over the dequantized cache
    assert relative_error(out[:rows], attention_over(cache.dequantize(torch.float32), batch, scale)) < 1e-5
    # 3: and close to the unquantized backend on the original data
    # (the plain backend's decode-only path takes no padding rows: cut them off)
    plain_meta = dataclasses.replace(batch.meta, slot_mapping=batch.meta.slot_mapping[:rows])
    plain_out = TorchAttentionBackend().forward(
        batch.q[:rows], batch.k[:rows], batch.v[:rows], batch.layer_cache.clone(), plain_meta, scale
    )
    assert relative_error(out[:rows], plain_out) < ATTENTION_ERROR[bits]
    assert not out[rows:].any()


def test_torch_backend_runs_in_bfloat16() -> None:
    batch = make_paged_batch(*BATCHES["mixed"], 6, 2, 32, 8, torch.bfloat16, CPU)
    cache = quantized(batch, 8)
    out = TorchQuantKVBackend(8).forward(batch.q, batch.k, batch.v, cache, batch.meta, 0.2)
    ref = attention_over(cache.dequantize(torch.bfloat16), batch, 0.2)
    assert out.dtype == torch.bfloat16 and relative_error(out, ref) < 1.5e-2


def test_get_attention_backend_picks_by_policy() -> None:
    assert isinstance(get_attention_backend(CPU), TorchAttentionBackend)
    for policy in (8, 4):
        backend = get_attention_backend(CPU, policy)
        assert isinstance(backend, TorchQuantKVBackend) and backend.bits == policy
    with pytest.raises(ValueError, match="quant_policy=3"):
        get_attention_backend(CPU, 3)


@pytest.mark.parametrize("policy", [8, 4])
def test_allocation_layout(policy: int) -> None:
    caches = get_attention_backend(CPU, policy).allocate_kv_cache(2, 5, 16, 3, 64, torch.bfloat16, CPU)
    assert len(caches) == 2
    assert caches[0].codes.shape == (2, 5, 16, 3, 64 * policy // 8) and caches[0].codes.dtype == torch.uint8
    assert caches[0].params.shape == (2, 5, 16, 3, 2)


LLAMA3_8B = ModelConfig.from_hf_config(
    {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
    }
)
SMOLLM2 = dataclasses.replace(LLAMA3_8B, num_key_value_heads=3, head_dim=64, num_hidden_layers=30)


@pytest.mark.parametrize("model_config", [LLAMA3_8B, SMOLLM2], ids=["llama3_8b", "smollm2"])
def test_same_memory_holds_2x_and_4x_the_blocks(
    model_config: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA-style sizing (a fraction of free memory), with a made-up free-memory number."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**30, 80 * 2**30))

    def num_blocks(policy: int) -> int:
        config = EngineConfig(quant_policy=policy, cache_max_entry_count=0.5)
        resolved = builder.ResolvedConfig(
            torch.device("cuda"), torch.bfloat16, 8192, 128, quant_policy=policy
        )
        return builder.num_kv_blocks(config, resolved, model_config)

    bf16 = num_blocks(0)
    assert bf16 * 64 * builder.kv_bytes_per_token(model_config, torch.bfloat16) <= 20 * 2**30
    assert num_blocks(8) >= 1.8 * bf16
    assert num_blocks(4) >= 3 * bf16
    # and what is allocated really has that many bytes per token
    cache = get_attention_backend(CPU, 4).allocate_kv_cache(
        1, 1, 1, model_config.num_key_value_heads, model_config.head_dim, torch.bfloat16, CPU
    )[0]
    allocated = (cache.codes.numel() + 2 * cache.params.numel()) * model_config.num_hidden_layers
    assert allocated == builder.kv_bytes_per_token(model_config, torch.bfloat16, 4)
