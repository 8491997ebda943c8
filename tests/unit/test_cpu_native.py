"""The CPU's few-row 4-bit C kernel (kernels/cpu_native.py) against float32 products of the exact 4-bit weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve.kernels import cpu_native
from lmserve.layers.linear import Linear, exact_int4, pack_int4

needs_kernel = pytest.mark.skipif(
    not cpu_native.kernel_available(), reason="no AVX512-BF16 CPU or C compiler"
)


def q4_1_weight(num_out: int, num_in: int, seed: int = 0) -> torch.Tensor:
    """A weight with llama.cpp's Q4_1 structure: per 32 inputs, d * q + m with q spanning 0..15, d and m float16."""
    generator = torch.Generator().manual_seed(seed)
    groups = num_in // 32
    codes = torch.randint(0, 16, (num_out, groups, 32), generator=generator)
    codes[..., 0], codes[..., 1] = 0, 15  # Q4_1 maps each group's min and max to 0 and 15
    d = (torch.rand(num_out, groups, 1, generator=generator) * 0.01 + 1e-4).half().float()
    m = (-torch.rand(num_out, groups, 1, generator=generator) * 0.08).half().float()
    return (codes * d + m).reshape(num_out, num_in)


def test_pack_round_trip_is_exact() -> None:
    weight = q4_1_weight(64, 256)
    exact = exact_int4(weight)
    assert exact is not None
    assert torch.equal(cpu_native.dequantize_q4(*cpu_native.pack_q4(*exact)), weight)


@needs_kernel
@pytest.mark.parametrize("num_rows", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (3072, 576), (16, 64), (32, 4096)])
def test_kernel_matches_float32_product(num_rows: int, shape: tuple[int, int]) -> None:
    num_out, num_in = shape
    weight = q4_1_weight(num_out, num_in, seed=num_rows)
    exact = exact_int4(weight)
    assert exact is not None
    packed = cpu_native.pack_q4(*exact)
    x = torch.randn(num_rows, num_in, generator=torch.Generator().manual_seed(7)).bfloat16()
    out = cpu_native.q4_linear(x, *packed)
    truth = x.float() @ weight.t()
    assert out.dtype == torch.bfloat16 and out.shape == (num_rows, num_out)
    # float32 accumulation in another order, then one rounding to bf16: within a bf16 step of the truth
    scale = x.float().abs() @ weight.abs().t()
    assert bool(((out.float() - truth).abs() <= truth.abs() * 2**-8 + scale * 1e-5).all())


@needs_kernel
@pytest.mark.parametrize("num_rows", [1, 5, 8, 9, 13, 16])
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (16, 32), (48, 4096)])
def test_gemm_matches_float32_product(num_rows: int, shape: tuple[int, int]) -> None:
    """The 5-16 row GEMM (pack_q4_panels' layout), passes of up to 8 rows: within a bf16 step of the truth."""
    num_out, num_in = shape
    weight = q4_1_weight(num_out, num_in, seed=num_rows + 100)
    exact = exact_int4(weight)
    assert exact is not None and cpu_native.panels_supported(num_out, num_in)
    x = torch.randn(num_rows, num_in, generator=torch.Generator().manual_seed(9)).bfloat16()
    out = cpu_native.q4_gemm(x, *cpu_native.pack_q4_panels(*exact))
    truth = x.float() @ weight.t()
    assert out.dtype == torch.bfloat16 and out.shape == (num_rows, num_out)
    scale = x.float().abs() @ weight.abs().t()
    assert bool(((out.float() - truth).abs() <= truth.abs() * 2**-8 + scale * 1e-5).all())
    with pytest.raises(ValueError, match="unsupported shapes"):
        cpu_native.q4_gemm(torch.randn(17, num_in).bfloat16(), *cpu_native.pack_q4_panels(*exact))


@needs_kernel
def test_linear_runs_the_gemm_for_5_to_16_rows_and_onednn_above(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = q4_1_weight(64, 128, seed=4)
    linear = Linear(128, 64, bias=False).bfloat16()
    linear.weight.data.copy_(weight)
    assert linear.keep_int4_if_exact(weight) and linear.q4_panels is not None
    calls: list[int] = []
    original = cpu_native.q4_gemm
    monkeypatch.setattr(cpu_native, "q4_gemm", lambda x, *p: calls.append(x.shape[0]) or original(x, *p))
    for rows in (4, 5, 16, 17):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).bfloat16()
        truth = x.float() @ weight.t()
        scale = x.float().abs() @ weight.abs().t()
        # the dense bf16 weight above 16 rows: rounded values, a looser bound
        assert bool(((linear(x).float() - truth).abs() <= truth.abs() * 2**-7 + scale * 2**-8).all())
    assert calls == [5, 16]


