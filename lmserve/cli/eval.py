"""`lmserve eval ppl [MODEL]`: perplexity on held-out text, so quality figures are reproducible."""

from __future__ import annotations

import argparse
from typing import Any

from lmserve.cli.engine_args import parse_quant_policy
from lmserve.config import MODEL_FORMATS
from lmserve.quant.corpus import DEFAULT_DATASET


def register(subparsers: Any) -> None:
    evaluate = subparsers.add_parser("eval", help="evaluate a model (perplexity)")
    commands = evaluate.add_subparsers(dest="eval_command", metavar="COMMAND", parser_class=type(evaluate))
    parser = commands.add_parser("ppl", help="perplexity on held-out text with a sliding window")
    parser.add_argument(
        "model", nargs="?", default=None, help="model folder (also quantized), .gguf file, cached hub id"
    )
    parser.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help=f"'{DEFAULT_DATASET}' (the shipped held-out part), a .txt / .jsonl file or a local HF dataset folder",
    )
    parser.add_argument("--num-tokens", type=int, default=20000, help="tokens evaluated (default 20000)")
    parser.add_argument("--window", type=int, default=512, help="tokens per forward pass (default 512)")
    parser.add_argument("--stride", type=int, default=512, help="step between windows (default 512)")
    parser.add_argument(
        "--quant-policy",
        type=parse_quant_policy,
        default=None,
        help="run through lmserve's engine (float32) with this KV cache: 0 plain, 8 int8, 4 int4, fp8 e4m3; "
        "without it, transformers' model runs (the reference)",
    )
    parser.add_argument(
        "--model-format",
        choices=MODEL_FORMATS,
        default="auto",
        help="run through lmserve's engine (float32) with this format: fp8 quantizes a float checkpoint to FP8 "
        "W8A8 at load time (on a CPU its GEMM is emulated in float32 with the same e4m3 rounding)",
    )
    parser.add_argument(
        "--lm-head-fp8",
        action="store_true",
        help="run through lmserve's engine (float32) with the lm_head quantized to FP8 e4m3 per vocabulary row "
        "(on a CPU its product is emulated in float32 with the same e4m3 rounding)",
    )
    parser.set_defaults(func=run_ppl)
    evaluate.set_defaults(func=lambda _args: evaluate.print_help() or 2)


def run_ppl(args: argparse.Namespace) -> int:
    from lmserve.quant.evaluate import evaluate_perplexity

    result = evaluate_perplexity(
        args.model,
        args.dataset,
        args.num_tokens,
        args.window,
        args.stride,
        args.quant_policy,
        args.model_format,
        args.lm_head_fp8,
    )
    print(result.summary())
    return 0
