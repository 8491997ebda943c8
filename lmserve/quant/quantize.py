"""`lite` entry points: auto_awq (W4A16), smooth_quant (W8A8) and calibrate, layer by layer.

What `--search-scale` means: off, the AWQ scales use LMDeploy's fixed ratio 0.5 from the activations'
per-channel absmax, as LMDeploy does; on, the ratio is searched on a grid per group of linears against the
block's output (AutoAWQ). Either way each weight group's clip range is then searched (AutoAWQ), the weights
are rounded on those grids with GPTQ's error feedback instead of to the nearest point (unlike LMDeploy), and
each layer calibrates on the outputs of the already quantized layers before it.
The checkpoint is the same AutoAWQ GEMM layout either way. `rtn=True` (`--rtn`, ours) turns all of it
off: plain round-to-nearest, the baseline.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmserve.layers.quant_formats import awq_quantization_config, check_group_size, w8a8_quantization_config
from lmserve.models.config import ModelConfig
from lmserve.models.loader import load_model_config, resolve_model
from lmserve.quant import awq
from lmserve.quant.calibrate import (
    STATS_FILE,
    CalibrationSettings,
    FloatModel,
    LayerBatch,
    check_quantizable,
    collect_stats,
    decoder_layers,
    first_layer_inputs,
    load_float_model,
    load_stats,
    record_linear_inputs,
    run_layer,
    save_stats,
)
from lmserve.quant.checkpoint import save_config, save_tensors, save_tokenizer, staging_dir
from lmserve.quant.corpus import DEFAULT_DATASET, calibration_samples, load_text
from lmserve.quant.rtn import GroupQuantized, awq_tensors, check_w_bits, dequantize_groups, quantize_groups
from lmserve.quant.smooth_quant import int8_tensors, smooth_layer

DTYPES = ("auto", "float16", "bfloat16")
INPUT_OF = {  # which recorded input each linear reads
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.q_proj",
    "self_attn.v_proj": "self_attn.q_proj",
    "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.gate_proj",
    "mlp.down_proj": "mlp.down_proj",
}


@dataclass(frozen=True)
class CalibrationOptions:
    calib_dataset: str = DEFAULT_DATASET
    calib_samples: int = 128
    calib_seqlen: int = 2048
    batch_size: int = 1

    def __post_init__(self) -> None:
        for name in ("calib_samples", "calib_seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    def settings(self, model: str | None) -> CalibrationSettings:
        return CalibrationSettings(str(model), self.calib_dataset, self.calib_samples, self.calib_seqlen)


@dataclass(frozen=True)
class AWQOptions:
    w_bits: int = 4
    w_sym: bool = False
    w_group_size: int = 128
    search_scale: bool = False
    rtn: bool = False

    def spec(self) -> awq.QuantSpec:
        return awq.QuantSpec(self.w_bits, self.w_group_size, self.w_sym)


# ---------------------------------------------------------------- validation (before any work)


def _check_model(model: str | None) -> ModelConfig:
    config = load_model_config(resolve_model(model))
    check_quantizable(config.architecture)
    return config


def _linear_in_features(config: ModelConfig) -> dict[str, int]:
    """Input features of a decoder layer's linears."""
    return {
        "q/k/v/gate/up_proj": config.hidden_size,
        "o_proj": config.num_attention_heads * config.head_dim,
        "down_proj": config.intermediate_size,
    }


def _check_awq_shapes(config: ModelConfig, group_size: int) -> None:
    for name, size in _linear_in_features(config).items():
        check_group_size(size, group_size, name)


def warn_small_calibration(config: ModelConfig, calib: CalibrationOptions) -> bool:
    """Warn on stderr (and return True) when the calibration has fewer tokens than the widest linear input: that
    input's Hessian (X^T X of the error-feedback rounding) is then rank-deficient, and the result swings with the
    float summation order (SmolLM2 at 8 x 128 tokens: held-out ppl 18.27 on one CPU thread, 19.42 on two;
    benchmarks/RESULTS.md)."""
    tokens, widest = calib.calib_samples * calib.calib_seqlen, max(_linear_in_features(config).values())
    if tokens >= widest:
        return False
    print(
        f"lmserve: warning: {calib.calib_samples} x {calib.calib_seqlen} = {tokens} calibration tokens are fewer "
        f"than the widest layer input ({widest} features): its statistics are rank-deficient and the result "
        f"varies from run to run; give --calib-samples x --calib-seqlen >= {widest}",
        file=sys.stderr,
        flush=True,
    )
    return True


def _check_dataset(dataset: str) -> None:
    load_text(dataset, "calib")  # FileNotFoundError / ValueError now, not after loading the model


def _output_dtype(dtype: str, default: torch.dtype, config: ModelConfig) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"{dtype=} is not supported; allowed: {DTYPES}")
    if dtype != "auto":
        return getattr(torch, dtype)
    return (
        default if config.torch_dtype not in ("float16", "bfloat16") else getattr(torch, config.torch_dtype)
    )


