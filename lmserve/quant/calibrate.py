"""Calibration: the float model as an HF transformers module, run layer by layer, and activation statistics.

The calibration vehicle is transformers' own LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM,
built from a config.json (or GGUF metadata) and filled with the weights of lmserve's loader, so a GGUF
file and an HF folder quantize the same way. Only one decoder layer's activations live at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmserve.models.config import ModelConfig
from lmserve.models.loader import ModelSource, iter_weights, load_model_config, read_json, resolve_model
from lmserve.models.tokenizer import Tokenizer, load_tokenizer

QUANTIZABLE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
STATS_FILE = "inputs_stats.pth"
STAT_NAMES = ("absmax", "absmean", "max", "min", "mean")


@dataclass
class FloatModel:
    """An unquantized model ready for calibration: HF module, our tokenizer, where it came from."""

    model: Any
    tokenizer: Tokenizer
    source: ModelSource
    config: ModelConfig
    hf_config: dict[str, Any]


@dataclass
class LayerBatch:
    """One batch of a decoder layer's input: hidden states and the keyword arguments HF passes it."""

    hidden: torch.Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CalibrationSettings:
    """What a statistics file was computed from; stats are reused only when all of it matches."""

    model: str
    calib_dataset: str
    calib_samples: int
    calib_seqlen: int


def load_float_model(
    model: str | None, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> FloatModel:
    """The model at `model` (folder, .gguf, cached hub id, None = embedded) as an HF module in `dtype`."""
    source = resolve_model(model)
    config = load_model_config(source)
    check_quantizable(config.architecture)
    hf_config = hf_config_dict(source, config)
    hf_model = build_hf_model(hf_config, dtype)
    _load_weights(hf_model, iter_weights(source, config), config.tie_word_embeddings)
    hf_model.to(device).eval()
    return FloatModel(hf_model, load_tokenizer(source), source, config, hf_config)


def check_quantizable(architecture: str) -> None:
    if architecture not in QUANTIZABLE_ARCHITECTURES:
        raise ValueError(
            f"architecture {architecture!r} cannot be quantized; supported: {list(QUANTIZABLE_ARCHITECTURES)}"
        )


def hf_config_dict(source: ModelSource, config: ModelConfig) -> dict[str, Any]:
    """config.json content for the float model: the folder's own, or one built from GGUF metadata."""
    if source.kind == "hf":
        hf_config = read_json(source.path / "config.json")
        hf_config.pop("quantization_config", None)
        return hf_config
    hf_config = {
        "architectures": [config.architecture],
        "model_type": config.architecture.removesuffix("ForCausalLM").lower(),
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "hidden_act": config.hidden_act,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids)
        if len(config.eos_token_ids) != 1
        else config.eos_token_ids[0],
        "torch_dtype": "bfloat16",
    }
    return hf_config


def build_hf_model(hf_config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """An HF transformers model of hf_config's architecture with uninitialized weights (no init cost)."""
    import transformers

    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "torch_dtype"})
    config.architectures = hf_config["architectures"]
    model_class = getattr(transformers, hf_config["architectures"][0])
    with torch.device("meta"):
        model = model_class(config)
    model = model.to_empty(device="cpu").to(dtype)
    _reset_rotary(model)
    return model


def _load_weights(model: Any, weights: Iterator[tuple[str, torch.Tensor]], tied: bool) -> None:
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    loaded = set()
    for name, tensor in weights:
        if name not in params:
            continue  # rotary inv_freq and other derived tensors
        params[name].data.copy_(tensor.to(params[name].dtype))
        loaded.add(name)
    if tied:
        model.tie_weights()
        loaded.add("lm_head.weight")
    missing = [n for n in dict(model.named_parameters()) if n not in loaded]
    if missing:
        raise ValueError(f"checkpoint lacks weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _reset_rotary(model: Any) -> None:
    """Buffers created on the meta device hold garbage after to_empty: rebuild the rotary embeddings."""
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb") and hasattr(module, "config"):
            parent_name, _, child = name.rpartition(".")
            fresh = type(module)(module.config).to(next(model.parameters()).dtype)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)


def decoder_layers(model: Any) -> nn.ModuleList:
    return model.model.layers  # type: ignore[union-attr,return-value]


# ---------------------------------------------------------------- layer-by-layer runs


