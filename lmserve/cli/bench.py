"""`lmserve bench throughput|latency|serving`: offline engine benchmarks and a serving load generator."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lmserve.cli.engine_args import add_engine_args, engine_config_from_args


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="measure speed")
    bench = parser.add_subparsers(dest="bench_command", metavar="KIND")
    throughput = bench.add_parser("throughput", help="offline: many requests through the engine")
    _add_common(throughput)
    throughput.add_argument("--num-prompts", type=int, default=64)
    throughput.add_argument(
        "--concurrency", type=int, default=None, help="max requests in flight (default: all)"
    )
    throughput.add_argument(
        "--warmup", type=int, default=1, help="untimed runs of the same job first (Triton compiles there)"
    )
    throughput.set_defaults(func=run_throughput)
    latency = bench.add_parser("latency", help="offline: one request at a time, TTFT and decode speed")
    _add_common(latency)
    latency.add_argument("--iterations", type=int, default=3)
    latency.add_argument("--warmup", type=int, default=1)
    latency.set_defaults(func=run_latency)
    try:
        from lmserve.bench.serving import register_serving
    except ModuleNotFoundError:
        pass
    else:
        register_serving(bench)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="model (default: embedded SmolLM2)")
    parser.add_argument(
        "--random-weights",
        default=None,
        metavar="CONFIG",
        help="an HF config.json: random weights of that shape",
    )
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    add_engine_args(parser)


def _engine(args: argparse.Namespace) -> Any:
    from lmserve.engine.engine import LLMEngine

    config = engine_config_from_args(args)
    if args.random_weights:
        return LLMEngine.from_random_weights(args.random_weights, config)
    return LLMEngine.from_pretrained(args.model, config, args.chat_template)


def _report(result: Any, args: argparse.Namespace) -> int:
    data = result.as_dict()
    for key, value in data.items():
        print(f"{key:>22}: {value:.3f}" if isinstance(value, float) else f"{key:>22}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
    return 0


def run_throughput(args: argparse.Namespace) -> int:
    from lmserve.bench.offline import throughput

    engine = _engine(args)
    return _report(
        throughput(
            engine, args.num_prompts, args.input_len, args.output_len, args.concurrency, warmup=args.warmup
        ),
        args,
    )


def run_latency(args: argparse.Namespace) -> int:
    from lmserve.bench.offline import latency

    engine = _engine(args)
    return _report(latency(engine, args.input_len, args.output_len, args.iterations, args.warmup), args)
