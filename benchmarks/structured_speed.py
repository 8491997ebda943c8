"""Structured output's cost: json_schema-constrained vs unconstrained decode tok/s at one batch, plus the
compile time of a typical tool schema.

Both runs generate the same tokens per request: the schema asks for a long array, so constrained requests
end at max_new_tokens just as unconstrained ones (ignore_eos) do. The grammar is compiled before the timed
run (compiles are cached per schema; the compile is reported on its own, cold).

Usage (from the repo root):
    CPU, the embedded SmolLM2, 16 requests:
        PYTHONPATH=. python benchmarks/structured_speed.py --batch 16 --max-new-tokens 64
    GPU, 8B shape with random weights and SmolLM2's tokenizer (as benchmarks/serving_gpu.py), batch 64:
        PYTHONPATH=. python benchmarks/structured_speed.py --gpu-8b --tokenizer .gpu/smollm2-tokenizer --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmserve import EngineConfig, GenerationConfig
from lmserve.engine.engine import LLMEngine
from lmserve.serve.constraints import tool_plan
from lmserve.serve.tool_parsers import QwenToolParser
from lmserve.structured import StructuredOutput
from lmserve.structured.cache import GrammarCache

LONG_LIST = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 16},
        "items": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 200},
    },
    "required": ["title", "items"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search_flights",
            "parameters": {
                "type": "object",
                "properties": {
                    "origin": {"type": "string"},
                    "destination": {"type": "string"},
                    "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                    "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                    "cabin": {"enum": ["economy", "premium", "business", "first"]},
                    "nonstop": {"type": "boolean"},
                },
                "required": ["origin", "destination", "date"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"],
            },
        },
    },
]


def build_engine(args: argparse.Namespace) -> LLMEngine:
    config = EngineConfig(max_batch_size=args.batch, session_len=1024)
    if not args.gpu_8b:
        return LLMEngine.from_pretrained(None, replace(config, dtype="float32"))
    sys.path.insert(0, str(Path(__file__).parent))
    from serving_gpu import make_checkpoint  # the same random 8B-shaped checkpoint

    make_checkpoint(args.tokenizer, args.checkpoint)
    return LLMEngine.from_pretrained(str(args.checkpoint), config)


def timed_run(engine: LLMEngine, prompts: list[list[int]], config: GenerationConfig) -> dict[str, float]:
    """All prompts in one batch to the end; decode tok/s counts every generated token over the wall time."""
    for ids in prompts:
        engine.add_request(ids, config)
    while engine.compiling:  # the grammar is cached after the warm-up; this only admits the requests
        engine.step()
    start = time.perf_counter()
    num_tokens = 0
    while engine.has_unfinished():
        num_tokens += sum(len(out.token_ids) for out in engine.step())
    seconds = time.perf_counter() - start
    return {"tokens": num_tokens, "seconds": round(seconds, 3), "tok_per_s": round(num_tokens / seconds, 1)}


def tool_compile_ms(engine: LLMEngine) -> float:
    """Cold compile of the grammar for tool_choice=required over TOOLS (a fresh cache, so nothing reused)."""
    grammar = tool_plan(TOOLS, "required", True, QwenToolParser()).grammar
    assert grammar is not None
    cache = GrammarCache(engine.grammar_cache.backend)
    start = time.perf_counter()
    cache.compile(grammar).result()
    return round((time.perf_counter() - start) * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--gpu-8b", action="store_true", help="8B shape, random weights, on CUDA")
    parser.add_argument("--tokenizer", type=Path, default=Path(".gpu/smollm2-tokenizer"))
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/llama3-8b-shape-random"))
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per mode (the best is reported)")
    args = parser.parse_args()
    engine = build_engine(args)
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "List many fruits as JSON."}])
    prompts = [prompt] * args.batch
    free = GenerationConfig(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    constrained = GenerationConfig(
        max_new_tokens=args.max_new_tokens, response_format=StructuredOutput.json_schema(LONG_LIST)
    )
    results: dict[str, Any] = {
        "batch": args.batch,
        "max_new_tokens": args.max_new_tokens,
        "loadavg": os.getloadavg(),
    }
    results["tool_schema_compile_ms"] = tool_compile_ms(engine)
    timed_run(engine, prompts[:2], free)  # warm-up: kernels, and the schema's compile into the cache
    timed_run(engine, prompts[:2], constrained)
    for name, config in (("unconstrained", free), ("json_schema", constrained)):
        runs = [timed_run(engine, prompts, config) for _ in range(args.repeats)]
        results[name] = max(runs, key=lambda run: run["tok_per_s"])
    results["ratio"] = round(results["json_schema"]["tok_per_s"] / results["unconstrained"]["tok_per_s"], 3)
    results["loadavg_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
