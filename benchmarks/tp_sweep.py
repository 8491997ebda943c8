"""Tensor-parallel sweep: batch-1 decode (tok/s and its fraction of the per-GPU weight-bytes roofline) and the
256 x 512/256 job at tp = 1, 2, 4, for the Llama-3-8B shape and a 70B shape (and, asked for, the Mixtral-8x7B and
Qwen3-30B-A3B shapes: experts split by intermediate features), random bf16 weights, JSON out.

Usage (GPU machine, 4 GPUs): PYTHONPATH=. python benchmarks/tp_sweep.py --json OUT.json
Tiny smoke test on the CPU:  PYTHONPATH=. python benchmarks/tp_sweep.py --device cpu --shapes tiny tiny_moe --tp 1 2 4 --quick
A --tp above the GPUs present is refused before anything runs (exit 2, naming the flag and the count); a shard
larger than a GPU (the 70B shape at tp=1) is skipped and the JSON says why.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.moe_sweep import active_weight_bytes
from lmserve.bench.offline import latency, throughput
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine

CONFIGS = Path(__file__).parent / "configs"
BASE_CONFIG = CONFIGS / "llama3-8b.json"
MIXTRAL = json.loads((CONFIGS / "mixtral-8x7b.json").read_text())
TINY = {
    "vocab_size": 512,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "head_dim": 32,
    "max_position_embeddings": 2048,
}
"""CPU smoke tests (--device cpu --shapes tiny tiny_moe --quick)."""
SHAPES: dict[str, dict[str, Any]] = {
    "8b": {},
    "mixtral": MIXTRAL,
    "qwen3moe": json.loads((CONFIGS / "qwen3-30b-a3b.json").read_text()),
    "70b": {
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "intermediate_size": 28672,
    },
    "tiny": TINY,
    "tiny_moe": {**MIXTRAL, **TINY, "num_local_experts": 4},
}
WEIGHT_FRACTION_OF_GPU = 0.85
"""A shard above this fraction of one GPU's memory leaves too little for activations and a KV cache: skipped."""


def shape_config(name: str, folder: Path) -> Path:
    """config.json of a shape: the 8B config with the shape's fields replaced, or, for a shape that names its
    architectures (the MoE ones), the shape's fields alone."""
    shape = SHAPES[name]
    config = shape if "architectures" in shape else json.loads(BASE_CONFIG.read_text()) | shape
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def weight_bytes(config_path: Path, element_size: int = 2) -> int:
    """Bytes of all the shape's weights (embedding, layers, lm_head)."""
    c = json.loads(config_path.read_text())
    head_dim = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    attention = c["hidden_size"] * head_dim * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    num_experts = c.get("num_local_experts") or c.get("num_experts") or 0
    if num_experts:  # every layer sparse (true of both MoE shapes here)
        mlp = num_experts * 3 * c["hidden_size"] * c.get("moe_intermediate_size", c["intermediate_size"])
    else:
        mlp = 3 * c["hidden_size"] * c["intermediate_size"]
    return element_size * (
        c["num_hidden_layers"] * (attention + mlp) + 2 * c["vocab_size"] * c["hidden_size"]
    )


def copy_bandwidth(device: torch.device, num_bytes: int = 4 << 30, iterations: int = 20) -> float:
    """Bytes read + written per second by a device-to-device copy (CPU: a smaller host copy)."""
    if device.type == "cpu":
        num_bytes = 256 << 20
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        dst.copy_(src)
    _sync(device)
    return 2 * num_bytes * iterations / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def missing_gpus(tps: list[int], device: torch.device) -> str | None:
    """Why the sweep cannot run here (more ranks than GPUs), or None."""
    present = torch.cuda.device_count() if device.type == "cuda" else None
    if present is None or max(tps) <= present:
        return None
    fitting = [tp for tp in tps if tp <= present]
    hint = f"pass --tp {' '.join(map(str, fitting))}" if fitting else "pass --device cpu"
    return f"--tp {max(tps)} needs {max(tps)} GPUs but {present} are present; {hint}"


def skip_reason(tp: int, config_path: Path, device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    per_gpu = weight_bytes(config_path) / tp
    memory = torch.cuda.get_device_properties(0).total_memory
    if per_gpu > WEIGHT_FRACTION_OF_GPU * memory:
        return f"{per_gpu / 1e9:.0f} GB of weights per GPU, {memory / 1e9:.0f} GB on one"
    return None


def run_one(config_path: Path, tp: int, args: argparse.Namespace, bandwidth: float) -> dict[str, Any]:
    dtype = "bfloat16" if args.device == "cuda" else "float32"  # gloo (CPU) all-reduces float32 only
    config = EngineConfig(device=args.device, dtype=dtype, tp=tp, max_batch_size=args.max_batch_size)
    start = time.perf_counter()
    engine = LLMEngine.from_random_weights(str(config_path), config)
    result: dict[str, Any] = {"engine_build_s": time.perf_counter() - start}
    try:
        # rank 0's shard (every rank holds an equal one): the per-GPU roofline's numerator
        bytes_per_token = active_weight_bytes(engine)
        roofline = bandwidth / bytes_per_token
        output_len = 32 if args.quick else 256
        lat = latency(engine, input_len=128, output_len=output_len, iterations=3)
        result |= {
            "decode_weight_gb_per_gpu": bytes_per_token / 1e9,
            "roofline_bs1_tok_per_s": roofline,
            "bs1_decode_tok_per_s": lat.decode_tok_per_s_median,
            "bs1_fraction_of_roofline": lat.decode_tok_per_s_median / roofline,
            "kv_tokens_per_rank": engine.block_manager.num_blocks * engine.block_manager.block_size,
        }
        num_requests = 16 if args.quick else 256
        result["job"] = throughput(engine, num_requests, 64 if args.quick else 512, output_len).as_dict()
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["8b", "70b"])
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument(
        "--quick", action="store_true", help="short outputs and a 16-request job (smoke test)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    refusal = missing_gpus(args.tp, device)
    if refusal:
        parser.error(refusal)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    results |= {"torch": torch.__version__, "copy_bandwidth_tb_s": copy_bandwidth(device) / 1e12}
    with tempfile.TemporaryDirectory() as folder:
        for shape in args.shapes:
            config_path = shape_config(shape, Path(folder))
            for tp in args.tp:
                reason = skip_reason(tp, config_path, device)
                key = f"{shape}_tp{tp}"
                results[key] = (
                    {"skipped": reason}
                    if reason
                    else run_one(config_path, tp, args, results["copy_bandwidth_tb_s"] * 1e12)
                )
                print(json.dumps({key: results[key]}), flush=True)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
