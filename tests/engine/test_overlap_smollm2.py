"""Overlap scheduling on the real embedded SmolLM2-135M: the same tokens, text and stops as the synchronous loop."""

from __future__ import annotations

import json

import jsonschema
import pytest

from lmserve import EngineConfig, GenerationConfig, pipeline
from lmserve.pipeline import Pipeline, Response
from tests.engine.test_engine_smollm2 import PROMPTS
from tests.engine.test_structured_smollm2 import PERSON, person_format


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    config = EngineConfig(dtype="float32", session_len=1024, max_batch_size=8, overlap_schedule=True)
    return pipeline(None, backend_config=config)


def both_ways(pipe: Pipeline, prompts: list[str], config: GenerationConfig) -> list[Response]:
    """The overlapped engine's responses, asserted equal to the same engine's run with overlap off."""
    engine = pipe.engine
    assert engine.overlap and not engine.has_unfinished()
    overlapped = pipe(prompts, config)
    engine.overlap = False
    try:
        synchronous = pipe(prompts, config)
    finally:
        engine.overlap = True
    assert isinstance(overlapped, list) and isinstance(synchronous, list)
    for got, expected in zip(overlapped, synchronous, strict=True):
        assert (got.token_ids, got.text, got.finish_reason) == (
            expected.token_ids,
            expected.text,
            expected.finish_reason,
        )
        assert got.generate_token_len == expected.generate_token_len == len(got.token_ids)
    return overlapped


def test_greedy_tokens_equal_the_synchronous_loop(pipe: Pipeline) -> None:
    # the synchronous loop's tokens are HF's (test_engine_smollm2); all four end at EOS or the length
    responses = both_ways(pipe, PROMPTS, GenerationConfig(max_new_tokens=24))
    assert {r.finish_reason for r in responses} <= {"stop", "length"}


def test_stop_strings_and_logprobs(pipe: Pipeline) -> None:
    config = GenerationConfig(max_new_tokens=16, stop_words=["Paris", "fruit"], logprobs=2)
    responses = both_ways(pipe, PROMPTS, config)
    assert responses[0].finish_reason == "stop" and "Paris" not in responses[0].text
    for response in responses:
        assert response.logprobs is not None and len(response.logprobs) == len(response.token_ids)
        assert [lp.token_id for lp in response.logprobs] == response.token_ids


def test_grammars_read_each_token_back_before_the_next_step(pipe: Pipeline) -> None:
    config = GenerationConfig(max_new_tokens=48, response_format=person_format())
    for response in both_ways(pipe, PROMPTS[:1], config):
        assert response.finish_reason == "stop", response.text
        jsonschema.validate(json.loads(response.text), PERSON)
