"""Builds what an engine runs on: device and dtype choice, the model with its weights, the sized KV cache."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from lmserve.attention.backend import AttentionBackend, get_attention_backend
from lmserve.config import EngineConfig
from lmserve.distributed.parallel_state import check_collective_dtype, min_over_ranks, tp_size
from lmserve.distributed.sharding import check_expert_split, check_tp, num_local_kv_heads
from lmserve.engine.cpu_memory import default_cpu_num_blocks
from lmserve.layers.quant import prepare_for_inference
from lmserve.models.config import ModelConfig
from lmserve.models.registry import build_model

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_MAX_BATCH_SIZE = 16
CUDA_MAX_BATCH_SIZE = 128
CUDA_CACHE_FRACTION = 0.8


@dataclass(frozen=True)
class ResolvedConfig:
    """EngineConfig with every `auto`/None resolved for this model and machine."""

    device: torch.device
    dtype: torch.dtype
    session_len: int
    max_batch_size: int
    quant_policy: int | str = 0
    """KV cache quantization: 0 off, 8 int8, 4 int4, fp8 (EngineConfig.quant_policy)."""
    lm_head_fp8: bool = False
    """EngineConfig.lm_head_fp8: the model's lm_head quantized to e4m3 once its weights are in."""


def resolve_device(name: str, gpus_needed: int = 1, index: int = 0) -> torch.device:
    """cpu, or cuda:index (one GPU per tp rank); ValueError when --tp asks for more GPUs than there are."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        if gpus_needed > 1:
            raise ValueError(f"--tp {gpus_needed} needs {gpus_needed} GPUs but no CUDA GPU is available")
        raise ValueError("device='cuda' but no CUDA GPU is available; use --device cpu")
    if name == "cpu":
        return torch.device("cpu")
    if gpus_needed > torch.cuda.device_count():
        raise ValueError(
            f"--tp {gpus_needed} needs {gpus_needed} GPUs but {torch.cuda.device_count()} are visible"
        )
    return torch.device("cuda", index) if gpus_needed > 1 or index else torch.device(name)


def check_tp_shape(tp: int, model_config: ModelConfig) -> None:
    """ValueError naming --tp when the model's heads or features do not split over tp ranks."""
    if tp == 1:
        return
    check_tp(tp, model_config.num_attention_heads, model_config.num_key_value_heads)
    moe = model_config.moe
    dense = moe is None or any(not moe.is_sparse_layer(i) for i in range(model_config.num_hidden_layers))
    if dense and model_config.intermediate_size % tp:
        raise ValueError(f"--tp {tp} must divide intermediate_size={model_config.intermediate_size}")
    if moe is not None:
        check_expert_split(tp, moe.intermediate_size)


def resolve_dtype(name: str, device: torch.device, model_config: ModelConfig) -> torch.dtype:
    """`auto`: the checkpoint's 16-bit dtype on CUDA (bfloat16 for float32 checkpoints); bfloat16 on CPU.

    bfloat16 on CPU halves the bytes read per decoded token, and these CPUs compute it
    natively (AVX512-BF16); tests that compare with HF transformers ask for float32.
    """
    if name != "auto":
        dtype = DTYPES[name]
        if device.type == "cpu" and dtype == torch.float16:
            logger.warning("float16 on CPU is slow; bfloat16 is usually the better choice")
        return dtype
    if device.type == "cuda":
        return torch.float16 if model_config.torch_dtype == "float16" else torch.bfloat16
    return torch.bfloat16


def resolve_config(config: EngineConfig, model_config: ModelConfig, device_index: int = 0) -> ResolvedConfig:
    """`device_index`: the GPU of the resolving tp rank (mp workers: cuda:rank; Ray actors see only theirs)."""
    # the mp executor puts every rank on this node; under Ray each node checks its own GPUs
    gpus_needed = config.tp if config.distributed_executor_backend == "mp" else device_index + 1
    device = resolve_device(config.device, gpus_needed, device_index)
    check_tp_shape(config.tp, model_config)
    session_len = config.session_len or model_config.max_position_embeddings
    default_batch = CUDA_MAX_BATCH_SIZE if device.type == "cuda" else CPU_MAX_BATCH_SIZE
    dtype = resolve_dtype(config.dtype, device, model_config)
    check_collective_dtype(device, dtype, config.tp)
    return ResolvedConfig(
        device=device,
        dtype=dtype,
        session_len=session_len,
        max_batch_size=config.max_batch_size or default_batch,
        quant_policy=config.quant_policy,
        lm_head_fp8=config.lm_head_fp8,
    )


def attention_backend(resolved: ResolvedConfig) -> AttentionBackend:
    """The engine's one backend: the model holds it (`model.attention_backend`); the KV cache and the runner
    take it from there."""
    return get_attention_backend(resolved.device, resolved.quant_policy)


