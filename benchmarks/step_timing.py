"""Where the host spends a steady decode step (overlap scheduling on): does the step wait for the GPU?

    PYTHONPATH=. python benchmarks/step_timing.py [--batch-sizes 1 16 64] [--steps 100] [--json OUT]

Random weights of the Llama-3-8B shape on one CUDA GPU. Per step, in ms: the wall time; `wait` (the host
blocked on the previous step's tokens: the GPU is the bottleneck when this is most of the wall), `launch`
(scheduling aside, everything the host does to queue a step: batch build and upload, graph replay launch,
logits and sampling launch), and those parts of it. The engine's methods are timed by wrapping them on this
one engine object; nothing in lmserve changes.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from lmserve.bench.offline import fixed_length_config, random_prompts
from lmserve.config import EngineConfig
from lmserve.engine import runner as runner_module
from lmserve.engine import sampler as sampler_module
from lmserve.engine.engine import LLMEngine

CONFIG = "benchmarks/configs/llama3-8b.json"


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def timed(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.seconds.setdefault(key, 0.0)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start

        return wrapper

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)


def instrument(engine: LLMEngine, timers: Timers) -> None:
    """Time the step's parts on this engine (instance attributes) and the device wait (the event)."""
    engine._launch = timers.timed("launch", engine._launch)  # type: ignore[method-assign]
    engine._finish = timers.timed("finish", engine._finish)  # type: ignore[method-assign]
    engine.scheduler.schedule = timers.timed("schedule", engine.scheduler.schedule)  # type: ignore[method-assign]
    runner = engine.runner
    if runner.graph_runner is not None:
        runner.graph_runner.run = timers.timed("graph_launch", runner.graph_runner.run)  # type: ignore[method-assign]
    runner.sampler.sample_on_device = timers.timed("sample_launch", runner.sampler.sample_on_device)  # type: ignore[method-assign]
    runner_module.build_step_batch = timers.timed("batch_build_upload", runner_module.build_step_batch)
    result = sampler_module.DeviceSample.result

    def timed_result(sample: sampler_module.DeviceSample) -> Any:
        if sample.ready is not None:
            timers.timed("wait", sample.ready.synchronize)()
        return result(sample)

    sampler_module.DeviceSample.result = timed_result  # type: ignore[method-assign]


def measure(engine: LLMEngine, timers: Timers, batch_size: int, steps: int) -> dict[str, float]:
    ids = [
        engine.add_request(p, fixed_length_config(steps + 50))
        for p in random_prompts(batch_size, 512, engine.model_config.vocab_size)
    ]
    while any(engine.requests[i].num_computed_tokens < engine.requests[i].num_prompt_tokens for i in ids):
        engine.step()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    timers.reset()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    for i in ids:
        engine.abort(i)
    while engine.has_unfinished():
        engine.step()
    return {"wall_ms": 1000 * wall / steps} | {k: 1000 * v / steps for k, v in timers.seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    engine = LLMEngine.from_random_weights(
        CONFIG, EngineConfig(device="cuda", max_batch_size=max(args.batch_sizes))
    )
    timers = Timers()
    instrument(engine, timers)
    results = {"device": torch.cuda.get_device_name(), "overlap": engine.overlap}
    for batch_size in args.batch_sizes:
        results[f"bs{batch_size}"] = measure(engine, timers, batch_size, args.steps)
        print(batch_size, json.dumps(results[f"bs{batch_size}"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
