"""One-call GPU sweep: HBM roofline, batch-1 decode (graph and eager), TTFT, the 256-request job, memory, HF peer.

Usage (on the GPU machine): PYTHONPATH=. python benchmarks/gpu_sweep.py --json OUT.json [--skip-hf] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

import torch

from lmserve.bench.offline import latency, throughput
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.kernels import decode_attention, gemv, w4a16
from lmserve.layers.quant import AWQLinear

CONFIG = "benchmarks/configs/llama3-8b.json"
VARIANTS = {"awq_plane_dots": ("awq", {"wide": 0})}
"""--formats names that run a format with other kernel options: the W4A16 tensor-core kernel's old form (one dot
per 16-row plane) beside the default (one dot per group). A format name ending in `+lmfp8` (`awq+lmfp8`, `fp8+lmfp8`,
`bf16+lmfp8`) runs it with --lm-head-fp8; one ending in `+nosilu` without the activation fused into the one-row
down projection (the A/B of that fusion); one ending in `+notiny` with no one-row GEMM sent to tinygemm; one ending
in `+fuseattn` with decode attention's rotary store and split reduce inside its launch, `+fusenorm` with the add
and RMSNorm inside the one-row GEMVs of qkv and gate_up (both LMSERVE_DECODE_FUSION)."""


def copy_bandwidth(num_bytes: int = 4 << 30, iterations: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second (the HBM roofline we compare against)."""
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / iterations
    del src, dst
    return 2 * num_bytes / seconds


def decode_bytes_per_token(engine: LLMEngine) -> int:
    """Weight bytes read per decoded token: every parameter except the input embedding (a gather)."""
    model = engine.runner.model
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)


def hf_peer(num_tokens: int = 128) -> dict[str, float]:
    """HF transformers generate, batch 1, eager, same shape and random bf16 weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig.from_json_file(CONFIG)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(1000, 100000, (1, 128), device="cuda")
    kwargs: dict[str, Any] = dict(max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False)
    model.generate(ids, max_new_tokens=8, do_sample=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    rate = num_tokens / (time.perf_counter() - start)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"hf_eager_bs1_tok_per_s": rate}


def replay_ms(engine: LLMEngine, batch_size: int, iterations: int = 50) -> float:
    """GPU time of one captured decode graph replayed back to back (no CPU work between steps)."""
    graph = engine.runner.graph_runner.graphs[batch_size]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iterations


def profile_decode(
    engine: LLMEngine, batch_size: int, out_prefix: str | None, steps: int = 20
) -> dict[str, float]:
    """Wall time per steady decode step at batch_size, and a torch.profiler table of a few steps."""
    from torch.profiler import ProfilerActivity, profile

    from lmserve.bench.offline import fixed_length_config, random_prompts

    ids = [
        engine.add_request(p, fixed_length_config(steps + 40))
        for p in random_prompts(batch_size, 512, engine.model_config.vocab_size)
    ]
    while any(engine.requests[i].num_computed_tokens < engine.requests[i].num_prompt_tokens for i in ids):
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    step_ms = 1000 * (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    if out_prefix:
        with open(f"{out_prefix}_bs{batch_size}.txt", "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
            f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
        prof.export_chrome_trace(f"{out_prefix}_bs{batch_size}.json")
    busy = device_busy_ms(prof) / 5
    for i in ids:
        engine.abort(i)
    return {
        f"decode_step_ms_bs{batch_size}": step_ms,
        f"graph_replay_ms_bs{batch_size}": replay_ms(engine, batch_size),
        f"device_busy_ms_per_step_bs{batch_size}": busy,
    }


def device_busy_ms(prof: Any) -> float:
    """Milliseconds in which the GPU ran a kernel or copy (the union of their intervals) in a profile.

    Against the wall time per step this says whether a step waits for the GPU (busy ~ wall) or the
    GPU waits for the host (the gap is host time the overlap did not hide).
    """
    intervals = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
    )
    total, end = 0, None
    start = None
    for lo, hi in intervals:
        if end is None or lo > end:
            if end is not None:
                total += end - start
            start, end = lo, hi
        else:
            end = max(end, hi)
    if end is not None:
        total += end - start
    return total / 1000.0  # profiler times are in microseconds


def model_bytes(engine: LLMEngine) -> int:
    """Bytes of every parameter, and of the W4A16 layers' repacked tensors (held outside the parameters)."""
    model = engine.runner.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head_fp8 is not None:  # --lm-head-fp8: e4m3 weight and scales, not parameters
        total += sum(t.numel() * t.element_size() for t in model.lm_head_fp8)
    for module in model.modules():
        w4 = getattr(module, "w4", None)
        if w4 is not None:
            total += sum(t.numel() * t.element_size() for t in (w4.qweight, w4.scales, w4.zeros))
    return total


