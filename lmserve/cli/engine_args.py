"""Engine flags shared by every command that runs a model (one definition: serve, chat, bench, eval)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from lmserve.config import (
    DEVICES,
    DTYPES,
    EXECUTOR_BACKENDS,
    MODEL_FORMATS,
    POOLING_TYPES,
    QUANT_POLICIES,
    EngineConfig,
)
from lmserve.lora.adapter import parse_adapters


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add LMDeploy's engine options (`--session-len`, `--max-batch-size`, ...) as one group."""
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weight dtype (auto: checkpoint's on CUDA, bfloat16 on CPU)",
    )
    group.add_argument(
        "--device", choices=DEVICES, default="auto", help="where to run (auto: cuda if available)"
    )
    group.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel ranks (GPUs on CUDA; on CPU needs --dtype float32)"
    )
    group.add_argument(
        "--distributed-executor-backend",
        choices=EXECUTOR_BACKENDS,
        default="mp",
        help="how tp ranks 1.. run: mp (processes on this node) or ray (actors, several nodes)",
    )
    group.add_argument(
        "--session-len", type=int, default=None, help="max tokens per session (default: model context)"
    )
    group.add_argument(
        "--max-batch-size", type=int, default=None, help="max running requests (default 128 CUDA, 16 CPU)"
    )
    group.add_argument(
        "--cache-max-entry-count",
        type=float,
        default=None,
        help="KV cache size: fraction of free GPU memory (default 0.8); on CPU a fraction of batch x session, or tokens if > 1",
    )
    group.add_argument("--cache-block-seq-len", type=int, default=64, help="tokens per KV block")
    group.add_argument(
        "--enable-prefix-caching", action="store_true", help="reuse KV of shared prompt prefixes"
    )
    group.add_argument(
        "--max-prefill-token-num", type=int, default=8192, help="token budget per step (chunked prefill)"
    )
    group.add_argument(
        "--quant-policy",
        type=parse_quant_policy,
        default=0,
        help="KV cache quantization: 0, 8 (int8), 4 (int4), fp8 (float8 e4m3)",
    )
    group.add_argument("--model-format", choices=MODEL_FORMATS, default="auto", help="checkpoint format")
    group.add_argument(
        "--lm-head-fp8",
        action="store_true",
        help="quantize the lm_head to FP8 e4m3 per vocabulary row at load time (half its bytes per decode step)",
    )
    group.add_argument("--eager-mode", action="store_true", help="disable CUDA graphs")
    group.add_argument(
        "--overlap-schedule",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="launch each step before the last one's tokens are read back (default: on for one CUDA GPU)",
    )
    group.add_argument("--num-cpu-threads", type=int, default=None, help="torch threads on CPU")
    group.add_argument("--chat-template", default=None, help="chat template: a built-in name or a Jinja file")
    group.add_argument(
        "--pooling",
        choices=POOLING_TYPES,
        default="last",
        help="how /v1/embeddings pools the last hidden states (L2-normalized)",
    )


def parse_quant_policy(text: str) -> int | str:
    """`--quant-policy` value: LMDeploy's integers 0 / 8 / 4, or fp8; a bad one names the allowed values."""
    value: int | str = int(text) if text.lstrip("-").isdigit() else text
    if value not in QUANT_POLICIES:
        allowed = ", ".join(str(policy) for policy in QUANT_POLICIES)
        raise argparse.ArgumentTypeError(f"{text!r} is not a KV cache policy; choose one of {allowed}")
    return value


def add_adapter_args(parser: argparse.ArgumentParser) -> None:
    """`--adapters`, for the commands whose requests can name an adapter (the api_server: `model: NAME`)."""
    parser.add_argument(
        "--adapters",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help="LoRA adapters (PEFT folders) to serve beside the base model; a request picks one with "
        "`model: NAME` (one bare PATH is named `default`)",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Build EngineConfig from parsed flags; ValueError names the bad flag's field."""
    # `--seed` of chat and api_client is the sampling seed (GenerationConfig.random_seed), not EngineConfig.seed
    names = {f.name for f in fields(EngineConfig)} - {"seed"}
    values = {k: v for k, v in vars(args).items() if k in names}
    if "adapters" in values:
        values["adapters"] = parse_adapters(values["adapters"])
    return EngineConfig(**values)


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """Sampling flags for commands that generate directly (chat, api_client)."""
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--temperature", type=float, default=None, help="0 = greedy (default: model's generation_config)"
    )
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--min-p", type=float, default=None)
    group.add_argument("--repetition-penalty", type=float, default=None)
    group.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: up to the end of the session"
    )
    group.add_argument("--seed", type=int, default=None, help="sampling seed")


def generation_overrides(args: argparse.Namespace) -> dict[str, object]:
    """GenerationConfig fields set on the command line (None = not given)."""
    names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p"}
    names |= {
        "repetition_penalty": "repetition_penalty",
        "max_new_tokens": "max_new_tokens",
        "seed": "random_seed",
    }
    changes = {
        field: getattr(args, flag) for flag, field in names.items() if getattr(args, flag, None) is not None
    }
    if "temperature" in changes:
        changes["do_sample"] = changes["temperature"] > 0
    return changes
