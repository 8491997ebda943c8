"""The server front end's start-up path imports no torch (its core imports it, in parallel, in its own process)."""

from __future__ import annotations

import os
import subprocess
import sys

FRONT_END_PATH = """
import sys
from lmserve.engine.core_client import CoreClient
from lmserve.models.source import resolve_model
from lmserve.models.tokenizer import load_tokenizer
import lmserve.serve.app
tokenizer = load_tokenizer(resolve_model(None))
tokenizer.encode_chat([{"role": "user", "content": "hi"}])
print("torch" in sys.modules)
"""


def test_front_end_modules_and_the_gguf_tokenizer_leave_torch_unimported() -> None:
    done = subprocess.run([sys.executable, "-c", FRONT_END_PATH], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"


CORE_PATH = """
import sys
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
engine = LLMEngine.from_pretrained(None, EngineConfig(), detokenize=False)
print(sorted(engine.scheduler.eos_token_ids), "transformers" in sys.modules, "triton" in sys.modules)
"""


def test_engine_core_starts_without_transformers() -> None:
    """A server's core loads the embedded model with its EOS ids from the GGUF, not transformers' tokenizer; without
    a CUDA device (and no TRITON_INTERPRET) it does not import Triton either (kernels/_triton.py)."""
    import torch

    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", CORE_PATH], capture_output=True, text=True, check=True, env=env
    )
    assert done.stdout.strip().splitlines()[-1] == f"[2] False {torch.cuda.is_available()}"
