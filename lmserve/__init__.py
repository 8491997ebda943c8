"""lmserve: deploy and quantize large language models."""

from __future__ import annotations

from typing import Any

from lmserve.config import EngineConfig, ServeConfig
from lmserve.generation import GenerationConfig, Response

# Imported before `pipeline` is defined: importing the submodule lmserve.pipeline binds the package
# attribute `pipeline` to the module the first time, so the function must be defined after it.
from lmserve.pipeline import Pipeline  # noqa: I001

__version__ = "0.1.0"
__all__ = [
    "EngineConfig",
    "GenerationConfig",
    "Pipeline",
    "Response",
    "ServeConfig",
    "pipeline",
    "__version__",
]


def pipeline(model: str | None = None, backend_config: EngineConfig | None = None, **kwargs: Any) -> Pipeline:
    """Build a Pipeline (LMDeploy's `pipeline()`); None serves the embedded SmolLM2."""
    return Pipeline(model, backend_config=backend_config, **kwargs)