@needs_kernel
def test_kernel_no_further_from_the_truth_than_torchs_int4_kernel() -> None:
    """torch's kernel takes the scales rounded to bf16; the C kernel keeps Q4_1's float16 ones."""
    weight = q4_1_weight(1024, 1024, seed=3)
    exact = exact_int4(weight)
    assert exact is not None
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(1)).bfloat16()
    truth = x.float() @ weight.t()
    ours = cpu_native.q4_linear(x, *cpu_native.pack_q4(*exact)).float()
    packed, scales_zeros = pack_int4(*exact, torch.bfloat16)
    torchs = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros).float()
    rounded = truth.bfloat16().float()  # the best a bf16 output can do
    assert torch.equal(ours, rounded) or (ours - truth).norm() <= 1.01 * (rounded - truth).norm()
    assert (ours - truth).norm() < (torchs - truth).norm()


@needs_kernel
def test_strided_rows_and_bad_shapes() -> None:
    weight = q4_1_weight(16, 128)
    exact = exact_int4(weight)
    assert exact is not None
    packed = cpu_native.pack_q4(*exact)
    wide = torch.randn(2, 256).bfloat16()
    x = wide[:, :128]  # rows with a stride (a slice of a fused output)
    assert torch.equal(cpu_native.q4_linear(x, *packed), cpu_native.q4_linear(x.contiguous(), *packed))
    with pytest.raises(ValueError, match="unsupported shapes"):
        cpu_native.q4_linear(torch.randn(5, 128).bfloat16(), *packed)


def test_linear_uses_the_kernel_where_it_runs_and_torch_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = q4_1_weight(64, 128)
    linear = Linear(128, 64, bias=False).bfloat16()
    linear.weight.data.copy_(weight)
    assert linear.keep_int4_if_exact(weight)
    assert (linear.q4 is not None) == cpu_native.kernel_available() and linear.has_4bit_copy
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(5)).bfloat16()
    truth = x.float() @ weight.t()
    tolerance = (
        truth.abs() * 2**-7 + (x.float().abs() @ weight.abs().t()) * 2**-8
    )  # bf16 scales on torch's path
    assert bool(((linear(x).float() - truth).abs() <= tolerance).all())

    monkeypatch.setattr(
        cpu_native, "kernel_available", lambda: False
    )  # no AVX512-BF16, no compiler, or disabled
    assert linear.keep_int4_if_exact(weight)
    assert linear.q4 is None and linear.int4 is not None
    assert bool(((linear(x).float() - truth).abs() <= tolerance).all())


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_native.NATIVE_ENV, "0")
    cpu_native._forget_library()
    try:
        assert not cpu_native.kernel_available()
    finally:
        monkeypatch.delenv(cpu_native.NATIVE_ENV)
        cpu_native._forget_library()


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 576), (3, 576), (128, 576), (2, 100), (1, 4096)])
@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_torch(shape: tuple[int, int], residual_dtype: torch.dtype) -> None:
    """The sum exactly, the norm as F.rms_norm in float32 rounded once to bf16 (at most a last bit apart)."""
    generator = torch.Generator().manual_seed(shape[0])
    x = torch.randn(shape, generator=generator).bfloat16()
    residual = (torch.randn(shape, generator=generator) * 4).to(residual_dtype)
    weight = torch.rand(shape[1], generator=generator) + 0.5
    truth_sum = residual.float() + x.float()
    truth = torch.nn.functional.rms_norm(truth_sum, (shape[1],), weight, 1e-5)
    given = residual.clone()
    normed, summed = cpu_native.add_rms_norm(x, given, weight, 1e-5)
    assert summed.dtype == torch.float32 and torch.equal(summed, truth_sum)
    if residual_dtype == torch.float32:
        assert summed.data_ptr() == given.data_ptr()  # the float32 stream is updated in place
    assert normed.dtype == torch.bfloat16
    assert bool(((normed.float() - truth).abs() <= truth.abs() * 2**-8).all())
    assert (normed != truth.bfloat16()).float().mean() < 0.01


