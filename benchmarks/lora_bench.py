"""LoRA serving speed: a batch mixing adapters vs the base model alone, same model, same prompts, same run.

    python benchmarks/lora_bench.py --num-adapters 4 --batch-size 16 --input-len 64 --output-len 128

Random PEFT-layout adapters (every q/k/v/o/gate/up/down projection, --rank) are written to a temporary folder
and loaded with --adapters; request i runs adapter i % N. The base engine (no adapters loaded) runs the same
prompts. Runs alternate base / mixed --repeats times (the best of each is reported: the CPU is shared) and
print output tok/s, the ratio, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from lmserve.bench.offline import fixed_length_config, random_prompts
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.lora.random import save_random_adapter


def output_tok_per_s(
    engine: LLMEngine, prompts: list[list[int]], adapters: list[str | None], output_len: int
) -> float:
    """All prompts at once (each with its adapter), stepped until done: generated tokens per second."""
    config = fixed_length_config(output_len)
    start = time.perf_counter()
    for prompt, adapter in zip(prompts, adapters, strict=True):
        engine.add_request(prompt, config.with_updates(adapter_name=adapter))
    num_tokens = 0
    while engine.has_unfinished():
        num_tokens += sum(len(out.token_ids) for out in engine.step())
    return num_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--num-adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = EngineConfig(dtype=args.dtype, max_batch_size=args.batch_size)
    base = LLMEngine.from_pretrained(args.model, config, detokenize=False)
    with tempfile.TemporaryDirectory() as root:
        folders = {
            f"adapter{i}": save_random_adapter(
                os.path.join(root, str(i)), base.model_config, args.rank, seed=i
            )
            for i in range(args.num_adapters)
        }
        mixed = LLMEngine.from_pretrained(
            args.model, EngineConfig(**{**vars(config), "adapters": folders}), detokenize=False
        )
    prompts = random_prompts(args.batch_size, args.input_len, base.model_config.vocab_size)
    names: list[str | None] = [f"adapter{i % args.num_adapters}" for i in range(args.batch_size)]
    no_adapter: list[str | None] = [None] * args.batch_size
    runs = {"base": (base, no_adapter), "mixed": (mixed, names), "base_on_lora_engine": (mixed, no_adapter)}
    load_before = os.getloadavg()
    for engine, adapters in runs.values():  # warm-up
        output_tok_per_s(engine, prompts, adapters, 8)
    best = dict.fromkeys(runs, 0.0)
    for _ in range(args.repeats):
        for label, (engine, adapters) in runs.items():
            best[label] = max(best[label], output_tok_per_s(engine, prompts, adapters, args.output_len))
    result = {
        "output_tok_per_s": {k: round(v, 1) for k, v in best.items()},
        "mixed_over_base": round(best["mixed"] / best["base"], 3),
        "args": vars(args),
        "dtype": str(base.resolved.dtype),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
