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
from lmserve.kernels.hadamard import hadamard_matrix, rotate
from lmserve.kernels.kv_quant import dequantize_kv_ref, quantize_kv_ref
from lmserve.kernels.prefill_attention import paged_prefill_attention_ref
from lmserve.kernels.testing import PagedBatch, backend_step, make_paged_batch, relative_error
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


def quantized(
    batch: PagedBatch, bits: int, rotations: tuple[bool, bool] = (False, False)
) -> QuantizedKVCache:
    """The batch's earlier context quantized, in the rotated space for the parts a backend rotates."""
    parts = [rotate(x) if rotated else x for x, rotated in zip(batch.layer_cache, rotations, strict=True)]
    return QuantizedKVCache(*quantize_kv_ref(torch.stack(parts), bits), bits)


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


def hadamard_by_definition(dim: int) -> torch.Tensor:
    """H[i, j] = (-1)^popcount(i & j) / sqrt(dim): the Sylvester matrix written out entry by entry."""
    index = torch.arange(dim)
    bits = index[:, None] & index[None, :]
    parity = torch.zeros_like(bits)
    for shift in range(dim.bit_length()):
        parity ^= (bits >> shift) & 1
    return (1 - 2 * parity).double() / dim**0.5


@pytest.mark.parametrize("dim", [1, 2, 64, 128])
def test_hadamard_is_sylvester_symmetric_and_orthonormal(dim: int) -> None:
    matrix = hadamard_matrix(dim, torch.float64, CPU)
    assert torch.equal(matrix, hadamard_by_definition(dim)) and torch.equal(matrix, matrix.T)
    assert torch.allclose(matrix @ matrix, torch.eye(dim, dtype=torch.float64), atol=1e-12)


def test_hadamard_of_other_dims_is_block_diagonal_and_orthonormal() -> None:
    matrix = hadamard_matrix(80, torch.float64, CPU)  # 80 = 64 + 16
    assert torch.equal(matrix[:64, :64], hadamard_by_definition(64))
    assert torch.equal(matrix[64:, 64:], hadamard_by_definition(16)) and not matrix[:64, 64:].any()
    assert torch.allclose(matrix @ matrix.T, torch.eye(80, dtype=torch.float64), atol=1e-12)
    q, k = torch.randn(5, 80, dtype=torch.float64), torch.randn(7, 80, dtype=torch.float64)
    assert torch.allclose(rotate(q) @ rotate(k).T, q @ k.T) and torch.allclose(rotate(rotate(q)), q)


def outlier_keys(num_tokens: int, num_heads: int, head_dim: int, seed: int = 0) -> torch.Tensor:
    """Keys with a few large fixed channels, as after rotary in SmolLM2 (the case per-token int4 misses)."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_tokens, num_heads, head_dim, generator=generator)
    keys[..., [3, 17, 40]] *= 20
    return keys


def test_rotation_shrinks_the_int4_key_error_on_outlier_channels() -> None:
    keys, queries = outlier_keys(256, 2, 64), torch.randn(16, 2, 64)

    def score_error(rotated: bool) -> float:
        stored = rotate(keys) if rotated else keys
        restored = dequantize_kv_ref(*quantize_kv_ref(stored, 4), 4, torch.float32)
        restored = rotate(restored) if rotated else restored
        return relative_error(torch.einsum("qhd,khd->hqk", queries, restored), queries_times(keys, queries))

    def queries_times(k: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.einsum("qhd,khd->hqk", q, k)

    assert score_error(rotated=True) < 0.5 * score_error(rotated=False)


def expected_cache(batch: PagedBatch, backend: TorchQuantKVBackend) -> QuantizedKVCache:
    """The cache before the step, with the new (rotated where the backend rotates) K/V quantized into it."""
    bits, rows = backend.bits, batch.meta.num_tokens
    rotations = (backend.rotate_keys, backend.rotate_values)
    expected = quantized(batch, bits, rotations)
    valid = batch.meta.slot_mapping[:rows]
    for index, (x, rotated) in enumerate(zip((batch.k, batch.v), rotations, strict=True)):
        codes, params = quantize_kv_ref((rotate(x) if rotated else x)[:rows], bits)
        expected.codes[index].view(-1, *codes.shape[1:])[valid] = codes
        expected.params[index].view(-1, *params.shape[1:])[valid] = params
    return expected


def test_int4_rotates_keys_and_values_int8_does_not() -> None:
    assert TorchQuantKVBackend(4).rotate_keys and TorchQuantKVBackend(4).rotate_values
    assert not TorchQuantKVBackend(8).rotate_keys and not TorchQuantKVBackend(8).rotate_values


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(BATCHES))
def test_torch_backend_is_plain_attention_over_the_dequantized_cache(bits: int, name: str) -> None:
    batch = make_paged_batch(*BATCHES[name], 6, 2, 32, 8, torch.float32, CPU, num_padding_tokens=2)
    backend, scale = TorchQuantKVBackend(bits), 32**-0.5
    cache = quantized(batch, bits, (backend.rotate_keys, backend.rotate_values))
    out = backend_step(backend, batch.q, batch.k, batch.v, cache, batch.meta, scale)
    rows = batch.meta.num_tokens
    # independent truth 1: the new tokens went in quantized (after the rotation), padding rows wrote nothing
    expected = expected_cache(batch, backend)
    assert torch.equal(cache.codes, expected.codes) and torch.equal(cache.params, expected.params)
    # 2: attention is the reference math over the dequantized cache (scores in the rotated space when
    # keys are rotated, the output rotated back when values are)
    plain_cache = cache.dequantize(torch.float32)
    rotated_batch = dataclasses.replace(batch, q=rotate(batch.q) if backend.rotate_keys else batch.q)
    ref = attention_over(plain_cache, rotated_batch, scale)
    ref = rotate(ref) if backend.rotate_values else ref
    assert relative_error(out[:rows], ref) < 1e-5
    # 3: and close to the unquantized backend on the original data
    # (the real rows; the padding rows must read as zeros, below)
    plain_meta = dataclasses.replace(batch.meta, slot_mapping=batch.meta.slot_mapping[:rows])
    plain_out = backend_step(
        TorchAttentionBackend(),
        batch.q[:rows], batch.k[:rows], batch.v[:rows], batch.layer_cache.clone(), plain_meta, scale,
    )  # fmt: skip
    assert relative_error(out[:rows], plain_out) < ATTENTION_ERROR[bits]
    assert not out[rows:].any()


def test_torch_backend_runs_in_bfloat16() -> None:
    batch = make_paged_batch(*BATCHES["mixed"], 6, 2, 32, 8, torch.bfloat16, CPU)
    cache = quantized(batch, 8)
    out = backend_step(TorchQuantKVBackend(8), batch.q, batch.k, batch.v, cache, batch.meta, 0.2)
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