def attention_truth(
    q: torch.Tensor,
    cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """float32 SDPA per sequence over its keys read one by one through its block table."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = cache.shape[1], cache.shape[3]
    out = []
    for s in range(num_seqs):
        length = int(lens[s])
        positions = torch.arange(max(0, length - window) if window else 0, length)
        blocks, offsets = tables[s][positions // block_size].long(), positions % block_size
        keys, values = cache[0][:, blocks, offsets].float(), cache[1][:, blocks, offsets].float()
        queries = q[s].float().view(num_kv_heads, num_heads // num_kv_heads, head_dim)
        out.append(torch.nn.functional.scaled_dot_product_attention(queries, keys, values, scale=scale))
    return torch.stack(out).reshape(num_seqs, num_heads, head_dim)


@needs_kernel
@pytest.mark.parametrize(
    "num_seqs, num_heads, num_kv_heads, head_dim, length, window",
    [(1, 9, 3, 64, 200, None), (1, 9, 3, 64, 1, None), (4, 9, 3, 64, 513, None), (3, 8, 8, 128, 300, 64),
     (2, 16, 2, 64, 1000, None), (5, 4, 1, 256, 129, 1000), (1, 8, 1, 128, 700, 300), (1, 3, 1, 64, 130, None),
     (1, 4, 1, 64, 1000, None)],
)  # fmt: skip
def test_decode_attention_matches_sdpa(
    num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int, length: int, window: int | None
) -> None:
    """Ragged lengths over shuffled blocks, GQA groups, sliding windows: within the bf16 rounding of the truth."""
    generator = torch.Generator().manual_seed(length)
    num_blocks, block_size = 80, 16
    cache = torch.randn(2, num_kv_heads, num_blocks, block_size, head_dim, generator=generator).bfloat16()
    tables = torch.stack([torch.randperm(num_blocks, generator=generator).int() for _ in range(num_seqs)])
    lens = torch.tensor([max(1, length - 7 * s) for s in range(num_seqs)], dtype=torch.int32)
    q = torch.randn(num_seqs, num_heads, head_dim, generator=generator).bfloat16()
    out = cpu_native.decode_attention(q, cache, tables, lens, head_dim**-0.5, window)
    truth = attention_truth(q, cache, tables, lens, head_dim**-0.5, window)
    assert out.dtype == torch.bfloat16
    assert bool(((out.float() - truth).abs() <= truth.abs() * 2**-8 + 1e-6).all())


@needs_kernel
def test_decode_attention_rejects_what_it_cannot_run() -> None:
    q = torch.randn(1, 4, 48).bfloat16()  # head_dim not a multiple of 32
    cache = torch.randn(2, 2, 4, 16, 48).bfloat16()
    assert not cpu_native.decode_attention_supported(q, cache)
    assert not cpu_native.decode_attention_supported(q.float(), cache.float())
    with pytest.raises(ValueError, match="unsupported shapes"):
        cpu_native.decode_attention(
            q, cache, torch.zeros(1, 4, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0, None
        )


@needs_kernel
@pytest.mark.parametrize("num_tokens", [1, 5])
def test_rotary_store_is_the_torch_path_bit_for_bit(num_tokens: int) -> None:
    """Rotating in place inside the fused qkv rows and storing k/v gives the bits of rotate_in_place + the
    backend's store (HF's rotate-half roundings); a -1 slot is not stored."""
    from lmserve.attention.torch_backend import CPUAttentionBackend
    from lmserve.layers.rotary import RotaryEmbedding, rotate_in_place

    num_heads, num_kv_heads, head_dim, num_blocks, block_size = 9, 3, 64, 6, 16
    generator = torch.Generator().manual_seed(num_tokens)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).bfloat16()
    with torch.device("cpu"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            rope = RotaryEmbedding(head_dim, 256, 10000.0, None)
        finally:
            torch.set_default_dtype(torch.float32)
    cos, sin = rope.lookup(torch.arange(40, 40 + num_tokens))
    slots = torch.tensor([17, 3, -1, 60, 95][:num_tokens])

    def split(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads = rows.view(num_tokens, -1, head_dim)
        return (
            heads[:, :num_heads],
            heads[:, num_heads : num_heads + num_kv_heads],
            heads[:, num_heads + num_kv_heads :],
        )

    backend = CPUAttentionBackend()
    shape = backend.cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    expected_cache, cache = torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16)
    expected = qkv.clone()
    q, k, v = split(expected)
    rotate_in_place(q, cos, sin)
    rotate_in_place(k, cos, sin)
    kept = slots >= 0
    backend.store(expected_cache, k[kept], v[kept], slots[kept])

    q, k, v = split(qkv)
    assert cpu_native.rotary_store_supported(q, k, v, cache)
    cpu_native.rotary_store(q, k, cache, cos, sin, slots)
    assert torch.equal(qkv, expected) and torch.equal(cache, expected_cache)


@needs_kernel
@pytest.mark.parametrize("num_tokens", [1, 7, 128])
def test_silu_and_mul_matches_torch(num_tokens: int) -> None:
    """torch's two roundings (silu to bf16, then the product); the exp polynomial may move a last bit rarely."""
    gate_up = (
        torch.randn(num_tokens, 3072, generator=torch.Generator().manual_seed(num_tokens)) * 3
    ).bfloat16()
    truth = torch.nn.functional.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    out = cpu_native.silu_and_mul(gate_up)
    assert out is not None and out.dtype == torch.bfloat16
    assert (out != truth).float().mean() < 1e-3
    assert bool(((out.float() - truth.float()).abs() <= truth.float().abs() * 2**-7).all())
    assert cpu_native.silu_and_mul(gate_up.float()) is None  # other dtypes stay in torch