def load_model(source: Any, model_config: ModelConfig, resolved: ResolvedConfig) -> Any:
    """Construct the model on its device and stream the checkpoint's weights into it."""
    from lmserve.models.loader import iter_weights
    from lmserve.models.weight_cache import weight_cache_for

    model: Any = build_model(model_config, attention_backend(resolved), resolved.dtype, resolved.device)
    cache = weight_cache_for(source, model_config, resolved.dtype, resolved.device)
    if cache is not None and cache.load_into(model):
        return finish_lm_head(model, resolved).eval()
    weight_slice = model.weight_slice if tp_size() > 1 else None  # each rank reads only its shard
    weights = tqdm(
        iter_weights(source, model_config, weight_slice),
        desc="Loading weights",
        unit=" tensors",
        leave=False,
        disable=None,
    )
    with one_cpu_thread(resolved.device):
        model.load_weights(weights)
        prepare_for_inference(model)
    if cache is not None:
        cache.save(model)
    return finish_lm_head(model, resolved).eval()


def finish_lm_head(model: Any, resolved: ResolvedConfig) -> Any:
    """The model with its lm_head in e4m3 where --lm-head-fp8 asks (after the weight cache, which keeps the
    checkpoint's weights)."""
    if resolved.lm_head_fp8:
        model.quantize_lm_head_fp8()
    return model


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Convert CPU weights (dequantize, repack to int4/int8) on one torch thread, then restore the count.

    The conversion is a few hundred short elementwise passes; torch's thread pool spins between them and
    loses badly to any other busy process: a first `serve api_server` start of the embedded model (the
    front end loads the tokenizer and the web app meanwhile) answered after 18.5 s with one thread vs 38 s
    with two at load average 6 on 2 cores, using 9 vs 20 s of CPU.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def random_model(model_config: ModelConfig, resolved: ResolvedConfig, seed: int = 0) -> Any:
    """The model with N(0, 0.02) weights and unit norms: real shapes and speed, no checkpoint needed."""
    model = build_model(model_config, attention_backend(resolved), resolved.dtype, resolved.device)
    generator = torch.Generator(resolved.device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif param.is_floating_point():
                param.normal_(0.0, 0.02, generator=generator)
            else:  # packed or int8 quantized weights: any bit pattern is a valid weight
                info = torch.iinfo(param.dtype)
                param.random_(info.min, info.max, generator=generator)
    prepare_for_inference(model)
    return finish_lm_head(model, resolved).eval()


def random_quantization_config(model_format: str) -> dict[str, Any] | None:
    """quantization_config for a random model of `--model-format awq|w8a8|fp8` (None otherwise)."""
    if model_format == "awq":
        from lmserve.layers.quant_formats import awq_quantization_config

        return awq_quantization_config(4, 128)
    if model_format == "w8a8":
        from lmserve.layers.quant_formats import w8a8_quantization_config

        return w8a8_quantization_config(["lm_head"])
    if model_format == "fp8":
        from lmserve.layers.fp8 import QUANTIZE_AT_LOAD

        return dict(QUANTIZE_AT_LOAD)
    return None


def kv_bytes_per_token(model_config: ModelConfig, dtype: torch.dtype, quant_policy: int | str = 0) -> float:
    """Cache bytes one token takes over all layers (K and V) on one tp rank; quantized caches count their
    scales and zeros."""
    from lmserve.attention.kv_quant import kv_bytes_per_element

    element_size = kv_bytes_per_element(quant_policy, model_config.head_dim, dtype)
    return (
        2
        * model_config.num_hidden_layers
        * num_local_kv_heads(model_config.num_key_value_heads, tp_size())
        * model_config.head_dim
        * element_size
    )


def num_kv_blocks(config: EngineConfig, resolved: ResolvedConfig, model_config: ModelConfig) -> int:
    """How many KV blocks to allocate (see EngineConfig.cache_max_entry_count): under tp every rank
    allocates the same number, the fewest any rank's free memory holds."""
    return min_over_ranks(_num_kv_blocks_here(config, resolved, model_config))


def _num_kv_blocks_here(config: EngineConfig, resolved: ResolvedConfig, model_config: ModelConfig) -> int:
    block_size = config.cache_block_seq_len
    fraction = config.cache_max_entry_count
    if resolved.device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(resolved.device)
        cache_bytes = free_bytes * (
            fraction if fraction is not None and fraction <= 1 else CUDA_CACHE_FRACTION
        )
        if fraction is not None and fraction > 1:
            return -(-int(fraction) // block_size)
        bytes_per_block = kv_bytes_per_token(model_config, resolved.dtype, resolved.quant_policy) * block_size
        return int(cache_bytes // bytes_per_block)
    full = resolved.max_batch_size * -(-resolved.session_len // block_size)
    if fraction is None:
        bytes_per_block = kv_bytes_per_token(model_config, resolved.dtype, resolved.quant_policy) * block_size
        return default_cpu_num_blocks(
            resolved.max_batch_size, resolved.session_len, block_size, bytes_per_block
        )
    if fraction > 1:
        return -(-int(fraction) // block_size)
    return max(1, int(full * fraction))


def allocate_kv_cache(
    backend: AttentionBackend,
    num_blocks: int,
    block_size: int,
    model_config: ModelConfig,
    resolved: ResolvedConfig,
) -> list[Any]:
    return list(
        backend.allocate_kv_cache(
            model_config.num_hidden_layers,
            num_blocks,
            block_size,
            num_local_kv_heads(model_config.num_key_value_heads, tp_size()),
            model_config.head_dim,
            resolved.dtype,
            resolved.device,
        )
    )
