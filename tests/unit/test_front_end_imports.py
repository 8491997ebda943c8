"""The server front end's start-up path imports no torch (its core imports it, in parallel, in its own process)."""

from __future__ import annotations

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
