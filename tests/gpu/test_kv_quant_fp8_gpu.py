"""FP8 (e4m3) KV cache on CUDA: the plain Triton kernels storing and reading e4m3 against torch references, the
backend against the CPU reference, and the engine (CUDA graphs, prefix caching) against its bf16 cache.

The check_* functions take the device so tests/unit/test_kv_quant_fp8_interpret.py runs them on the CPU under
TRITON_INTERPRET at small shapes (float16 there: the interpreter's numpy has no bfloat16).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from lmserve.attention.kv_fp8 import FP8_KV_DTYPE, TorchFP8KVBackend, to_fp8
from lmserve.attention.metadata import AttentionMetadata
from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig
from lmserve.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from lmserve.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from lmserve.kernels.rotary import apply_rotary_ref, build_cos_sin_cache
from lmserve.kernels.testing import TOLERANCE, backend_step, make_paged_batch, relative_error

CUDA = torch.device("cuda")
BATCHES = {  # (query_lens, seq_lens): decodes first, then prefill chunks (shorter than the sequence: a prefix)
    "mixed": ([1, 1, 1, 100, 64, 7], [5, 1, 2048, 612, 64, 4000]),
    "decode_only": ([1] * 6, [1, 2, 33, 700, 2049, 4096]),
    "prefill_only": ([512, 3, 1000], [512, 40, 3000]),
}
HEAD_LAYOUTS = {"llama3_8b": (32, 8, 128), "smollm2": (9, 3, 64)}
E4M3_STEP = 2.0**-3  # relative spacing of e4m3 normals: one rounding moves a value by at most half of it


def fp8_batch(
    query_lens: list[int], seq_lens: list[int], layout: tuple[int, int, int], block_size: int,
    dtype: torch.dtype, device: torch.device, seed: int = 0,
) -> tuple[Any, torch.Tensor]:  # fmt: skip
    batch = make_paged_batch(query_lens, seq_lens, *layout, block_size, dtype, device, 1, seed)
    return batch, to_fp8(batch.layer_cache)


def check_decode(
    device: torch.device, dtype: torch.dtype, layout: tuple[int, int, int], block_size: int, seq_lens: list[int],
    num_splits: int | None, block_n: int | None,
) -> None:  # fmt: skip
    """Decode attention reading e4m3 equals the float32 reference over the same e4m3 values."""
    batch, cache = fp8_batch(
        [1] * len(seq_lens), seq_lens, layout, block_size, dtype, device, seed=len(seq_lens)
    )
    meta = batch.meta
    q = batch.q[: meta.num_decodes]
    out = paged_decode_attention(
        q, cache[0], cache[1], meta.block_tables, meta.seq_lens, 0.3, num_splits=num_splits, block_n=block_n
    )
    wide = cache.float()
    ref = paged_decode_attention_ref(q, wide[0], wide[1], meta.block_tables, meta.seq_lens, 0.3)
    assert relative_error(out, ref) < TOLERANCE[dtype]


def check_prefill(
    device: torch.device, dtype: torch.dtype, layout: tuple[int, int, int], block_size: int,
    query_lens: list[int], seq_lens: list[int], block_m: int, block_n: int,
) -> None:  # fmt: skip
    """Prefill chunks over an e4m3 prefix (and their own e4m3 K/V) against the float32 reference."""
    batch, cache = fp8_batch(query_lens, seq_lens, layout, block_size, dtype, device)
    meta = batch.meta
    num_decodes = meta.num_decodes
    args = (batch.q, cache[0], cache[1], meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.3)
    out = paged_prefill_attention(
        *args, first_seq=num_decodes, num_seqs=meta.num_seqs - num_decodes, max_query_len=max(query_lens),
        block_m=block_m, block_n=block_n,
    )  # fmt: skip
    wide = cache.float()
    ref = paged_prefill_attention_ref(
        batch.q, wide[0], wide[1], *args[3:], first_seq=num_decodes, num_seqs=meta.num_seqs - num_decodes
    )
    rows = slice(int(meta.query_start_loc[num_decodes]), meta.num_tokens)
    assert relative_error(out[rows], ref[rows]) < TOLERANCE[dtype]


def check_backend(
    device: torch.device, dtype: torch.dtype, layout: tuple[int, int, int], block_size: int,
    query_lens: list[int], seq_lens: list[int], representable: bool = False, sliding_window: int | None = None,
) -> None:  # fmt: skip
    """TritonFP8KVBackend == TorchFP8KVBackend on one step: the same e4m3 bytes stored, the same output.

    representable: the new K/V are e4m3 values already, so storing them rounds nothing (Triton 3.6's interpreter
    rounds float -> e4m3 wrongly: 0.4851 -> 0.25; the GPU's cvt.rn.satfinite is right, so CUDA runs False).
    """
    from lmserve.attention.triton_backend import TritonFP8KVBackend

    batch, cache = fp8_batch(query_lens, seq_lens, layout, block_size, dtype, device)
    if representable:
        batch = dataclasses.replace(batch, k=to_fp8(batch.k).to(dtype), v=to_fp8(batch.v).to(dtype))
    ref_cache, meta = cache.cpu().clone(), _on_cpu(batch.meta)
    out = backend_step(
        TritonFP8KVBackend(), batch.q, batch.k, batch.v, cache, batch.meta, 0.25, sliding_window
    )
    ref = backend_step(
        TorchFP8KVBackend(),
        batch.q.cpu(),
        batch.k.cpu(),
        batch.v.cpu(),
        ref_cache,
        meta,
        0.25,
        sliding_window,
    )
    rows = batch.meta.num_tokens
    assert relative_error(out[:rows].cpu(), ref[:rows]) < TOLERANCE[dtype]
    assert torch.equal(cache.cpu().view(torch.uint8), ref_cache.view(torch.uint8))


def _on_cpu(meta: AttentionMetadata) -> AttentionMetadata:
    """The metadata with its tensors copied to the CPU (the torch reference's device)."""
    tensors = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}
    return dataclasses.replace(
        meta, **{k: v.cpu() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    )


def check_rotary_store(device: torch.device, dtype: torch.dtype, layout: tuple[int, int, int]) -> None:
    """The fused rotary + store writes rotate(k) and v rounded once to e4m3 (within one e4m3 step of the
    reference, which rounds through the model dtype first); padding slots write nothing."""
    from lmserve.kernels.kv_write import rotary_store_kv

    num_q_heads, num_kv_heads, head_dim = layout
    batch, cache = fp8_batch([1, 5, 3], [7, 9, 3], layout, 4, dtype, device)
    before = cache.clone()
    slots = batch.meta.slot_mapping
    positions = torch.arange(slots.shape[0], device=device) % 7
    table = build_cos_sin_cache(16, head_dim, 10000.0, device)
    q, k, v = batch.q.clone(), batch.k.clone(), batch.v.clone()
    rotary_store_kv(q, k, batch.v, cache[0], cache[1], slots, positions, table)
    apply_rotary_ref(batch.q, k, positions, table)
    written = slots >= 0
    flat, before_flat = cache.flatten(1, 2).float(), before.flatten(1, 2).float()
    for index, expected in enumerate((k, v)):
        got, want = flat[index, slots[written]], to_fp8(expected[written]).float()
        assert ((got - want).abs() <= E4M3_STEP * want.abs() + 2.0**-9).all()
    untouched = torch.ones(flat.shape[1], dtype=torch.bool, device=device)
    untouched[slots[written]] = False
    assert torch.equal(flat[:, untouched], before_flat[:, untouched])
    assert cache.dtype == FP8_KV_DTYPE and relative_error(q, batch.q) < TOLERANCE[dtype]


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("num_splits", [None, 1])
@pytest.mark.parametrize("block_n", [None, 64])  # None: the shipped fp8 tile (DECODE_TILES)
def test_decode_matches_reference(
    dtype: torch.dtype, layout: str, num_splits: int | None, block_n: int | None
) -> None:
    check_decode(CUDA, dtype, HEAD_LAYOUTS[layout], 64, BATCHES["decode_only"][1], num_splits, block_n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("name", ["mixed", "prefill_only"])
def test_prefill_matches_reference(dtype: torch.dtype, layout: str, name: str) -> None:
    check_prefill(CUDA, dtype, HEAD_LAYOUTS[layout], 16, *BATCHES[name], 64, 64)


@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("name", list(BATCHES))
def test_backend_matches_torch_backend(layout: str, name: str) -> None:
    check_backend(CUDA, torch.bfloat16, HEAD_LAYOUTS[layout], 64, *BATCHES[name])


@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
def test_rotary_store_writes_e4m3(layout: str) -> None:
    check_rotary_store(CUDA, torch.bfloat16, HEAD_LAYOUTS[layout])


def make_engine(quant_policy: int | str, **config: Any) -> LLMEngine:
    from tests.gpu.test_kv_quant_gpu import make_engine as make_tiny_engine
    from tests.models.model_helpers import tiny_hf_model

    shape = dict(vocab_size=512, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    hf_model = tiny_hf_model("llama", tie_word_embeddings=False, **shape)
    return make_tiny_engine(hf_model, quant_policy, **config)


def test_engine_graphs_prefix_caching_and_bf16_agree() -> None:
    """CUDA graphs and eager read the same e4m3 cache; a prefix hit reads the blocks another request stored;
    greedy tokens track the bf16 cache's."""
    from tests.engine.test_engine_tiny import random_prompts, run_all
    from tests.gpu.test_kv_quant_gpu import assert_divergences_are_near_ties, run_with_logprobs

    greedy = GenerationConfig(max_new_tokens=24, ignore_eos=True, do_sample=False)
    prompts = random_prompts(6, 512, seed=5, low=5, high=90)
    graphs = make_engine("fp8")
    assert graphs.runner.kv_caches[0].dtype == FP8_KV_DTYPE
    tokens, graph_logprobs = run_with_logprobs(graphs, prompts)
    eager, eager_logprobs = run_with_logprobs(make_engine("fp8", eager_mode=True), prompts)
    # both read the same e4m3 bytes; the replay's decode splits differ (measured on the H200: 6 of 6 identical)
    assert_divergences_are_near_ties(tokens, eager, graph_logprobs, eager_logprobs)
    assert sum(a == b for a, b in zip(tokens, eager, strict=True)) >= 5
    prefix = (prompts[0] * 30)[:128]  # two whole 64-token blocks shared by all six
    shared = [prefix + p for p in prompts]
    cached = make_engine("fp8", enable_prefix_caching=True)
    first = run_all(cached, shared[:1], greedy)
    rest = run_all(cached, shared[1:], greedy)
    assert cached.stats().prefix_cache_hits > 0
    uncached = run_all(make_engine("fp8", enable_prefix_caching=False), shared, greedy)
    # a hit's chunk tiles its queries from another position than a full prefill: float sums in another order
    # (measured on the H200: 6 of 6 identical)
    assert sum(a == b for a, b in zip(first + rest, uncached, strict=True)) >= 4
    reference, reference_logprobs = run_with_logprobs(make_engine(0), prompts)
    # e4m3 keeps 3 mantissa bits: before the runs part, the fp8 cache moved each chosen logprob by up to
    # 0.019 nats (H200), and this random model's top two tokens are often closer than that: 5 of 6 sequences
    # parted (at positions 2-14), each where the two tokens were 0-0.008 nats apart in the fp8 run and
    # 0-0.023 in the bf16 one (logits 0-2 bf16 ulps apart). So no count of identical sequences is asserted
    # (it measured 1 of 6, while the xfail'd count asked for 2), but every divergence must be a tie within
    # 0.05 nats (2.5x the largest shift) in both runs, and the first tokens agree (6 of 6 measured).
    assert_divergences_are_near_ties(tokens, reference, graph_logprobs, reference_logprobs, margin=0.05)
    assert sum(a[0] == b[0] for a, b in zip(tokens, reference, strict=True)) >= 5
