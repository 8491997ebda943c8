"""Structured output through the real SmolLM2 engine: every output matches its grammar (checked by jsonschema,
re, json, a parser of the EBNF's language), and unconstrained rows of a mixed batch are untouched."""

from __future__ import annotations

import json
import re
from concurrent.futures import Future
from typing import Any

import jsonschema
import pytest

from lmserve import EngineConfig, GenerationConfig, pipeline
from lmserve.engine.engine import LLMEngine
from lmserve.pipeline import Pipeline
from lmserve.structured import StructuredOutput
from lmserve.structured.sequence import SequenceGrammar

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
PROMPTS = [f"Invent person number {i} and describe them." for i in range(20)]
# a sum of two digits: the language of the EBNF below, parsed back by this regex
SUM_GRAMMAR = 'root ::= digit " + " digit " = " digit digit?\ndigit ::= [0-9]'
SUM_LANGUAGE = re.compile(r"[0-9] \+ [0-9] = [0-9]{1,2}")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return pipeline(None, backend_config=EngineConfig(dtype="float32", session_len=1024, max_batch_size=32))


def person_format() -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def test_twenty_json_schema_outputs_validate(pipe: Pipeline) -> None:
    config = GenerationConfig(max_new_tokens=48, response_format=person_format())
    responses = pipe(PROMPTS, config)
    assert isinstance(responses, list)
    for response in responses:
        assert response.finish_reason == "stop", response.text
        jsonschema.validate(json.loads(response.text), PERSON)


def engine_of(pipe: Pipeline) -> LLMEngine:
    return pipe.engine  # type: ignore[no-any-return]


def run(
    engine: LLMEngine, requests: dict[str, tuple[str, GenerationConfig]]
) -> dict[str, tuple[str, str | None]]:
    """All requests in one batch, through LLMEngine.step(); request id -> (text, finish reason)."""
    texts: dict[str, str] = dict.fromkeys(requests, "")
    reasons: dict[str, str | None] = {}
    for request_id, (prompt, config) in requests.items():
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        engine.add_request(ids, config, request_id)
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] += out.text
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return {request_id: (texts[request_id], reasons[request_id]) for request_id in requests}


def test_mixed_batch_each_kind_gets_its_own_right_answer(pipe: Pipeline) -> None:
    engine = engine_of(pipe)
    free = GenerationConfig(max_new_tokens=12)
    alone = run(engine, {"free": ("What is the capital of France?", free)})["free"]
    formats = {
        "regex": StructuredOutput("regex", r"[A-Z][a-z]{2,8} [0-9]{2}"),
        "choice": StructuredOutput.choice(["yes", "no", "maybe later"]),
        "grammar": StructuredOutput("grammar", SUM_GRAMMAR),
        "json_object": StructuredOutput("json_object"),
    }
    requests = {
        name: ("Answer briefly: is the sky blue?", GenerationConfig(max_new_tokens=40, response_format=spec))
        for name, spec in formats.items()
    }
    requests["free"] = ("What is the capital of France?", free)
    results = run(engine, requests)
    assert results["free"] == alone  # a constrained neighbour changes nothing for a free row
    assert re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{2}", results["regex"][0])
    assert results["choice"][0] in ("yes", "no", "maybe later")
    assert SUM_LANGUAGE.fullmatch(results["grammar"][0]), results["grammar"]
    if results["json_object"][1] == "stop":  # an object may be longer than 40 tokens
        assert isinstance(json.loads(results["json_object"][0]), dict)
    for name in ("regex", "choice", "grammar"):
        assert results[name][1] == "stop", results[name]


@pytest.mark.slow  # the server's streamed n=3 test covers it in CI
def test_n3_sampled_choices_each_validate(pipe: Pipeline) -> None:
    config = GenerationConfig(
        max_new_tokens=48,
        do_sample=True,
        temperature=1.0,
        random_seed=7,
        n=3,
        response_format=person_format(),
    )
    engine = engine_of(pipe)
    requests = {f"c{i}": ("Describe a person.", choice) for i, choice in enumerate(config.fan_out())}
    for text, reason in run(engine, requests).values():
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)


def test_grammar_that_cannot_finish_ends_with_length(pipe: Pipeline) -> None:
    config = GenerationConfig(max_new_tokens=4, response_format=StructuredOutput("regex", "a{50}"))
    text, reason = run(engine_of(pipe), {"long": ("Say a.", config)})["long"]
    assert reason == "length" and text == "a" * len(text) and text


def test_the_grammar_starts_after_the_reasoning_end_token(pipe: Pipeline) -> None:
    engine = engine_of(pipe)
    backend = engine.grammar_cache.backend
    compiled = engine.grammar_cache.compile(StructuredOutput.choice(["ok"])).result()
    end_token, other = engine.tokenizer.encode("ok", add_special_tokens=False)[0], 100
    grammar = SequenceGrammar(backend, backend.matcher(compiled), start_after_token_id=end_token)
    assert not grammar.active and not grammar.advance(other)  # free text: not fed to the matcher
    assert not grammar.advance(end_token) and grammar.active
    assert not grammar.matcher.is_terminated()


def test_repeated_schema_compiles_once(pipe: Pipeline) -> None:
    cache = engine_of(pipe).grammar_cache
    spec = StructuredOutput.json_schema(PERSON)
    assert cache.compile(spec) is cache.compile(StructuredOutput.json_schema(PERSON))


def test_a_grammar_that_fails_in_the_engine_ends_its_request_as_a_bad_request(pipe: Pipeline) -> None:
    """The front end checks a grammar first; one that still fails to compile in the engine is the request's
    fault (bad_request: the server answers 400), and the other requests go on."""
    engine = pipe.engine
    failing: Future[Any] = Future()
    failing.set_exception(ValueError("unsupported construct"))
    compile_before = engine.grammar_cache.compile
    engine.grammar_cache.compile = lambda spec: failing  # type: ignore[method-assign]
    try:
        bad = engine.add_request(
            [1, 2, 3], GenerationConfig(max_new_tokens=4, response_format=person_format())
        )
    finally:
        engine.grammar_cache.compile = compile_before  # type: ignore[method-assign]
    good = engine.add_request([1, 2, 3], GenerationConfig(max_new_tokens=4))
    outputs: dict[str, list[Any]] = {bad: [], good: []}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    (failed,) = outputs[bad]
    assert failed.finish_reason == "error" and failed.bad_request
    assert "response_format could not be compiled: unsupported construct" in (failed.error or "")
    assert outputs[good][-1].finish_reason == "length" and not outputs[good][-1].bad_request
