"""Quantized HF checkpoints: written atomically (AutoAWQ / compressed-tensors names), and read back for evaluation."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmserve.layers.quant import make_quantized_linear
from lmserve.layers.quant_formats import quant_method
from lmserve.models.loader import ModelSource, read_json
from lmserve.models.tokenizer import Tokenizer
from lmserve.quant.calibrate import build_hf_model, check_quantizable

MAX_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


@contextmanager
def staging_dir(work_dir: Path) -> Iterator[Path]:
    """A temp folder beside work_dir; on success its files move into work_dir, on error it vanishes."""
    work_dir = work_dir.resolve()
    work_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{work_dir.name}.tmp-", dir=work_dir.parent))
    try:
        yield staging
        _publish(staging, work_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, work_dir: Path) -> None:
    if not work_dir.exists():
        os.replace(staging, work_dir)
        return
    # work_dir may hold calibration statistics worth keeping; old weight shards must go.
    for stale in list(work_dir.glob("model*.safetensors")) + list(
        work_dir.glob("model.safetensors.index.json")
    ):
        stale.unlink()
    for item in staging.iterdir():
        os.replace(item, work_dir / item.name)


def save_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """model.safetensors, or 2 GiB shards with model.safetensors.index.json (HF's naming)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file_name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))


def save_config(
    folder: Path, hf_config: dict[str, Any], quantization_config: dict, dtype: torch.dtype
) -> None:
    config = dict(hf_config)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_tokenizer(folder: Path, source: ModelSource, tokenizer: Tokenizer) -> None:
    """Copy an HF folder's tokenizer files; from GGUF, save the HF tokenizer built from its metadata."""
    if source.kind == "hf":
        for name in TOKENIZER_FILES:
            if (source.path / name).is_file():
                shutil.copy2(source.path / name, folder / name)
        return
    tokenizer.hf.save_pretrained(str(folder))


# ---------------------------------------------------------------- reading back


def load_quantized_model(folder: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An HF transformers model whose decoder linears are lmserve's quantized ones (the eval vehicle)."""
    hf_config = read_json(folder / "config.json")
    quantization_config = hf_config.pop("quantization_config", None)
    quant_method(quantization_config)  # ValueError for a layout we cannot run
    check_quantizable(hf_config.get("architectures", ["?"])[0])
    model = build_hf_model(hf_config, dtype)
    tensors = _read_safetensors(folder)
    _swap_quantized_linears(model, tensors, quantization_config or {})
    _load_state(model, tensors, bool(hf_config.get("tie_word_embeddings")))
    return model.eval()


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as file:
            tensors |= {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    if not tensors:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    return tensors


def _swap_quantized_linears(model: Any, tensors: dict[str, torch.Tensor], quant_config: dict) -> None:
    markers = (".qweight", ".weight_scale")
    quantized = {name.rsplit(".", 1)[0] for name in tensors if name.endswith(markers)}
    for name in quantized:
        linear = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        replacement = make_quantized_linear(
            linear.in_features, linear.out_features, linear.bias is not None, quant_config
        )
        setattr(model.get_submodule(parent_name), child, replacement)


@torch.no_grad()
def _load_state(model: Any, tensors: dict[str, torch.Tensor], tied: bool) -> None:
    params = dict(model.named_parameters())
    unexpected = [name for name in tensors if name not in params]
    if unexpected:
        raise ValueError(f"checkpoint has tensors the model lacks: {unexpected[:5]}")
    for name, param in params.items():
        if name in tensors:
            param.data = tensors[name].to(param.dtype if param.is_floating_point() else tensors[name].dtype)
        elif not (tied and name == "lm_head.weight"):
            raise ValueError(f"checkpoint lacks tensor {name!r}")
    if tied:
        model.tie_weights()
