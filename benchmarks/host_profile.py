"""Host time per decode step at 256 sequences, by phase, on a tiny random Llama on the CPU (no GPU needed).

The scheduler, block manager, batch build, the sampler's host part and the output path are the same Python on
the CPU and on CUDA; only the model forward differs (a tiny model here), and it is timed apart and left out.

Usage: PYTHONPATH=. python benchmarks/host_profile.py [--steps 40] [--cprofile]
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import os
import pstats
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from lmserve.bench.offline import fixed_length_config, random_prompts
from lmserve.config import EngineConfig
from lmserve.engine import runner as runner_module
from lmserve.engine.engine import LLMEngine
from lmserve.engine.runner import ModelRunner
from lmserve.engine.sampler import DeviceSample, Sampler, SamplingBatch
from lmserve.engine.scheduler import Scheduler

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "eos_token_id": 2,
}

TIMES: dict[str, float] = defaultdict(float)


def timed(owner: Any, name: str, label: str) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TIMES[label] += time.perf_counter() - start

    static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    setattr(owner, name, staticmethod(wrapper) if static else wrapper)


def instrument() -> None:
    timed(LLMEngine, "step", "step (all)")
    timed(LLMEngine, "_can_overlap", "can_overlap")
    timed(Scheduler, "schedule", "schedule")
    timed(LLMEngine, "_launch", "launch (all)")
    timed(ModelRunner, "step_chunks", "launch: step_chunks")
    timed(runner_module, "build_step_batch", "launch: build_step_batch")
    timed(runner_module, "_fill_placeholders", "launch: fill_placeholders")
    timed(ModelRunner, "forward", "launch: model forward (not host)")
    timed(SamplingBatch, "build", "launch: SamplingBatch.build")
    timed(Sampler, "sample_on_device", "launch: sample_on_device")
    timed(Scheduler, "commit", "launch: commit")
    timed(LLMEngine, "_finish", "finish (all)")
    timed(DeviceSample, "result", "finish: result")
    timed(Scheduler, "apply_tokens", "finish: apply_tokens")
    timed(LLMEngine, "_emit", "finish: emit")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--cprofile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "config.json")
        with open(path, "w") as f:
            json.dump(TINY, f)
        config = EngineConfig(device="cpu", max_batch_size=256, overlap_schedule=True, dtype="float32")
        engine = LLMEngine.from_random_weights(path, config)
    prompts = random_prompts(args.requests, 512, TINY["vocab_size"], seed=7)
    gen = fixed_length_config(256)
    for p in prompts:
        engine.add_request(p, gen)
    while any(r.num_output_tokens == 0 for r in engine.requests.values()):
        engine.step()
    for _ in range(4):
        engine.step()
    instrument()
    timed(engine.runner.model, "compute_logits", "launch: compute_logits (not host)")
    profiler = cProfile.Profile() if args.cprofile else None
    if profiler:
        profiler.enable()
    for _ in range(args.steps):
        engine.step()
    if profiler:
        profiler.disable()
    device_work = sum(v for k, v in TIMES.items() if "not host" in k) + TIMES["launch: sample_on_device"]
    rows = {k: 1e6 * v / args.steps for k, v in TIMES.items()}
    rows["host per step (step - forward - logits - sample_on_device)"] = (
        1e6 * (TIMES["step (all)"] - device_work) / args.steps
    )
    for key, us in rows.items():
        print(f"{key:55s} {us:9.1f} us")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    while engine.has_unfinished():
        engine.step()


if __name__ == "__main__":
    main()