class _StopForward(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model: Any, samples: torch.Tensor, batch_size: int) -> list[LayerBatch]:
    """The hidden states and kwargs the first decoder layer receives, per batch of samples."""
    batches: list[LayerBatch] = []

    def catch(_module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        batches.append(LayerBatch(hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    device = next(model.parameters()).device
    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, len(samples), batch_size):
            try:
                model(samples[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return batches


@torch.no_grad()
def run_layer(layer: Any, batches: list[LayerBatch]) -> list[LayerBatch]:
    """The layer's outputs, which are the next layer's inputs."""
    outputs = []
    for batch in batches:
        out = layer(batch.hidden, **batch.kwargs)
        outputs.append(LayerBatch(out[0] if isinstance(out, tuple) else out, batch.kwargs))
    return outputs


@torch.no_grad()
def record_linear_inputs(
    layer: Any, batches: list[LayerBatch], observe: Callable[[str, torch.Tensor], None]
) -> list[LayerBatch]:
    """Run the layer, calling observe(linear name, its input [..., in]) for each linear call."""
    handles = []
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            hook = _input_hook(name, observe)
            handles.append(module.register_forward_hook(hook))
    try:
        return run_layer(layer, batches)
    finally:
        for handle in handles:
            handle.remove()


def _input_hook(name: str, observe: Callable[[str, torch.Tensor], None]) -> Callable:
    def hook(_module: Any, args: tuple, _output: torch.Tensor) -> None:
        observe(name, args[0])

    return hook


class RunningStats:
    """Per-channel absmax / absmean / max / min / mean of every linear's input (LMDeploy's inputs_stats)."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, torch.Tensor]] = {name: {} for name in STAT_NAMES}
        self.counts: dict[str, int] = {}

    def observer(self, prefix: str) -> Callable[[str, torch.Tensor], None]:
        return lambda name, x: self.update(f"{prefix}.{name}", x)

    def update(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        count = self.counts.get(name, 0)
        new = {"absmax": x.abs().amax(0), "max": x.amax(0), "min": x.amin(0)}
        sums = {"absmean": x.abs().sum(0), "mean": x.sum(0)}
        if count == 0:
            self.stats["absmax"][name], self.stats["max"][name], self.stats["min"][name] = (
                new["absmax"],
                new["max"],
                new["min"],
            )
            self.stats["absmean"][name], self.stats["mean"][name] = sums["absmean"], sums["mean"]
        else:
            self.stats["absmax"][name] = torch.maximum(self.stats["absmax"][name], new["absmax"])
            self.stats["max"][name] = torch.maximum(self.stats["max"][name], new["max"])
            self.stats["min"][name] = torch.minimum(self.stats["min"][name], new["min"])
            self.stats["absmean"][name] += sums["absmean"]
            self.stats["mean"][name] += sums["mean"]
        self.counts[name] = count + len(x)

    def finish(self) -> dict[str, dict[str, torch.Tensor]]:
        """Sums become means; returns {stat name: {module name: [in_features] tensor}}."""
        for name, count in self.counts.items():
            self.stats["absmean"][name] = self.stats["absmean"][name] / count
            self.stats["mean"][name] = self.stats["mean"][name] / count
        return {stat: {k: v.cpu() for k, v in values.items()} for stat, values in self.stats.items()}


def collect_stats(
    float_model: FloatModel, samples: torch.Tensor, batch_size: int, progress: Callable[[Any], Any] = iter
) -> dict[str, dict[str, torch.Tensor]]:
    """Activation statistics of every decoder linear's input, layer by layer."""
    running = RunningStats()
    batches = first_layer_inputs(float_model.model, samples, batch_size)
    layers = decoder_layers(float_model.model)
    for index in progress(range(len(layers))):
        batches = record_linear_inputs(layers[index], batches, running.observer(f"model.layers.{index}"))
    return running.finish()


def save_stats(path: Path, stats: dict[str, Any], settings: CalibrationSettings) -> None:
    """Write stats atomically (temp file, then rename) with the settings they came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({**stats, "settings": asdict(settings)}, temporary)
    os.replace(temporary, path)


def load_stats(path: Path, settings: CalibrationSettings | None = None) -> dict[str, Any] | None:
    """Stats saved by save_stats, or None when absent or computed with other settings."""
    if not path.is_file():
        return None
    stats = torch.load(path, map_location="cpu", weights_only=True)
    if settings is not None and stats.get("settings") != asdict(settings):
        return None
    return stats
