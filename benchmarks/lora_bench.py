"""LoRA serving speed: a batch mixing adapters vs the base model alone, same model, same prompts, same run.

    python benchmarks/lora_bench.py --num-adapters 4 --batch-size 16 --input-len 64 --output-len 128

Random PEFT-layout adapters (every q/k/v/o/gate/up/down projection, --rank) are written to a temporary folder
and loaded with --adapters; request i runs adapter i % N. The base engine (no adapters loaded) runs the same
prompts, and so does the adapter engine with no adapter named (what loading adapters costs base requests).
The three batches run together, their engines stepped in turn (a shared CPU's load falls on all alike), each
timed by its own steps; --repeats such rounds, the medians and the per-round ratios are printed with the load
average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Optional

from lmserve.bench.offline import fixed_length_config, random_prompts
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.lora.random import save_random_adapter

Run = tuple[LLMEngine, list[Optional[str]]]


def interleaved_tok_per_s(
    runs: dict[str, Run], prompts: list[list[int]], output_len: int
) -> dict[str, float]:
    """Every run's batch (each prompt with its adapter) at once, the engines stepped in turn, one step each:
    a shared CPU's load then falls on every run alike. Output tokens per second of each run's own step time."""
    config = fixed_length_config(output_len)
    for engine, adapters in runs.values():
        for prompt, adapter in zip(prompts, adapters, strict=True):
            engine.add_request(prompt, config.with_updates(adapter_name=adapter))
    seconds, tokens = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0)
    while any(engine.has_unfinished() for engine, _ in runs.values()):
        for label, (engine, _) in runs.items():
            if engine.has_unfinished():
                start = time.perf_counter()
                outputs = engine.step()
                seconds[label] += time.perf_counter() - start
                tokens[label] += sum(len(out.token_ids) for out in outputs)
    return {label: tokens[label] / seconds[label] for label in runs}


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
    runs: dict[str, Run] = {
        "base": (base, no_adapter),
        "mixed": (mixed, names),
        "base_on_lora_engine": (mixed, no_adapter),
    }
    load_before = os.getloadavg()
    interleaved_tok_per_s(runs, prompts, 4)  # warm-up
    rates = [interleaved_tok_per_s(runs, prompts, args.output_len) for _ in range(args.repeats)]
    median = {label: statistics.median(r[label] for r in rates) for label in runs}
    result = {
        "output_tok_per_s_median": {k: round(v, 1) for k, v in median.items()},
        "mixed_over_base_per_repeat": [round(r["mixed"] / r["base"], 3) for r in rates],
        "mixed_over_base": round(median["mixed"] / median["base"], 3),
        "args": vars(args),
        "dtype": str(base.resolved.dtype),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
