"""Model name -> ModelSource (folder, .gguf file or offline HF cache) -> ModelConfig and HF-named weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lmserve.distributed.sharding import TensorSlice
from lmserve.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from lmserve.models.gguf import gguf_model_config, iter_gguf_weights

# their home is models/source.py (no torch: the server front end reads them); re-exported for our callers
from lmserve.models.source import GENERATION_FIELDS as GENERATION_FIELDS
from lmserve.models.source import ModelSource as ModelSource
from lmserve.models.source import load_generation_defaults as load_generation_defaults
from lmserve.models.source import read_json as read_json
from lmserve.models.source import resolve_model as resolve_model

_SKIPPED_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)  # old checkpoints save a buffer the model recomputes

WeightSlicer = Callable[[str, tuple[int, ...]], TensorSlice | None]
"""(checkpoint name, full shape) -> the part a tp rank keeps, or None for all of it (model.weight_slice)."""


# ---------------------------------------------------------------- config


def check_architecture(architecture: str, where: str | Path) -> None:
    """ValueError naming the architecture and the supported list when we cannot build it."""
    supported = tuple(SUPPORTED_ARCHITECTURES)
    if architecture not in supported:
        raise ValueError(
            f"{where}: architecture {architecture!r} is not supported; supported: {list(supported)}"
        )


def load_model_config(source: ModelSource) -> ModelConfig:
    """ModelConfig from config.json (HF folder) or GGUF metadata."""
    if source.kind == "gguf":
        config = gguf_model_config(source.gguf_path)
        check_architecture(config.architecture, source.gguf_path)
        return config
    path = source.path / "config.json"
    hf_config = read_json(path)
    architecture = _hf_architecture(hf_config, path)
    check_architecture(architecture, path)
    return ModelConfig.from_hf_config(hf_config)


def check_model_format(model_format: str, source: ModelSource, config: ModelConfig) -> None:
    """ValueError when `--model-format` names another format than the checkpoint's (auto accepts any)."""
    if model_format == "auto":
        return
    actual = source.kind if source.kind == "gguf" else _hf_format(config)
    if model_format == "fp8" and actual in ("hf", "gguf"):
        return  # a float checkpoint: quantized to FP8 at load time (with_load_time_quantization)
    if actual != model_format:
        raise ValueError(
            f"model_format={model_format!r} but {source.path} holds a {actual!r} checkpoint; "
            f"pass --model-format {actual} or auto"
        )


def model_config_to_build(source: ModelSource, model_format: str) -> ModelConfig:
    """The checkpoint's config, checked against `--model-format`, as the model is built from it (every tp rank)."""
    config = load_model_config(source)
    check_model_format(model_format, source, config)
    return with_load_time_quantization(model_format, config)


def with_load_time_quantization(model_format: str, config: ModelConfig) -> ModelConfig:
    """The model config to build: `--model-format fp8` on a float checkpoint quantizes every linear at load."""
    from lmserve.layers.fp8 import QUANTIZE_AT_LOAD

    if model_format != "fp8" or config.quantization_config is not None:
        return config
    return dataclasses.replace(config, quantization_config=dict(QUANTIZE_AT_LOAD))


def _hf_format(config: ModelConfig) -> str:
    """'hf' for plain weights, else 'awq' or 'w8a8' from quantization_config (ValueError for others)."""
    from lmserve.layers.quant_formats import quant_method

    return quant_method(config.quantization_config) or "hf"


def _hf_architecture(hf_config: dict[str, Any], path: Path) -> str:
    architectures = hf_config.get("architectures")
    if not architectures or not isinstance(architectures, list):
        raise ValueError(f"{path}: field 'architectures' is missing or empty")
    return str(architectures[0])


# ---------------------------------------------------------------- weights


def iter_weights(
    source: ModelSource, config: ModelConfig, weight_slice: WeightSlicer | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs, one tensor at a time; quantized tensors pass through untouched.

    With `weight_slice` (a tp rank) each tensor is cut to the rank's part: safetensors read only that part
    from disk; .bin and GGUF tensors are cut after reading (one whole tensor at a time in memory).
    """
    if source.kind == "gguf":
        for name, tensor in iter_gguf_weights(source.gguf_path, config):
            yield name, _cut(tensor, weight_slice and weight_slice(name, tuple(tensor.shape)))
        return
    for path in weight_files(source.path):
        if path.suffix == ".safetensors":
            tensors = _iter_safetensors(path, weight_slice)
        else:
            tensors = (
                (n, _cut(t, weight_slice and weight_slice(n, tuple(t.shape))))
                for n, t in _iter_torch_bin(path)
            )
        for name, tensor in tensors:
            if not name.endswith(_SKIPPED_WEIGHT_SUFFIXES):
                yield name, tensor


def _cut(tensor: torch.Tensor, part: TensorSlice | None) -> torch.Tensor:
    return tensor if part is None else part.of(tensor)


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of an HF folder: sharded index first, safetensors before .bin."""
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "*.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            return _files_in_index(index)
        files = sorted(folder.glob(pattern))
        if pattern == "*.bin":
            files = [f for f in files if f.name not in ("training_args.bin", "optimizer.bin")]
        if files:
            return files
    raise FileNotFoundError(f"{folder}: no weights (*.safetensors, *.bin or their index.json files)")


def _files_in_index(index: Path) -> list[Path]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: field 'weight_map' is missing or empty")
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} lists weight files that are missing: {missing}")
    return files


def _iter_safetensors(path: Path, weight_slice: WeightSlicer | None) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:  # SafetensorError is not importable as a stable type
        raise ValueError(f"{path}: corrupt or unreadable safetensors file ({error})") from error
    with handle as file:
        for name in file.keys():
            yield name, _read_safetensor(file, name, path, weight_slice)


def _read_safetensor(file: Any, name: str, path: Path, weight_slice: WeightSlicer | None) -> torch.Tensor:
    try:
        if weight_slice is None:
            return file.get_tensor(name)
        lazy = file.get_slice(name)
        part = weight_slice(name, tuple(lazy.get_shape()))
        if part is None:
            return lazy[:]
        index = [slice(None)] * part.dim + [slice(part.start, part.stop)]
        return lazy[tuple(index)]
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"{path}: cannot read tensor {name!r} ({error})") from error


def _iter_torch_bin(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state_dict = _torch_load(path)
    except Exception as error:
        raise ValueError(f"{path}: corrupt or unreadable PyTorch weight file ({error})") from error
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state_dict).__name__}")
    yield from state_dict.items()


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):  # legacy (non-zip) files cannot be memory-mapped
            raise
        return torch.load(path, map_location="cpu", weights_only=True)
