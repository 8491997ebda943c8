"""Quantization quality on the real SmolLM2-135M within CI time (8 x 128 calibration, 2048 held-out tokens).

The full-size check (16 x 256 calibration, 20k tokens) is `slow`, in test_quant_models.py; the numbers
are in benchmarks/quant_quality.md. The truth here is the unquantized model's own perplexity. The issue's
+15% goal for AWQ is defined at that size; here it holds too (+13.7% measured on this CI size).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.quant.evaluate import evaluate_perplexity
from lmserve.quant.quantize import AWQOptions, CalibrationOptions, auto_awq, smooth_quant

CALIB = CalibrationOptions(calib_samples=8, calib_seqlen=128)
AWQ_CALIB = CalibrationOptions(calib_samples=8, calib_seqlen=256)
"""2048 tokens: more than down_proj's 1536 inputs, so its GPTQ Hessian has full rank. With 8 x 128 the search's
result swung with the summation order (held-out ppl 18.27 with one CPU thread, 19.42 with two; this test passed or
failed by the thread count an earlier test left); with 8 x 256 or 16 x 128: +9.4 to +11.4 % on one or two threads."""
NUM_TOKENS = 2048  # 4 windows of 512


def _ppl(model: str | Path, quant_policy: int | None = None) -> float:
    return evaluate_perplexity(str(model), "kjv", NUM_TOKENS, 512, 512, quant_policy).perplexity


@pytest.fixture(scope="module")
def float_ppl(smollm2_gguf_path: Path) -> float:
    return _ppl(smollm2_gguf_path)


def test_awq_search_beats_round_to_nearest(smollm2_gguf_path: Path, float_ppl: float, tmp_path: Path) -> None:
    """The search (scales, clip ranges, error-feedback rounding) is the only difference between the two."""
    model = str(smollm2_gguf_path)
    rtn = auto_awq(model, tmp_path / "rtn", AWQ_CALIB, AWQOptions(w_group_size=64, rtn=True))
    awq = auto_awq(model, tmp_path / "awq", AWQ_CALIB, AWQOptions(w_group_size=64, search_scale=True))
    rtn_ppl, awq_ppl = _ppl(rtn), _ppl(awq)
    print(f"float {float_ppl:.3f}  rtn {rtn_ppl:.3f}  awq {awq_ppl:.3f}")
    assert awq_ppl < rtn_ppl
    assert awq_ppl <= float_ppl * 1.15


def test_w8a8_is_close_to_float(smollm2_gguf_path: Path, float_ppl: float, tmp_path: Path) -> None:
    w8a8_ppl = _ppl(smooth_quant(str(smollm2_gguf_path), tmp_path / "sq", CALIB))
    print(f"float {float_ppl:.3f}  w8a8 {w8a8_ppl:.3f}")
    assert w8a8_ppl <= float_ppl * 1.03


def test_kv_int8_is_close_to_float_kv(smollm2_gguf_path: Path, float_ppl: float) -> None:
    """Through lmserve's engine: its plain KV cache matches transformers, int8 KV stays within 1%."""
    plain, int8 = (_ppl(smollm2_gguf_path, quant_policy) for quant_policy in (0, 8))
    print(f"float (transformers) {float_ppl:.3f}  engine KV plain {plain:.3f}  KV int8 {int8:.3f}")
    assert plain == pytest.approx(float_ppl, rel=1e-3)
    assert int8 <= plain * 1.01


def test_kv_int4_with_rotation_is_within_8_percent(smollm2_gguf_path: Path, float_ppl: float) -> None:
    """int4 K/V (Hadamard-rotated, as the engine stores them): within the issue's +8 % (+5.5 % here)."""
    int4 = _ppl(smollm2_gguf_path, 4)
    print(f"float (transformers) {float_ppl:.3f}  KV int4 {int4:.3f}")
    assert int4 <= float_ppl * 1.08
