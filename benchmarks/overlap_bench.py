"""Overlap scheduling off and on, one engine (Llama-3-8B shape, random bf16 weights, CUDA graphs), minutes apart:
batch-1 decode, steady decode steps at batch 1/16/64, the 256 x 512/256 job.

The same engine, graphs and weights serve both modes (`engine.overlap` flips between runs), so the A/B
differs in the step loop alone. Usage (on the GPU machine):
PYTHONPATH=. python benchmarks/overlap_bench.py [--json OUT.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from benchmarks.gpu_sweep import CONFIG, copy_bandwidth, decode_bytes_per_token, profile_decode
from lmserve.bench.offline import latency, throughput
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine

MODES = {"sync": False, "overlap": True}


def decode(engine: LLMEngine, roofline: float, out_len: int) -> dict[str, float]:
    """Batch-1 decode rate and steady step times of the engine's current mode."""
    lat = latency(engine, input_len=128, output_len=out_len, iterations=3)
    results = {"bs1_decode_tok_per_s": lat.decode_tok_per_s_median, "ttft_128_ms": lat.ttft_ms_median}
    results["bs1_fraction_of_roofline"] = lat.decode_tok_per_s_median / roofline
    for batch_size in (1, 16, 64):
        results |= profile_decode(engine, batch_size, None)
    _drain(engine)
    return results


def _drain(engine: LLMEngine) -> None:
    """Finish what profile_decode left (its aborts leave the overlapped step in flight)."""
    while engine.has_unfinished():
        engine.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="small job sizes (smoke test)")
    args = parser.parse_args()
    out_len = 64 if args.quick else 256
    num_requests = 32 if args.quick else 256
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    results["copy_bandwidth_tb_s"] = copy_bandwidth() / 1e12
    engine = LLMEngine.from_random_weights(CONFIG, EngineConfig(device="cuda", max_batch_size=256))
    roofline = results["copy_bandwidth_tb_s"] * 1e12 / decode_bytes_per_token(engine)
    results["roofline_bs1_tok_per_s"] = roofline
    # warm both modes first (Triton compiles, cuBLAS picks kernels), then measure them back to back
    for mode in ("sync", "overlap"):
        engine.overlap = MODES[mode]
        latency(engine, input_len=128, output_len=16, iterations=1)
    throughput(engine, num_requests, input_len=512, output_len=out_len, seed=100)
    for mode in ("sync", "overlap"):
        engine.overlap = MODES[mode]
        results[mode] = decode(engine, roofline, out_len)
        print(mode, results[mode], flush=True)
    for repeat, mode in enumerate(("sync", "overlap", "sync", "overlap")):
        engine.overlap = MODES[mode]
        job = throughput(engine, num_requests, input_len=512, output_len=out_len, seed=repeat)
        results[mode].setdefault("job_elapsed_s", []).append(job.elapsed_s)
        results[mode].setdefault("job_output_tok_per_s", []).append(job.output_tok_per_s)
        print(mode, job.as_dict(), flush=True)
    print(json.dumps(results, indent=2), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
