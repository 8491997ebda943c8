"""Quantization quality on the real SmolLM2-135M (GGUF): AWQ within +15% and beating RTN, W8A8 close to float."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmserve.quant.calibrate import load_float_model
from lmserve.quant.checkpoint import load_quantized_model
from lmserve.quant.corpus import evaluation_tokens
from lmserve.quant.perplexity import perplexity
from lmserve.quant.quantize import AWQOptions, CalibrationOptions, auto_awq, smooth_quant

CI_CALIB = CalibrationOptions(calib_samples=16, calib_seqlen=256)


@pytest.fixture(scope="module")
def float_model(smollm2_gguf_path: Path):  # type: ignore[no-untyped-def]
    return load_float_model(str(smollm2_gguf_path))  # skips (via the fixture) when the package is absent


def _ppl(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return perplexity(lambda ids: model(ids, use_cache=False).logits, tokens, 512, 512).perplexity


@pytest.mark.slow
def test_awq_beats_rtn_and_w8a8_is_close(float_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The issue's quality bar, on 20k held-out tokens (window 512, stride 512)."""
    tokens = evaluation_tokens(float_model.tokenizer, "kjv", 20_000)
    base = _ppl(float_model.model, tokens)
    rtn = auto_awq(None, tmp_path / "rtn", CI_CALIB, AWQOptions(w_group_size=64, rtn=True))
    awq = auto_awq(None, tmp_path / "awq", CI_CALIB, AWQOptions(w_group_size=64, search_scale=True))
    w8a8 = smooth_quant(None, tmp_path / "sq", CI_CALIB)
    rtn_ppl, awq_ppl, w8a8_ppl = (_ppl(load_quantized_model(p), tokens) for p in (rtn, awq, w8a8))
    print(f"float {base:.3f}  rtn {rtn_ppl:.3f}  awq {awq_ppl:.3f}  w8a8 {w8a8_ppl:.3f}")
    assert math.isfinite(base)
    assert (
        awq_ppl <= base * 1.15 and awq_ppl < rtn_ppl
    )  # the goal; +11.1% measured (quant_quality.md)
    assert w8a8_ppl <= base * 1.03
