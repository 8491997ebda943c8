"""`lmserve bench serving`: load generator for any OpenAI-compatible server (request/s, tok/s, TTFT, TPOT)."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

SPAWN_ALLOWANCE_S = 5.0
"""Client processes start this long after they are launched, all at once."""
FILLER = " the"  # one token in GPT-2-style BPE vocabularies; calibrated through /v1/encode when available


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    error: str = ""
    response_start: float = 0.0
    """Seconds from sending the request to the response's status line (the server's per-request work)."""


@dataclass
class ServingReport:
    base_url: str
    model: str
    num_requests: int
    concurrency: int
    input_len: int
    output_len: int
    prompt_tokens: int | None
    duration_s: float
    num_errors: int
    request_per_s: float
    output_tok_per_s: float
    ttft_s: dict[str, float] = field(default_factory=dict)
    tpot_s: dict[str, float] = field(default_factory=dict)
    latency_s: dict[str, float] = field(default_factory=dict)
    response_start_s: dict[str, float] = field(default_factory=dict)
    num_workers: int = 1
    errors: list[str] = field(default_factory=list)


def register_serving(bench_subparsers: Any) -> None:
    """Add `serving` to `lmserve bench` (called from lmserve/cli/bench.py)."""
    parser = bench_subparsers.add_parser(
        "serving",
        help="load-test an OpenAI-compatible server: TTFT, TPOT, throughput",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--base-url", default="http://localhost:23333", help="server URL (with or without /v1)"
    )
    parser.add_argument("--model", default=None, help="model name (default: the server's first model)")
    parser.add_argument("--api-key", default=None, help="Bearer key")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests to send")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument(
        "--output-len", type=int, default=128, help="output tokens per request (max_tokens + ignore_eos)"
    )
    parser.add_argument(
        "--no-ignore-eos", dest="ignore_eos", action="store_false", help="do not send ignore_eos"
    )
    parser.add_argument("--warmup", type=int, default=1, help="requests sent before measuring")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=1,
        help="client processes sharing the load (so the load generator is not what limits the measurement)",
    )
    parser.add_argument("--json", dest="json_path", default=None, help="write the report to this JSON file")
    parser.set_defaults(func=run_serving)


def run_serving(args: argparse.Namespace) -> int:
    for name in ("num_prompts", "concurrency", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}={getattr(args, name)} must be >= 1")
    report = asyncio.run(bench_serving(args))
    print(format_report(report))
    if args.json_path:
        with open(args.json_path, "w") as file:
            json.dump(asdict(report), file, indent=2)
    return 0 if report.num_errors < report.num_requests else 1


async def bench_serving(args: argparse.Namespace) -> ServingReport:
    base = args.base_url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with _client(base, headers, args.concurrency) as http:
        model = args.model or (await http.get("/models")).json()["data"][0]["id"]
        prompt, prompt_tokens = await build_prompt(http, args.input_len)
        body = _request_body(model, prompt, args.output_len, args.ignore_eos)
        for _ in range(args.warmup):
            await one_request(http, body)
    workers = max(1, min(getattr(args, "num_workers", 1), args.concurrency))
    if workers == 1:
        results, duration = await _timed_run(base, headers, body, args.num_prompts, args.concurrency)
    else:
        results, duration = _run_in_processes(
            base, headers, body, args.num_prompts, args.concurrency, workers
        )
    return summarize(args, base, model, prompt_tokens, results, duration)


def _client(base: str, headers: dict[str, str], concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 4)
    return httpx.AsyncClient(base_url=base, headers=headers, timeout=httpx.Timeout(3600.0), limits=limits)


async def _timed_run(
    base: str, headers: dict[str, str], body: dict[str, Any], num: int, concurrency: int
) -> tuple[list[RequestResult], float]:
    async with _client(base, headers, concurrency) as http:
        start = time.perf_counter()
        results = await _run_all(http, body, num, concurrency)
        return results, time.perf_counter() - start


def _worker(
    job: tuple[str, dict[str, str], dict[str, Any], int, int, float],
) -> tuple[list[RequestResult], float, float]:
    """One client process: waits for the common start, runs its share; returns results, start and end."""
    base, headers, body, num, concurrency, start_at = job
    time.sleep(max(0.0, start_at - time.perf_counter()))  # perf_counter is CLOCK_MONOTONIC: one clock for all
    start = time.perf_counter()
    results, duration = asyncio.run(_timed_run(base, headers, body, num, concurrency))
    return results, start, start + duration


def _run_in_processes(
    base: str, headers: dict[str, str], body: dict[str, Any], num: int, concurrency: int, workers: int
) -> tuple[list[RequestResult], float]:
    """Split the load over client processes, so one Python process's speed does not cap what is measured."""
    import multiprocessing

    shares = [(num * (i + 1)) // workers - (num * i) // workers for i in range(workers)]
    slots = [(concurrency * (i + 1)) // workers - (concurrency * i) // workers for i in range(workers)]
    start_at = time.perf_counter() + SPAWN_ALLOWANCE_S  # every process starts sending at the same moment
    jobs = [(base, headers, body, n, c, start_at) for n, c in zip(shares, slots, strict=True) if n]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        parts = pool.map(_worker, jobs)
    results = [result for part in parts for result in part[0]]
    return results, max(end for _, _, end in parts) - min(start for _, start, _ in parts)


def _request_body(model: str, prompt: str, output_len: int, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "stream": True,
    }
    body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM, LMDeploy, lmserve; servers that do not know it ignore it
    return body


async def build_prompt(http: httpx.AsyncClient, input_len: int) -> tuple[str, int | None]:
    """A prompt of exactly input_len tokens where the server tokenizes (/v1/encode), else an estimate."""
    text = FILLER * input_len
    count = await _count_tokens(http, text)
    if count is None:
        return text, None
    for _ in range(4):  # the filler is one token in most vocabularies; adjust if not
        if count == input_len:
            break
        words = max(1, round(len(text.split()) * input_len / max(count, 1)))
        text = FILLER * words
        count = await _count_tokens(http, text) or count
    return text, count


async def _count_tokens(http: httpx.AsyncClient, text: str) -> int | None:
    try:
        response = await http.post(
            str(http.base_url).rstrip("/").removesuffix("/v1") + "/v1/encode", json={"input": text}
        )
        return int(response.json()["length"]) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


async def _run_all(
    http: httpx.AsyncClient, body: dict[str, Any], num: int, concurrency: int
) -> list[RequestResult]:
    semaphore = asyncio.Semaphore(concurrency)
    progress = tqdm(total=num, desc="requests", unit="req")

    async def limited() -> RequestResult:
        async with semaphore:
            result = await one_request(http, body)
            progress.update(1)
            return result

    try:
        return list(await asyncio.gather(*(limited() for _ in range(num))))
    finally:
        progress.close()


async def one_request(http: httpx.AsyncClient, body: dict[str, Any]) -> RequestResult:
    """One streamed completion: time to the first text, total latency, output tokens (usage or chunks)."""
    start = time.perf_counter()
    ttft, chunks, usage_tokens = 0.0, 0, None
    try:
        async with http.stream("POST", "/completions", json=body) as response:
            response_start = time.perf_counter() - start
            if response.status_code != 200:
                return RequestResult(
                    False, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                )
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                payload = json.loads(line[5:])
                if "error" in payload:
                    return RequestResult(False, error=str(payload["error"])[:200])
                if payload.get("usage"):
                    usage_tokens = payload["usage"].get("completion_tokens")
                if any(c.get("text") for c in payload.get("choices", [])):
                    chunks += 1
                    ttft = ttft or time.perf_counter() - start
    except (httpx.HTTPError, ValueError) as error:
        return RequestResult(False, error=f"{type(error).__name__}: {error}")
    return RequestResult(True, ttft, time.perf_counter() - start, usage_tokens or chunks, "", response_start)


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(ordered),
        "p50": ordered[int(0.5 * (len(ordered) - 1))],
        "p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
    }


def summarize(
    args: argparse.Namespace,
    base: str,
    model: str,
    prompt_tokens: int | None,
    results: list[RequestResult],
    duration: float,
) -> ServingReport:
    ok = [r for r in results if r.ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return ServingReport(
        base_url=base,
        model=model,
        num_requests=len(results),
        concurrency=args.concurrency,
        input_len=args.input_len,
        output_len=args.output_len,
        prompt_tokens=prompt_tokens,
        duration_s=duration,
        num_errors=len(results) - len(ok),
        request_per_s=len(ok) / duration,
        output_tok_per_s=sum(r.output_tokens for r in ok) / duration,
        ttft_s=_stats([r.ttft for r in ok]),
        tpot_s=_stats(tpots),
        latency_s=_stats([r.latency for r in ok]),
        response_start_s=_stats([r.response_start for r in ok]),
        num_workers=getattr(args, "num_workers", 1),
        errors=sorted({r.error for r in results if not r.ok})[:10],
    )


def format_report(report: ServingReport) -> str:
    def ms(stats: dict[str, float]) -> str:
        return " ".join(f"{k} {v * 1000:.1f}" for k, v in stats.items()) or "-"

    lines = [
        f"server        {report.base_url}  model {report.model}",
        f"requests      {report.num_requests} at concurrency {report.concurrency}, {report.num_errors} errors",
        f"lengths       in {report.input_len} (server counted {report.prompt_tokens}), out {report.output_len}",
        f"duration      {report.duration_s:.2f} s",
        f"throughput    {report.request_per_s:.2f} req/s, {report.output_tok_per_s:.1f} output tok/s",
        f"TTFT ms       {ms(report.ttft_s)}",
        f"TPOT ms       {ms(report.tpot_s)}",
        f"latency ms    {ms(report.latency_s)}",
        f"response ms   {ms(report.response_start_s)}  (request sent -> status line; {report.num_workers} client processes)",
    ]
    lines += [f"error         {e}" for e in report.errors]
    return "\n".join(lines)
