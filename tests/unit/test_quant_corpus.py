"""Calibration/evaluation text sources and the sliding-window perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmserve.quant.corpus import calibration_samples, evaluation_tokens, load_text
from lmserve.quant.perplexity import perplexity, window_spans


class CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) % 256 for c in text]


def test_shipped_corpus_has_separate_parts() -> None:
    calib, heldout = load_text("kjv", "calib"), load_text(None, "heldout")
    assert "In the beginning God created" in calib and "Theophilus" in heldout
    assert "Theophilus" not in calib and len(calib) > 300_000 and len(heldout) > 100_000


def test_user_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n"
    )
    assert load_text(str(tmp_path / "a.txt"), "calib") == "plain text"
    assert load_text(str(tmp_path / "b.jsonl"), "calib") == "first\n\nsecond"
    folder = tmp_path / "dataset"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train-0.jsonl").write_text(json.dumps({"text": "train row"}) + "\n")
    (folder / "data" / "test-0.jsonl").write_text(json.dumps({"text": "test row"}) + "\n")
    assert load_text(str(folder), "calib") == "train row"


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="wikitext2.*hub dataset"):
        load_text("wikitext2", "calib")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text(str(tmp_path / "missing.txt"), "calib")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: .*'text'"):
        load_text(str(tmp_path / "bad.jsonl"), "calib")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_text(str(tmp_path / "empty"), "calib")


def test_calibration_samples_and_eval_tokens(tmp_path: Path) -> None:
    samples = calibration_samples(CharTokenizer(), "kjv", num_samples=4, seqlen=32)
    assert samples.shape == (4, 32) and samples.dtype == torch.long
    assert torch.equal(samples, calibration_samples(CharTokenizer(), "kjv", 4, 32))  # seeded
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="calib_seqlen=32"):
        calibration_samples(CharTokenizer(), str(tmp_path / "short.txt"), 4, 32)
    with pytest.raises(ValueError, match="fewer than num_tokens"):
        evaluation_tokens(CharTokenizer(), str(tmp_path / "short.txt"), 100)


@pytest.mark.parametrize(("window", "stride"), [(8, 8), (8, 3), (16, 16), (5, 1)])
def test_perplexity_matches_brute_force(window: int, stride: int) -> None:
    # A "model" whose logits depend on the visible context, so windowing matters.
    vocab = 11
    tokens = torch.randint(0, vocab, (41,), generator=torch.Generator().manual_seed(0))

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        counts = torch.nn.functional.one_hot(ids[0], vocab).float().cumsum(0)
        return torch.log_softmax(counts + 0.5, dim=-1).unsqueeze(0)

    result = perplexity(logits_fn, tokens, window, stride)
    nll, count = 0.0, 0
    for begin, end, first in window_spans(len(tokens), window, stride):
        logp = logits_fn(tokens[begin:end].unsqueeze(0))[0]
        for position in range(first, end):
            nll -= float(logp[position - begin - 1, tokens[position]])
            count += 1
    assert result.num_scored_tokens == count
    assert math.isclose(result.perplexity, math.exp(nll / count), rel_tol=1e-6)
    scored = [p for _, end, first in window_spans(len(tokens), window, stride) for p in range(first, end)]
    assert len(scored) == len(set(scored))
    if stride < window:
        assert scored == list(range(1, len(tokens)))  # overlapping windows score every token