@needs_kernel
@pytest.mark.parametrize("num_rows", [1, 3, 4])
def test_int8_logits_are_the_float32_product(num_rows: int) -> None:
    """The lm_head's int8 copy: float32 logits of the same codes and scales (torch's kernel rounds to bf16)."""
    from lmserve.layers.linear import pack_int8

    generator = torch.Generator().manual_seed(num_rows)
    codes, scales = pack_int8(torch.randn(4096, 576, generator=generator) * 0.05, torch.bfloat16)
    x = torch.randn(num_rows, 576, generator=generator).bfloat16()
    truth = x.float() @ (codes.float() * scales.float()[:, None]).t()
    logits = cpu_native.int8_logits(x, codes, scales)
    assert logits is not None and logits.dtype == torch.float32
    torch.testing.assert_close(logits, truth, rtol=1e-5, atol=1e-5 * truth.abs().max().item())
    assert cpu_native.int8_logits(torch.randn(5, 576).bfloat16(), codes, scales) is None  # > MAX_ROWS: torch


@needs_kernel
def test_exact_q4_in_c_is_exact_int4s_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-pass C check gives exact_int4's codes, scales and lows bit for bit, and its verdicts."""
    weight = q4_1_weight(96, 256, seed=11)
    weight[5, :32] = 0.25  # a constant group: scale 0
    off = weight.clone()
    off[7, 3] += 1e-3  # one value off the grid
    noise = torch.randn(32, 64)
    native = [cpu_native.exact_q4(w) for w in (weight, off, noise)]
    monkeypatch.setattr(cpu_native, "kernel_available", lambda: False)
    torch_path = [exact_int4(w) for w in (weight, off, noise)]
    assert native[1] is None and torch_path[1] is None and native[2] is None and torch_path[2] is None
    assert native[0] is not None and torch_path[0] is not None
    assert all(torch.equal(a, b) for a, b in zip(native[0], torch_path[0], strict=True))


def test_installed_library_comes_before_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """install.sh's copy (prebuild) is what build() returns; an older copy there is dropped; nothing compiled
    into the cache."""
    from lmserve.kernels import cpu_build

    if cpu_build.build() is None:
        pytest.skip("no CPU kernels on this machine")
    monkeypatch.setattr(cpu_build, "PREBUILT_DIR", tmp_path / "prebuilt")
    monkeypatch.setenv("LMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "prebuilt").mkdir()
    older = tmp_path / "prebuilt" / "lmserve_cpu-0123456789abcdef.so"
    older.write_bytes(b"")
    path = cpu_build.prebuild()
    assert path is not None and path.parent == tmp_path / "prebuilt" and path.stat().st_size > 0
    assert not older.exists()
    assert cpu_build.build() == path
    assert not (tmp_path / "cache").exists()
