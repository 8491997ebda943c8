"""The 256 x 512-in/256-out offline job per weight format, one process: the timed job, then a profiled run of it.

Usage (on the GPU machine): PYTHONPATH=. python benchmarks/job_profile.py --formats bf16 fp8 [fp8-unfused] [fp8+lmfp8] [bf16+fuseattn] --out-dir OUT
    [--repeats N] [--no-profile] [--host-phases]
Writes OUT/job_profile.json (job results per format) and OUT/job_profile_<format>.txt (kernel table by CUDA time,
the prefill steps and the decode steps apart).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from lmserve.bench.offline import fixed_length_config, random_prompts, throughput
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.kernels import decode_attention
from lmserve.layers.fp8 import Fp8Linear

CONFIG = "benchmarks/configs/llama3-8b.json"
FUSED = Fp8Linear.takes_fp8_activation


def profiled_phases(engine: LLMEngine, num_requests: int, input_len: int, output_len: int) -> dict[str, Any]:
    """One run of the job: the prefill steps (until every request has its first token) profiled apart from
    the first 32 steady decode steps; wall ms per step of each phase."""
    config = fixed_length_config(output_len)
    prompts = random_prompts(num_requests, input_len, engine.model_config.vocab_size, seed=7)
    ids = [engine.add_request(p, config) for p in prompts]
    phases: dict[str, Any] = {}
    with profile(activities=[ProfilerActivity.CUDA]) as prefill_prof:
        start, steps = time.perf_counter(), 0
        while any(engine.requests[i].num_computed_tokens < engine.requests[i].num_prompt_tokens for i in ids):
            engine.step()
            steps += 1
        torch.cuda.synchronize()
    phases["prefill"] = {"steps": steps, "wall_s": time.perf_counter() - start}
    for _ in range(4):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as decode_prof:
        start = time.perf_counter()
        for _ in range(32):
            engine.step()
        torch.cuda.synchronize()
    phases["decode32"] = {"steps": 32, "wall_s": time.perf_counter() - start}
    while engine.has_unfinished():
        engine.step()
    phases["tables"] = {
        "prefill": prefill_prof.key_averages().table(sort_by="cuda_time_total", row_limit=25),
        "decode32": decode_prof.key_averages().table(sort_by="cuda_time_total", row_limit=25),
    }
    return phases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", nargs="+", default=["bf16", "fp8"])
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of the job per format")
    parser.add_argument(
        "--host-phases",
        action="store_true",
        help="after the timed runs, one more run of the job with the engine's step phases timed on the host "
        "(lmserve.bench.host_phases: 32 steady decode steps; how long the host waits for the GPU)",
    )
    args = parser.parse_args()
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    for fmt in args.formats:
        # "+lmfp8": with --lm-head-fp8 (e4m3 lm_head)
        # "+fuseattn": decode attention's rotary store and split reduce inside its launch
        base, *flags = fmt.split("+")
        if not set(flags) <= {"lmfp8", "fuseattn", "fuserot"}:
            raise ValueError(f"format {fmt!r}: the suffixes are +lmfp8, +fuseattn and +fuserot (rotary only)")
        decode_attention.FUSE_ROTARY = bool({"fuseattn", "fuserot"} & set(flags))
        decode_attention.FUSE_REDUCE = "fuseattn" in flags
        model_format = base.removesuffix("-unfused")
        config = EngineConfig(
            device="cuda", max_batch_size=256, lm_head_fp8="lmfp8" in flags,
            model_format="auto" if model_format == "bf16" else model_format,
        )  # fmt: skip
        # "fp8-unfused": FP8 with the per-token quantizer as its own launch (no norm / SiLU fusion), the A/B peer
        Fp8Linear.takes_fp8_activation = (  # type: ignore[method-assign]
            (lambda self, num_rows: False) if base.endswith("-unfused") else FUSED
        )
        engine = LLMEngine.from_random_weights(CONFIG, config)
        runs = [
            throughput(engine, 256, 512, 256, warmup=1 if r == 0 else 0).as_dict()
            for r in range(args.repeats)
        ]
        results[fmt] = {"jobs": runs}
        print(fmt, [(r["elapsed_s"], r["output_tok_per_s"]) for r in runs], flush=True)
        if not args.no_profile:
            phases = profiled_phases(engine, 256, 512, 256)
            tables = phases.pop("tables")
            results[fmt]["phases"] = phases
            with open(f"{args.out_dir}/job_profile_{fmt}.txt", "w") as f:
                for name, table in tables.items():
                    f.write(f"== {fmt} {name} {phases[name]}\n{table}\n")
            print(fmt, phases, flush=True)
        if args.host_phases:
            from lmserve.bench.host_phases import measure_decode

            results[fmt]["host_phases_us"] = phases_us = measure_decode(engine, 256, 512, 256)
            print(fmt, "host phases (us per decode step):", json.dumps(phases_us, indent=1), flush=True)
        engine.runner.graph_runner = None
        engine.runner.kv_caches.clear()
        engine.runner.model = None
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    for fmt in args.formats:
        if fmt != "bf16" and "bf16" in results:
            results[f"{fmt}_over_bf16_output_tok_per_s"] = [
                f["output_tok_per_s"] / b["output_tok_per_s"]
                for f, b in zip(results[fmt]["jobs"], results["bf16"]["jobs"], strict=True)
            ]
    print(json.dumps({k: v for k, v in results.items() if "over" in k}, indent=1), flush=True)
    with open(f"{args.out_dir}/job_profile.json", "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