# ---------------------------------------------------------------- auto_awq


def auto_awq(
    model: str | None,
    work_dir: str | Path = "./work_dir",
    calib: CalibrationOptions | None = None,
    options: AWQOptions | None = None,
    dtype: str = "auto",
    device: str = "cpu",
) -> Path:
    """Quantize to W4A16 and write an AutoAWQ GEMM checkpoint into work_dir; returns work_dir."""
    calib, options = calib or CalibrationOptions(), options or AWQOptions()
    check_w_bits(options.w_bits)
    config = _check_model(model)
    _check_awq_shapes(config, options.w_group_size)
    if not options.rtn:
        _check_dataset(calib.calib_dataset)
        warn_small_calibration(config, calib)
    # AutoAWQ and vLLM's AWQ kernels run in float16, so that is the default output.
    out_dtype = torch.float16 if dtype == "auto" else _output_dtype(dtype, torch.float16, config)
    float_model = load_float_model(model, device=device)
    spec, batches = options.spec(), None
    if not options.rtn:
        samples = calibration_samples(
            float_model.tokenizer, calib.calib_dataset, calib.calib_samples, calib.calib_seqlen
        )
        batches = first_layer_inputs(float_model.model, samples, calib.batch_size)
    tensors: dict[str, torch.Tensor] = {}
    layers = decoder_layers(float_model.model)
    for index in tqdm(range(len(layers)), desc="auto_awq", unit="layer"):
        layer, search = layers[index], None
        if batches is not None:
            layer_inputs = batches
            batches, search = awq_layer(layer, batches, spec, options.search_scale)
        quantized = quantize_layer(layer, spec, search)
        if search is not None:  # the next layer calibrates on what the quantized layers before it produce
            _load_dequantized(layer, quantized)
            batches = run_layer(layer, layer_inputs)
        tensors |= _awq_layer_tensors(layer, f"model.layers.{index}", quantized)
    tensors |= _unquantized_tensors(float_model.model, tensors, out_dtype)
    return _write(
        work_dir,
        float_model,
        tensors,
        awq_quantization_config(options.w_bits, options.w_group_size),
        out_dtype,
    )


@dataclass(frozen=True)
class LayerSearch:
    """What the search found for one layer, besides the scales already folded into its weights."""

    hessians: dict[str, torch.Tensor]
    """X^T X / n of each recorded (scaled) input, by input name (INPUT_OF's values)."""
    clip_max: dict[str, torch.Tensor]
    """Per linear (q/k excepted): each (output channel, group)'s range limit, [out, groups, 1]."""


def awq_layer(
    layer: Any, batches: list[LayerBatch], spec: awq.QuantSpec, search: bool
) -> tuple[list[LayerBatch], LayerSearch]:
    """Scale one layer's float weights in place (searched scales, or LMDeploy's fixed ratio 0.5 without
    search), then find its clip ranges and Hessians for the error-feedback rounding.

    Returns the next layer's inputs (of the float layer) and the search's findings.
    """
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in set(INPUT_OF.values())}

    def observe(name: str, x: torch.Tensor) -> None:
        if name in inputs:
            inputs[name].append(x)

    next_batches = record_linear_inputs(layer, batches, observe)
    for group in awq.llama_scale_groups(layer, [batch.kwargs for batch in batches]):
        if group.sharing is not None and not search:
            continue  # LMDeploy's fixed-ratio mode skips v -> o under grouped-query attention
        xs = inputs[group.input_name]
        scales = (
            awq.search_scales(group, layer, xs, spec)
            if search
            else _fixed_ratio_scales(layer, group, xs, spec)
        )
        linears = [layer.get_submodule(name) for name in group.linears]
        awq.apply_scales(group.prev_op, linears, scales, group.prev_op_scales(scales))
        inputs[group.input_name] = [x / scales.to(x.dtype) for x in xs]
    hessians = {name: awq.input_hessian(xs) for name, xs in inputs.items()}
    return next_batches, LayerSearch(hessians, _clip_ranges(layer, inputs, spec))


def quantize_layer(layer: Any, spec: awq.QuantSpec, search: LayerSearch | None) -> dict[str, GroupQuantized]:
    """Each linear's integers: error-feedback rounding within the searched ranges, or nearest without search."""
    quantized = {}
    for name, input_name in INPUT_OF.items():
        weight = layer.get_submodule(name).weight.detach()
        if search is None:
            quantized[name] = quantize_groups(weight, spec.w_bits, spec.group_size, spec.symmetric)
        else:
            hessian, clip_max = search.hessians[input_name], search.clip_max.get(name)
            quantized[name] = awq.gptq_round(weight, hessian, spec, clip_max)
    return quantized


def _fixed_ratio_scales(
    layer: Any, group: awq.ScaleGroup, xs: list[torch.Tensor], spec: awq.QuantSpec
) -> torch.Tensor:
    act_absmax = torch.stack([x.reshape(-1, x.shape[-1]).abs().amax(dim=0) for x in xs]).amax(dim=0)
    weight = torch.cat([layer.get_submodule(name).weight for name in group.linears])
    return awq.ratio_scales(act_absmax, awq.weight_channel_mean(weight, spec.group_size), 0.5)


