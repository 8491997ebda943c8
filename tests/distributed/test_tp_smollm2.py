"""The embedded SmolLM2 (GGUF, 9 query / 3 KV heads) at tp=3: greedy tokens equal tp=1's.

tp=3 because 9 heads do not split over 2 ranks; padding heads would change the model. GGUF tensors are cut
after reading (no lazy slices in GGUF). The three ranks share the cores (one torch thread each on a 2-core
machine): about 30 s in all there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig

GREEDY = GenerationConfig(max_new_tokens=12, ignore_eos=True)


def greedy_tokens(model: Path, tp: int) -> list[int]:
    config = EngineConfig(device="cpu", dtype="float32", tp=tp, session_len=128, max_batch_size=2)
    engine = LLMEngine.from_pretrained(str(model), config)
    try:
        prompt = engine.tokenizer.encode("The capital of France is")
        engine.add_request(prompt, GREEDY)
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.token_ids
    finally:
        engine.shutdown()
    return tokens


def test_smollm2_tp3_equals_tp1(smollm2_gguf_path: Path) -> None:
    assert greedy_tokens(smollm2_gguf_path, 3) == greedy_tokens(smollm2_gguf_path, 1)


def test_smollm2_tp2_is_refused_naming_the_flag(smollm2_gguf_path: Path) -> None:
    with pytest.raises(ValueError, match="--tp 2 must divide num_attention_heads=9"):
        LLMEngine.from_pretrained(str(smollm2_gguf_path), EngineConfig(device="cpu", dtype="float32", tp=2))
