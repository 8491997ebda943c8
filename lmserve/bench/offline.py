"""Offline benchmarks on LLMEngine: throughput (many requests) and latency (one request, TTFT and decode speed)."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm

from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig


@dataclass(frozen=True)
class ThroughputResult:
    num_requests: int
    input_len: int
    output_len: int
    concurrency: int
    elapsed_s: float
    request_per_s: float
    output_tok_per_s: float
    total_tok_per_s: float
    mean_ttft_ms: float
    mean_tpot_ms: float
    num_preemptions: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LatencyResult:
    input_len: int
    output_len: int
    iterations: int
    ttft_ms_median: float
    decode_tok_per_s_median: float
    e2e_s_median: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_prompts(num: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random token ids (avoiding the lowest ids, where special tokens usually live)."""
    rng = random.Random(seed)
    low = min(1000, vocab_size // 4)
    return [[rng.randrange(low, vocab_size) for _ in range(length)] for _ in range(num)]


def fixed_length_config(output_len: int) -> GenerationConfig:
    """Greedy, exactly output_len tokens (EOS ignored), as benchmarks need."""
    return GenerationConfig(
        max_new_tokens=output_len, min_new_tokens=output_len, ignore_eos=True, do_sample=False
    )


def throughput(
    engine: LLMEngine,
    num_requests: int,
    input_len: int,
    output_len: int,
    concurrency: int | None = None,
    seed: int = 0,
    warmup: int = 0,
) -> ThroughputResult:
    """Submit num_requests (at most `concurrency` in flight) and step until all finish.

    warmup: untimed runs of the same job first (other prompts, so a prefix cache cannot serve the timed run
    from them): Triton compiles and cuBLAS picks its kernels there, not inside the timed region.
    """
    for i in range(warmup):
        _run_job(engine, num_requests, input_len, output_len, concurrency, seed + 1 + i, "warm-up")
    return _run_job(engine, num_requests, input_len, output_len, concurrency, seed, "throughput")


def _run_job(
    engine: LLMEngine,
    num_requests: int,
    input_len: int,
    output_len: int,
    concurrency: int | None,
    seed: int,
    label: str,
) -> ThroughputResult:
    prompts = random_prompts(num_requests, input_len, engine.model_config.vocab_size, seed)
    config = fixed_length_config(output_len)
    limit = concurrency or num_requests
    pending = list(reversed(prompts))
    start_times: dict[str, float] = {}
    first_token: dict[str, float] = {}
    end_times: dict[str, float] = {}
    preemptions_before = engine.num_preemptions
    start = time.perf_counter()
    with tqdm(total=num_requests, desc=label, unit=" req", disable=None) as bar:
        while pending or engine.has_unfinished():
            while pending and len(start_times) - len(end_times) < limit:
                request_id = engine.add_request(pending.pop(), config)
                start_times[request_id] = time.perf_counter()
            for out in engine.step():
                now = time.perf_counter()
                first_token.setdefault(out.request_id, now)
                if out.finished:
                    end_times[out.request_id] = now
                    bar.update(1)
    elapsed = time.perf_counter() - start
    ttfts = [first_token[r] - start_times[r] for r in start_times]
    tpots = [(end_times[r] - first_token[r]) / max(1, output_len - 1) for r in start_times]
    return ThroughputResult(
        num_requests=num_requests,
        input_len=input_len,
        output_len=output_len,
        concurrency=limit,
        elapsed_s=elapsed,
        request_per_s=num_requests / elapsed,
        output_tok_per_s=num_requests * output_len / elapsed,
        total_tok_per_s=num_requests * (input_len + output_len) / elapsed,
        mean_ttft_ms=1000 * statistics.mean(ttfts),
        mean_tpot_ms=1000 * statistics.mean(tpots),
        num_preemptions=engine.num_preemptions - preemptions_before,
    )


def latency(
    engine: LLMEngine, input_len: int, output_len: int, iterations: int = 3, warmup: int = 1
) -> LatencyResult:
    """One request at a time: time to first token and decode tokens/s, medians over iterations."""
    prompt = random_prompts(1, input_len, engine.model_config.vocab_size)[0]
    config = fixed_length_config(output_len)
    ttfts, decode_rates, e2es = [], [], []
    for i in tqdm(range(warmup + iterations), desc="latency", unit=" run", disable=None):
        start = time.perf_counter()
        engine.add_request(prompt, config)
        first = end = start
        while engine.has_unfinished():
            for out in engine.step():
                if out.num_generated_tokens == 1:
                    first = time.perf_counter()
                if out.finished:
                    end = time.perf_counter()
        if i >= warmup:
            ttfts.append(first - start)
            decode_rates.append((output_len - 1) / max(end - first, 1e-9))
            e2es.append(end - start)
    return LatencyResult(
        input_len=input_len,
        output_len=output_len,
        iterations=iterations,
        ttft_ms_median=1000 * statistics.median(ttfts),
        decode_tok_per_s_median=statistics.median(decode_rates),
        e2e_s_median=statistics.median(e2es),
    )