def release(engine: LLMEngine) -> None:
    """Drop the engine's GPU memory (weights, KV cache, graphs); the caller must drop its reference too."""
    engine.runner.graph_runner = None
    engine.runner.kv_caches.clear()
    engine.runner.model = None


def collect() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def quant_sweep(
    results: dict[str, Any],
    bf16_weight_bytes: int,
    max_batch_size: int,
    decode_only: bool = False,
    formats: tuple[str, ...] = ("awq", "w8a8", "fp8"),
    profile: str | None = None,
) -> None:
    """W4A16 (AWQ), W8A8 and FP8 random models: batch-1 decode, batch-16/64 steps, memory (FP8 also the job);
    KV int8: capacity, the job."""
    for fmt in formats:
        name, *flags = fmt.split("+")
        suffixes = {
            "lmfp8",
            "nosilu",
            "notiny",
            "fuseattn",
            "fuserot",
            "fusered",
            "fusenorm",
            "occ3",
        }
        if not set(flags) <= suffixes:
            raise ValueError(
                f"format {fmt!r}: the suffixes are +lmfp8, +nosilu, +notiny, +fuseattn (+fuserot, +fusered: "
                "one of its two), +fusenorm and +occ3"
            )
        # +occ3: AWQ's one-row GEMVs on the CUDA GEMV's _o3 kernels, 3 CTAs per SM (w4a16.GEMV_OCCUPANCY)
        occupancy_default = w4a16.GEMV_OCCUPANCY
        w4a16.GEMV_OCCUPANCY = 3 if "occ3" in flags else occupancy_default
        # +fuseattn: decode attention with the rotary store and the split reduce in its own launch; +fusenorm: the
        # residual add and RMSNorm in the one-row GEMVs of qkv and gate_up
        decode_attention.FUSE_ROTARY = bool({"fuseattn", "fuserot"} & set(flags))
        decode_attention.FUSE_REDUCE = bool({"fuseattn", "fusered"} & set(flags))
        gemv.FUSE_NORM = "fusenorm" in flags
        # +notiny: AWQ's one-row GEMMs all on the CUDA GEMV (none to tinygemm, which takes no PDL launch)
        tiny_max = w4a16.TINYGEMM_ONE_ROW_MAX_WEIGHTS
        w4a16.TINYGEMM_ONE_ROW_MAX_WEIGHTS = 0 if "notiny" in flags else tiny_max
        base_format, dot_override = VARIANTS.get(name, (name, None))
        # +nosilu: the down projections without silu(gate) * up in their GEMV (the activation launched apart)
        fused_silu = AWQLinear.silu_gated_forward
        if "nosilu" in flags:
            AWQLinear.silu_gated_forward = lambda self, gate_up: None  # type: ignore[method-assign]
        base_format = "auto" if base_format == "bf16" else base_format
        if dot_override:  # a kernel variant of a format: the W4A16 tensor-core kernel with other options
            default_dot_options = w4a16.dot_options
            w4a16.dot_options = lambda *shape, d=default_dot_options, o=dot_override: d(*shape) | o  # type: ignore[misc]
        config = EngineConfig(
            device="cuda",
            model_format=base_format,
            max_batch_size=max_batch_size,
            lm_head_fp8="lmfp8" in flags,
        )
        engine = LLMEngine.from_random_weights(CONFIG, config)
        lat = latency(engine, input_len=128, output_len=128, iterations=3)
        results[f"{fmt}_bs1_decode_tok_per_s"] = lat.decode_tok_per_s_median
        results[f"{fmt}_weight_bytes_ratio_vs_bf16"] = model_bytes(engine) / bf16_weight_bytes
        for batch_size in (1, 16, 64):
            step = profile_decode(
                engine, batch_size, f"{profile}_{fmt}" if profile and batch_size == 1 else None
            )
            if batch_size == 1:
                results[f"{fmt}_graph_replay_ms_bs1"] = step["graph_replay_ms_bs1"]
                results[f"{fmt}_device_busy_ms_per_step_bs1"] = step["device_busy_ms_per_step_bs1"]
            results[f"{fmt}_decode_step_ms_bs{batch_size}"] = step[f"decode_step_ms_bs{batch_size}"]
        if fmt == "fp8" and not decode_only:
            job = throughput(engine, num_requests=256, input_len=512, output_len=256, warmup=1)
            results["fp8_job"] = job.as_dict()
        print(results, flush=True)
        release(engine)
        del engine
        collect()
        w4a16.TINYGEMM_ONE_ROW_MAX_WEIGHTS = tiny_max
        w4a16.GEMV_OCCUPANCY = occupancy_default
        AWQLinear.silu_gated_forward = fused_silu  # type: ignore[method-assign]
        if dot_override:
            w4a16.dot_options = default_dot_options
        decode_attention.FUSE_ROTARY = decode_attention.FUSE_REDUCE = gemv.FUSE_NORM = False
    if decode_only:
        return
    engine = LLMEngine.from_random_weights(
        CONFIG, EngineConfig(device="cuda", quant_policy=8, max_batch_size=max_batch_size)
    )
    results["kv_int8_tokens"] = engine.block_manager.num_blocks * engine.block_manager.block_size
    results["kv_int8_capacity_ratio"] = results["kv_int8_tokens"] / results["kv_tokens"]
    job = throughput(engine, num_requests=256, input_len=512, output_len=256, warmup=1)
    results["kv_int8_job"] = job.as_dict()
    print(results, flush=True)
    release(engine)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small job sizes (smoke test)")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--quant", action="store_true", help="also W4A16, W8A8, FP8 and KV-int8 engines")
    parser.add_argument(
        "--formats", nargs="+", default=["awq", "w8a8", "fp8"], help="weight formats of --quant"
    )
    parser.add_argument(
        "--decode-only",
        action="store_true",
        help="batch-1 decode and decode steps only (no eager, TTFT, jobs)",
    )
    parser.add_argument(
        "--profile", default=None, metavar="PREFIX", help="write torch.profiler tables to PREFIX_bsN.txt"
    )
    args = parser.parse_args()
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    results["copy_bandwidth_tb_s"] = copy_bandwidth() / 1e12
    print(results, flush=True)
    if not args.skip_hf:
        results |= hf_peer(32 if args.quick else 128)
        print(results, flush=True)

    start = time.perf_counter()
    engine = LLMEngine.from_random_weights(
        CONFIG, EngineConfig(device="cuda", max_batch_size=args.max_batch_size)
    )
    results["engine_build_s"] = time.perf_counter() - start
    weight_bytes = decode_bytes_per_token(engine)
    roofline = results["copy_bandwidth_tb_s"] * 1e12 / weight_bytes
    results |= {
        "decode_bytes_per_token_gb": weight_bytes / 1e9,
        "roofline_bs1_tok_per_s": roofline,
        "kv_blocks": engine.block_manager.num_blocks,
        "kv_tokens": engine.block_manager.num_blocks * engine.block_manager.block_size,
        "gpu_memory_allocated_gb": torch.cuda.memory_allocated() / 1e9,
        "gpu_memory_reserved_gb": torch.cuda.memory_reserved() / 1e9,
    }
    results["max_concurrent_512_256"] = results["kv_tokens"] // (512 + 256)
    print(results, flush=True)

    out_len = 64 if args.quick else 256
    lat = latency(engine, input_len=128, output_len=out_len, iterations=3)
    results["bs1_decode_tok_per_s_graph"] = lat.decode_tok_per_s_median
    results["bs1_fraction_of_roofline"] = lat.decode_tok_per_s_median / roofline
    if args.decode_only:
        for batch_size in (1, 16, 64):
            results |= profile_decode(engine, batch_size, args.profile)
        bf16_bytes = model_bytes(engine)
        release(engine)
        del engine
        collect()
        quant_sweep(
            results,
            bf16_bytes,
            args.max_batch_size,
            decode_only=True,
            formats=tuple(args.formats),
            profile=args.profile,
        )
        print(json.dumps(results, indent=2), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return
    graph_runner, engine.runner.graph_runner = engine.runner.graph_runner, None
    eager = latency(engine, input_len=128, output_len=64, iterations=2)
    engine.runner.graph_runner = graph_runner
    results["bs1_decode_tok_per_s_eager"] = eager.decode_tok_per_s_median
    ttft = latency(engine, input_len=2048, output_len=2, iterations=5)
    results["ttft_2048_ms"] = ttft.ttft_ms_median
    for batch_size in (1, 16, 32, 64, 128):
        results |= profile_decode(engine, batch_size, args.profile)
    print(results, flush=True)

    num = 32 if args.quick else 256
    job = throughput(engine, num_requests=num, input_len=512, output_len=out_len, warmup=1)
    results["job"] = job.as_dict()
    results["job_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if args.quant:
        bf16_bytes = model_bytes(engine)
        release(engine)
        del engine
        collect()
        quant_sweep(results, bf16_bytes, args.max_batch_size, formats=tuple(args.formats))
    print(json.dumps(results, indent=2), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
