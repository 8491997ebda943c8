"""MoE sweep: the fused MoE layer's bandwidth, batch-1 decode as a fraction of its roofline, the 256 x 512/256 job;
Mixtral-8x7B and Qwen3-30B-A3B shapes (random bf16 weights) beside the dense Llama-3-8B in the same call.

Roofline of batch-1 decode: copy bandwidth / bytes read per token, counting the experts a token is routed to
(top-k of E per layer), the router, attention and lm_head weights (not the input embedding: a gather), and
the KV cache read at the mean context length.

Usage (GPU): PYTHONPATH=. python benchmarks/moe_sweep.py --json OUT.json [--models mixtral,qwen3moe,dense] [--quick]
Smoke test (CPU): PYTHONPATH=. python benchmarks/moe_sweep.py --device cpu --config tiny=PATH/config.json --quick
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from benchmarks.gpu_sweep import collect, copy_bandwidth, release
from lmserve.bench.offline import latency, throughput
from lmserve.config import EngineConfig
from lmserve.engine.builder import kv_bytes_per_token
from lmserve.engine.engine import LLMEngine

CONFIGS = {
    "mixtral": "benchmarks/configs/mixtral-8x7b.json",
    "qwen3moe": "benchmarks/configs/qwen3-30b-a3b.json",
    "dense": "benchmarks/configs/llama3-8b.json",
}


def bandwidth(device: str) -> float:
    """Bytes read + written per second by a large copy: the memory roofline."""
    if device == "cuda":
        return copy_bandwidth()
    src = torch.empty(1 << 27, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 2 * src.numel() * src.element_size() * 5 / (time.perf_counter() - start)


def active_weight_bytes(engine: LLMEngine) -> int:
    """Weight bytes one decoded token reads: all but the input embedding, experts at top_k / num_experts."""
    moe = engine.model_config.moe
    total = 0.0
    for name, param in engine.runner.model.named_parameters():
        if "embed_tokens" in name:
            continue
        share = moe.top_k / moe.num_experts if moe is not None and ".experts." in name else 1.0
        total += param.numel() * param.element_size() * share
    return int(total)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def layer_bandwidth(
    engine: LLMEngine, device: str, num_tokens: int, iterations: int = 20
) -> dict[str, float]:
    """The first MoE layer alone on num_tokens random rows: time per call and weight bytes read per second."""
    from lmserve.layers.moe import SparseMoeBlock

    block = next(m for m in engine.runner.model.modules() if isinstance(m, SparseMoeBlock))
    hidden = block.gate.weight.shape[1]
    x = torch.randn(num_tokens, hidden, device=device, dtype=block.experts.down_proj.dtype)
    _, topk_ids = block.gate(x)
    experts_hit = int(topk_ids.unique().numel())
    expert_bytes = sum(
        p[0].numel() * p.element_size() for p in (block.experts.gate_up_proj, block.experts.down_proj)
    )
    with torch.inference_mode():
        block(x)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iterations):
            block(x)
        synchronize(device)
    seconds = (time.perf_counter() - start) / iterations
    return {
        f"moe_layer_us_t{num_tokens}": seconds * 1e6,
        f"moe_layer_weight_gb_s_t{num_tokens}": experts_hit * expert_bytes / seconds / 1e9,
    }


def measure(name: str, config_json: str, args: argparse.Namespace, copy_bytes_per_s: float) -> dict[str, Any]:
    """One model: build, layer bandwidth, batch-1 decode vs roofline, the job; then free its memory."""
    start = time.perf_counter()
    config = EngineConfig(device=args.device, max_batch_size=args.max_batch_size)
    engine = LLMEngine.from_random_weights(config_json, config)
    out: dict[str, Any] = {"engine_build_s": time.perf_counter() - start}
    if engine.model_config.moe is not None:
        for num_tokens in (1, 16, 256) if not args.quick else (1, 16):
            out |= layer_bandwidth(engine, args.device, num_tokens)
    input_len, output_len = 128, 32 if args.quick else 256
    kv_bytes = kv_bytes_per_token(engine.model_config, engine.runner.model.lm_head_weight().dtype)
    bytes_per_token = active_weight_bytes(engine) + kv_bytes * (input_len + output_len / 2)
    roofline = copy_bytes_per_s / bytes_per_token
    lat = latency(engine, input_len=input_len, output_len=output_len, iterations=3)
    out |= {
        "decode_bytes_per_token_gb": bytes_per_token / 1e9,
        "roofline_bs1_tok_per_s": roofline,
        "bs1_decode_tok_per_s": lat.decode_tok_per_s_median,
        "bs1_fraction_of_roofline": lat.decode_tok_per_s_median / roofline,
        "ttft_128_ms": lat.ttft_ms_median,
        "kv_tokens": engine.block_manager.num_blocks * engine.block_manager.block_size,
    }
    print(name, out, flush=True)
    num_requests = 16 if args.quick else 256
    job = throughput(engine, num_requests=num_requests, input_len=512, output_len=output_len, warmup=1)
    out["job"] = job.as_dict()
    if args.device == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
    release(engine)
    del engine
    if args.device == "cuda":
        collect()
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--models", default="mixtral,qwen3moe,dense", help=f"comma-separated, of {sorted(CONFIGS)}"
    )
    parser.add_argument(
        "--config", action="append", default=[], metavar="NAME=PATH", help="extra config.json"
    )
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="small job sizes (smoke test)")
    args = parser.parse_args()
    unknown = set(args.models.split(",")) - set(CONFIGS) - {""}
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; choose from {sorted(CONFIGS)}")
    return args


def main() -> None:
    args = parse_args()
    models = {name: CONFIGS[name] for name in args.models.split(",") if name}
    models |= dict(item.split("=", 1) for item in args.config)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results: dict[str, Any] = {"device": device_name, "torch": torch.__version__}
    copy_bytes_per_s = bandwidth(args.device)
    results["copy_bandwidth_tb_s"] = copy_bytes_per_s / 1e12
    for name, config_json in models.items():
        results[name] = measure(name, config_json, args, copy_bytes_per_s)
        print(json.dumps(results, indent=2), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
