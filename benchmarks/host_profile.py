"""Host time per decode step at 256 sequences, by phase, on a tiny random Llama on the CPU (no GPU needed).

The scheduler, block manager, batch build, the sampler's host part and the output path are the same Python on
the CPU and on CUDA; only the model forward differs (a tiny model here), and it is timed apart and left out
(with the logits and the sampling ops, which run synchronously on the CPU). lmserve.bench.host_phases does it.

Usage: PYTHONPATH=. python benchmarks/host_profile.py [--steps 32] [--cprofile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import tempfile

import torch

from lmserve.bench import host_phases
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--cprofile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "config.json")
        with open(path, "w") as f:
            json.dump(TINY, f)
        config = EngineConfig(device="cpu", max_batch_size=256, overlap_schedule=True, dtype="float32")
        engine = LLMEngine.from_random_weights(path, config)
    model = engine.runner.model
    extra = [(model, "compute_logits", "launch: compute_logits (device work)")]
    profiler = cProfile.Profile() if args.cprofile else None
    original = host_phases.timed_phases
    # the logits run synchronously on the CPU: time them apart so they can be left out of the host's share
    host_phases.timed_phases = lambda: original(extra)  # type: ignore[assignment,misc]
    if profiler:
        profiler.enable()
    result = host_phases.measure_decode(engine, steps=args.steps)
    if profiler:
        profiler.disable()
    logits = result.get("launch: compute_logits (device work)", 0.0)
    key = "host per step (wall - waiting - forward - sample_on_device)"
    result["host per step, less the logits too"] = result[key] - logits
    for label, us in result.items():
        print(f"{label:62s} {us:9.1f} us")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
