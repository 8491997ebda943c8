"""lmserve: deploy and quantize large language models."""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from lmserve.config import EngineConfig, ServeConfig
from lmserve.generation import GenerationConfig, Response

if TYPE_CHECKING:
    from lmserve.pipeline import Pipeline

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
    from lmserve.pipeline import Pipeline

    return Pipeline(model, backend_config=backend_config, **kwargs)


def __getattr__(name: str) -> Any:
    # The engine (and torch) load on first use, so `import lmserve` stays light for the CLI and the API client.
    if name == "Pipeline":
        from lmserve.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps `lmserve.pipeline` the function once the submodule of the same name is imported.

    Importing lmserve.pipeline (here on first use, or by anyone directly) sets the package attribute
    `pipeline` to the module; this refuses that one rebinding, so the function is never shadowed.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "pipeline" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
