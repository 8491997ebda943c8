"""lmserve: deploy and quantize large language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmserve.config import EngineConfig, ServeConfig
from lmserve.generation import GenerationConfig, Response

__version__ = "0.1.0"
__all__ = ["EngineConfig", "GenerationConfig", "Response", "ServeConfig", "pipeline", "__version__"]

if TYPE_CHECKING:
    from lmserve.pipeline import Pipeline


def pipeline(model: str | None = None, backend_config: EngineConfig | None = None, **kwargs: Any) -> Pipeline:
    """Build a Pipeline (LMDeploy's `pipeline()`); None serves the embedded SmolLM2."""
    from lmserve.pipeline import Pipeline

    return Pipeline(model, backend_config=backend_config, **kwargs)
