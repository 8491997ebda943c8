"""`lmserve lite auto_awq | smooth_quant | calibrate MODEL`: quantization with LMDeploy's flags."""

from __future__ import annotations

import argparse
from typing import Any

from lmserve.quant.corpus import DEFAULT_DATASET

MODEL_HELP = "model folder, .gguf file or cached hub id (default: embedded SmolLM2)"
DEVICES = ("auto", "cpu", "cuda")


def register(subparsers: Any) -> None:
    lite = subparsers.add_parser("lite", help="quantize a model (AWQ W4A16, SmoothQuant W8A8)")
    commands = lite.add_subparsers(dest="lite_command", metavar="COMMAND", parser_class=type(lite))
    _add_auto_awq(commands)
    _add_smooth_quant(commands)
    _add_calibrate(commands)
    lite.set_defaults(func=lambda _args: lite.print_help() or 2)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    parser.add_argument("--work-dir", default="./work_dir", help="output folder (default ./work_dir)")
    parser.add_argument(
        "--calib-dataset",
        default=DEFAULT_DATASET,
        help=f"'{DEFAULT_DATASET}' (shipped public-domain text), a .txt file, a .jsonl file with a 'text' field, "
        "or a local HF dataset folder (nothing is downloaded)",
    )
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    parser.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="where calibration runs (auto: cuda if available)"
    )


def _add_auto_awq(commands: Any) -> None:
    parser = commands.add_parser("auto_awq", help="AWQ W4A16, written in the AutoAWQ GEMM layout")
    _add_common(parser)
    parser.add_argument("--w-bits", type=int, default=4, help="weight bits (4)")
    parser.add_argument(
        "--w-sym", action="store_true", help="symmetric weights (stored with a fixed zero point 8)"
    )
    parser.add_argument(
        "--w-group-size",
        type=int,
        default=128,
        help="input features per scale/zero group; must divide every in_features (SmolLM2: 64)",
    )
    parser.add_argument(
        "--search-scale",
        action="store_true",
        help="search AWQ scales per group of linears on a grid (AutoAWQ); off: LMDeploy's fixed ratio 0.5. Either "
        "way each group's clip range is searched and weights round with GPTQ's error feedback",
    )
    parser.add_argument(
        "--rtn", action="store_true", help="plain round-to-nearest: no activation-aware scaling, no clipping"
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float16", "bfloat16"),
        default="auto",
        help="unquantized tensors (auto: float16)",
    )
    parser.add_argument(
        "--eval-tokens",
        type=int,
        default=4096,
        help="when done, perplexity of the model before and after on this many tokens of the shipped held-out "
        "text (default 4096; 0 skips it)",
    )
    parser.set_defaults(func=run_auto_awq)


def _add_smooth_quant(commands: Any) -> None:
    parser = commands.add_parser(
        "smooth_quant", help="SmoothQuant W8A8 int8, written in the compressed-tensors layout"
    )
    _add_common(parser)
    parser.add_argument("--alpha", type=float, default=0.5, help="migration strength in [0, 1] (default 0.5)")
    parser.add_argument(
        "--quant-dtype", choices=("int8",), default="int8", help="int8 (fp8 is not supported yet)"
    )
    parser.add_argument(
        "--dtype", choices=("auto", "float16", "bfloat16"), default="auto", help="unquantized tensors"
    )
    parser.set_defaults(func=run_smooth_quant)


def _add_calibrate(commands: Any) -> None:
    parser = commands.add_parser("calibrate", help="activation statistics only (WORK_DIR/inputs_stats.pth)")
    _add_common(parser)
    parser.set_defaults(func=run_calibrate)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _calibration(args: argparse.Namespace) -> Any:
    from lmserve.quant.quantize import CalibrationOptions

    return CalibrationOptions(args.calib_dataset, args.calib_samples, args.calib_seqlen, args.batch_size)


def run_auto_awq(args: argparse.Namespace) -> int:
    from lmserve.quant.quantize import AWQOptions, auto_awq

    if args.rtn and args.search_scale:
        raise ValueError("--rtn and --search-scale exclude each other")
    options = AWQOptions(args.w_bits, args.w_sym, args.w_group_size, args.search_scale, args.rtn)
    if args.eval_tokens < 0 or args.eval_tokens == 1:
        raise ValueError(f"--eval-tokens {args.eval_tokens}: give 0 (skip) or at least 2 tokens")
    out = auto_awq(args.model, args.work_dir, _calibration(args), options, args.dtype, _device(args.device))
    print(f"AWQ W{args.w_bits}A16 checkpoint written to {out}")
    if args.eval_tokens:
        _report_quality(args.model, str(out), args.eval_tokens)
    return 0


def _report_quality(model: str | None, quantized: str, num_tokens: int) -> None:
    """Perplexity before and after on the shipped held-out text (the same windows for both)."""
    from lmserve.quant.evaluate import evaluate_perplexity

    before = evaluate_perplexity(model, DEFAULT_DATASET, num_tokens)
    after = evaluate_perplexity(quantized, DEFAULT_DATASET, num_tokens)
    change = 100 * (after.perplexity / before.perplexity - 1)
    print(
        f"held-out perplexity ({DEFAULT_DATASET}, {before.num_scored_tokens} tokens): "
        f"{before.perplexity:.4f} before, {after.perplexity:.4f} after ({change:+.1f} %)"
    )


def run_smooth_quant(args: argparse.Namespace) -> int:
    from lmserve.quant.quantize import smooth_quant

    out = smooth_quant(
        args.model, args.work_dir, _calibration(args), args.alpha, args.dtype, _device(args.device)
    )
    print(f"W8A8 checkpoint written to {out}")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from lmserve.quant.quantize import calibrate

    path = calibrate(args.model, args.work_dir, _calibration(args), _device(args.device))
    print(f"activation statistics written to {path}")
    return 0
