"""Engine and server configuration: frozen dataclasses whose field names are the CLI flags' names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DType = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
QUANT_POLICIES: tuple[int | str, ...] = (0, 4, 8, "fp8")
"""KV cache formats: LMDeploy's 0 (the model's dtype), 8 (int8), 4 (int4); ours: fp8 (e4m3, vLLM's fp8)."""
MODEL_FORMATS = ("auto", "hf", "gguf", "awq", "w8a8", "fp8")
ROUTING_STRATEGIES = ("min_expected_latency", "random", "min_observed_latency")
EXECUTOR_BACKENDS = ("mp", "ray")
POOLING_TYPES = ("last", "mean", "cls")


@dataclass(frozen=True)
class EngineConfig:
    """LMDeploy's `backend_config`: how the engine runs a model.

    Every field is also a CLI flag (`max_batch_size` <-> `--max-batch-size`).
    """

    dtype: str = "auto"
    """Weight/activation dtype. `auto`: the checkpoint's dtype on CUDA, bfloat16 on CPU."""
    device: str = "auto"
    """`auto` picks cuda when available, else cpu."""
    tp: int = 1
    """Tensor-parallel degree: ranks (one GPU each on CUDA); it must divide num_attention_heads."""
    distributed_executor_backend: str = "mp"
    """How ranks 1..tp-1 run: `mp` processes on this node, `ray` actors in a placement group (any node)."""
    session_len: int | None = None
    """Longest sequence (prompt + output) a request may reach; default: the model's context."""
    max_batch_size: int | None = None
    """Most requests running at once; default 128 on CUDA, 16 on CPU."""
    cache_max_entry_count: float | None = None
    """KV cache size. On CUDA: fraction of free GPU memory after weights (0.8).
    On CPU, unset sizes the cache for max_batch_size full sessions; a value in (0, 1]
    is a fraction of that, a value > 1 is a number of tokens."""
    cache_block_seq_len: int = 64
    """Tokens per KV-cache block."""
    enable_prefix_caching: bool = False
    """Reuse KV blocks of identical prompt prefixes across requests."""
    max_prefill_token_num: int = 8192
    """Token budget of one engine step (decodes + prefill chunk); longer prompts are chunked."""
    quant_policy: int | str = 0
    """KV cache quantization: 0 off, 8 int8, 4 int4, `fp8` float8 e4m3 (one byte per element, no scales)."""
    model_format: str = "auto"
    """Checkpoint format: auto (detect), hf, gguf, awq, w8a8, fp8 (an FP8 checkpoint, or a float one quantized to
    FP8 W8A8 at load time)."""
    lm_head_fp8: bool = False
    """Quantize the lm_head (a tied model's embedding, as the lm_head reads it) to e4m3 with one scale per
    vocabulary row at load time, beside any --model-format: the largest matrix a decode step reads at half the
    bytes (1.05 -> 0.53 GB for Llama-3-8B). Logits come from the FP8 GEMV up to 16 rows and cuBLASLt's FP8 GEMM
    above; off CUDA from the widened weight (what `eval ppl --lm-head-fp8` measures). Off by default, as in vLLM
    and LMDeploy (llama.cpp's and gpt-fast's quantized models carry a quantized output head)."""
    eager_mode: bool = False
    """Disable CUDA graphs."""
    overlap_schedule: bool | None = None
    """Launch each step before the previous step's tokens are read back, and do the host work of that step
    (stop checks, text, scheduling) while the next one runs (SGLang's overlap scheduler, vLLM's async
    scheduling); tp 1 only. None: on for one CUDA GPU (faster on the H200, benchmarks/overlap_bench.py), off
    on the CPU and at tp > 1."""
    num_cpu_threads: int | None = None
    """torch intra-op threads on CPU (default: torch's choice)."""
    seed: int = 0
    """Seed of torch's global random stream, set when the engine is built: requests without a seed of their
    own draw from it, so the same seed and the same requests in the same order give the same tokens."""
    adapters: dict[str, str] | None = None
    """LoRA adapters to load beside the base model: name -> PEFT folder (LMDeploy's `--adapters NAME=PATH`);
    a request picks one by name (`model` on the server, GenerationConfig.adapter_name in Python)."""
    pooling: str = "last"
    """How /v1/embeddings pools the last hidden states: last token (decoder embedding models such as
    gte-Qwen2, e5-mistral), mean, or cls (the first token); the result is L2-normalized (vLLM's pooler)."""

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, f"dtype={self.dtype!r} must be one of {DTYPES}")
        _check(self.device in DEVICES, f"device={self.device!r} must be one of {DEVICES}")
        _check(self.tp >= 1, f"tp={self.tp} must be >= 1")
        _check(
            self.distributed_executor_backend in EXECUTOR_BACKENDS,
            f"distributed_executor_backend={self.distributed_executor_backend!r} must be one of {EXECUTOR_BACKENDS}",
        )
        _check(
            not (self.adapters and self.tp > 1),
            f"adapters with tp={self.tp}: LoRA runs with --tp 1 only (for now)",
        )
        _check(self.pooling in POOLING_TYPES, f"pooling={self.pooling!r} must be one of {POOLING_TYPES}")
        _check(
            self.session_len is None or self.session_len >= 2, f"session_len={self.session_len} must be >= 2"
        )
        _check(
            self.max_batch_size is None or self.max_batch_size >= 1,
            f"max_batch_size={self.max_batch_size} must be >= 1",
        )
        _check(
            self.cache_max_entry_count is None or self.cache_max_entry_count > 0,
            f"cache_max_entry_count={self.cache_max_entry_count} must be > 0",
        )
        _check(
            self.cache_block_seq_len >= 1 and self.cache_block_seq_len & (self.cache_block_seq_len - 1) == 0,
            f"cache_block_seq_len={self.cache_block_seq_len} must be a power of two",
        )
        _check(
            self.max_prefill_token_num >= 1,
            f"max_prefill_token_num={self.max_prefill_token_num} must be >= 1",
        )
        _check(
            self.quant_policy in QUANT_POLICIES,
            f"quant_policy={self.quant_policy!r} must be one of {QUANT_POLICIES}",
        )
        _check(
            self.model_format in MODEL_FORMATS,
            f"model_format={self.model_format!r} must be one of {MODEL_FORMATS}",
        )


