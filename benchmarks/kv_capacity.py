"""KV-cache capacity and the 256-request job per --quant-policy, each engine in a fresh process (GPU).

Usage (on the GPU machine): PYTHONPATH=. python benchmarks/kv_capacity.py --json OUT.json
    [--policies 0 fp8 8 4] [--steps]   # --steps: batch-1 / batch-64 decode steps (512-token prompts) instead of
                                       # the job (gpu_sweep.profile_decode; max_batch_size 64)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from lmserve.cli.engine_args import parse_quant_policy

CONFIG = "benchmarks/configs/llama3-8b.json"


def measure(quant_policy: int | str, run_job: bool, steps: bool = False) -> dict[str, float]:
    from lmserve.bench.offline import throughput
    from lmserve.config import EngineConfig
    from lmserve.engine.engine import LLMEngine

    engine = LLMEngine.from_random_weights(
        CONFIG, EngineConfig(device="cuda", quant_policy=quant_policy, max_batch_size=64 if steps else 256)
    )
    result: dict[str, float] = {
        "kv_tokens": engine.block_manager.num_blocks * engine.block_manager.block_size
    }
    if steps:
        from benchmarks.gpu_sweep import profile_decode

        for batch_size in (1, 64):
            result |= profile_decode(engine, batch_size, None)
    elif run_job:
        throughput(engine, num_requests=32, input_len=512, output_len=32)  # warm up: Triton compiles
        job = throughput(engine, num_requests=256, input_len=512, output_len=256)
        result |= {"job_elapsed_s": job.elapsed_s, "job_output_tok_per_s": job.output_tok_per_s}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", type=parse_quant_policy, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--policies", nargs="+", type=parse_quant_policy, default=[0, 8, 4, "fp8"])
    parser.add_argument(
        "--steps", action="store_true", help="decode steps at batch 1 / 64 instead of the job"
    )
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, run_job=args.child != 4, steps=args.steps)))
        return
    results: dict[str, object] = {"device": torch.cuda.get_device_name()}
    for policy in args.policies:
        command = [sys.executable, __file__, "--child", str(policy)] + (["--steps"] if args.steps else [])
        out = subprocess.run(command, capture_output=True, text=True)
        results[f"quant_policy_{policy}"] = (
            json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else out.stderr[-2000:]
        )
        print(policy, results[f"quant_policy_{policy}"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