def _clip_ranges(
    layer: Any, inputs: dict[str, list[torch.Tensor]], spec: awq.QuantSpec
) -> dict[str, torch.Tensor]:
    ranges = {}
    for name, input_name in INPUT_OF.items():
        if name.endswith(awq.SKIP_CLIP):
            continue
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[input_name]])
        ranges[name] = awq.search_clip(layer.get_submodule(name).weight, x, spec)
    return ranges


@torch.no_grad()
def _load_dequantized(layer: Any, quantized: dict[str, GroupQuantized]) -> None:
    for name, values in quantized.items():
        weight = layer.get_submodule(name).weight
        weight.copy_(dequantize_groups(values).to(weight.dtype))


def _awq_layer_tensors(
    layer: Any, prefix: str, quantized: dict[str, GroupQuantized]
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in INPUT_OF:
        linear = layer.get_submodule(name)
        tensors |= {f"{prefix}.{name}.{key}": value for key, value in awq_tensors(quantized[name]).items()}
        if linear.bias is not None:
            tensors[f"{prefix}.{name}.bias"] = linear.bias.detach().to(torch.float16)
    return tensors


def _unquantized_tensors(model: Any, done: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
    """Embedding, norms and lm_head (unless tied) in the output dtype; names of quantized linears skipped."""
    quantized = {name.rsplit(".", 1)[0] for name in done}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[0] in quantized or (tied and name == "lm_head.weight"):
            continue
        if name.endswith("inv_freq"):
            continue
        tensors[name] = tensor.detach().to(dtype).clone()
    return tensors


def _write(
    work_dir: str | Path,
    float_model: FloatModel,
    tensors: dict,
    quant_config: dict,
    dtype: torch.dtype,
    extra: dict | None = None,
) -> Path:
    work_dir = Path(work_dir)
    with staging_dir(work_dir) as staging:
        save_tensors(staging, tensors)
        save_config(staging, float_model.hf_config, quant_config, dtype)
        save_tokenizer(staging, float_model.source, float_model.tokenizer)
        for name, value in (extra or {}).items():
            torch.save(value, staging / name)
    return work_dir


# ---------------------------------------------------------------- smooth_quant and calibrate


def smooth_quant(
    model: str | None,
    work_dir: str | Path = "./work_dir",
    calib: CalibrationOptions | None = None,
    alpha: float = 0.5,
    dtype: str = "auto",
    device: str = "cpu",
) -> Path:
    """SmoothQuant W8A8 (int8, dynamic per-token activations) in the compressed-tensors layout."""
    calib = calib or CalibrationOptions()
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{alpha=} must lie in [0, 1]")
    config = _check_model(model)
    out_dtype = _output_dtype(dtype, torch.bfloat16, config)
    stats = load_stats(Path(work_dir) / STATS_FILE, calib.settings(model))
    if stats is None:
        _check_dataset(calib.calib_dataset)
    float_model = load_float_model(model, device=device)
    new_stats = stats is None
    if stats is None:
        stats = _collect(float_model, calib, model)
    tensors: dict[str, torch.Tensor] = {}
    layers = decoder_layers(float_model.model)
    for index in tqdm(range(len(layers)), desc="smooth_quant", unit="layer"):
        prefix = f"model.layers.{index}"
        smooth_layer(layers[index], prefix, stats["absmax"], alpha)
        tensors |= int8_tensors(layers[index], prefix)
    tensors |= _unquantized_tensors(float_model.model, tensors, out_dtype)
    quant_config = w8a8_quantization_config(ignore=["lm_head"])
    extra = {STATS_FILE: stats} if new_stats else None
    return _write(work_dir, float_model, tensors, quant_config, out_dtype, extra)


def calibrate(
    model: str | None,
    work_dir: str | Path = "./work_dir",
    calib: CalibrationOptions | None = None,
    device: str = "cpu",
) -> Path:
    """Activation statistics alone, saved as work_dir/inputs_stats.pth (reused by smooth_quant)."""
    calib = calib or CalibrationOptions()
    _check_model(model)
    _check_dataset(calib.calib_dataset)
    float_model = load_float_model(model, device=device)
    stats = _collect(float_model, calib, model)
    path = Path(work_dir) / STATS_FILE
    save_stats(path, {k: v for k, v in stats.items() if k != "settings"}, calib.settings(model))
    return path


def _collect(float_model: FloatModel, calib: CalibrationOptions, model: str | None) -> dict[str, Any]:
    samples = calibration_samples(
        float_model.tokenizer, calib.calib_dataset, calib.calib_samples, calib.calib_seqlen
    )
    stats: dict[str, Any] = collect_stats(
        float_model, samples, calib.batch_size, progress=lambda r: tqdm(r, desc="calibrate", unit="layer")
    )
    stats["settings"] = asdict(calib.settings(model))
    return stats