@dataclass(frozen=True)
class ServeConfig:
    """`lmserve serve api_server` options that are not engine options."""

    model_name: str = "default"
    server_name: str = "0.0.0.0"
    server_port: int = 23333
    api_keys: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    allow_methods: tuple[str, ...] = ("*",)
    allow_headers: tuple[str, ...] = ("*",)
    log_level: str = "WARNING"
    max_log_len: int | None = None
    disable_fastapi_docs: bool = False
    max_concurrent_requests: int | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    webui: bool = True
    disable_metrics: bool = False
    proxy_url: str | None = None
    """A `serve proxy` to register with once listening (POST /nodes/add), and to leave on stop."""
    tool_call_parser: str | None = None
    """LMDeploy's --tool-call-parser (qwen, internlm, llama3); None: chosen from the chat template."""
    reasoning_parser: str | None = None
    """--reasoning-parser (deepseek-r1, qwen3); None: no reasoning split."""
    adapters: tuple[str, ...] = ()
    """Names of the engine's LoRA adapters (--adapters): more models /v1/models lists and `model` may name."""

    def __post_init__(self) -> None:
        _check(0 < self.server_port < 65536, f"server_port={self.server_port} must be in 1..65535")
        _check(
            self.model_name not in self.adapters,
            f"adapters: {self.model_name!r} is the served model's own name (--model-name); rename the adapter",
        )
        _check(
            self.proxy_url is None or self.proxy_url.startswith(("http://", "https://")),
            f"proxy_url={self.proxy_url!r} must start with http:// or https://",
        )


@dataclass(frozen=True)
class ProxyConfig:
    """`lmserve serve proxy` options: a router over api_server nodes (LMDeploy's defaults)."""

    server_name: str = "0.0.0.0"
    server_port: int = 8000
    routing_strategy: str = "min_expected_latency"
    """How a request picks among the live nodes serving its model (see serve/proxy/routing.py)."""
    api_keys: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    """Node URLs to start with; api_servers started with `--proxy-url` add themselves."""
    health_check_interval: float = 5.0
    """Seconds between GET /health probes of every node: a failing node stops getting requests, and gets
    them again once it answers 200."""
    log_level: str = "WARNING"
    max_body_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        _check(0 < self.server_port < 65536, f"server_port={self.server_port} must be in 1..65535")
        _check(
            self.routing_strategy in ROUTING_STRATEGIES,
            f"routing_strategy={self.routing_strategy!r} must be one of {ROUTING_STRATEGIES}",
        )
        _check(
            self.health_check_interval > 0,
            f"health_check_interval={self.health_check_interval} must be > 0",
        )
        for url in self.nodes:
            _check(
                url.startswith(("http://", "https://")), f"nodes: {url!r} must start with http:// or https://"
            )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
