"""ModelConfig: one normalized description of a decoder, whatever the checkpoint format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "InternLM2ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
    "InternLM3ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("sliding_attention", "full_attention")
_QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM")


@dataclass(frozen=True)
class MoEConfig:
    """A sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): router top-k over SwiGLU experts."""

    num_experts: int
    top_k: int
    """Experts per token (HF num_experts_per_tok)."""
    intermediate_size: int
    """Each expert's (Mixtral: intermediate_size; Qwen3-MoE: moe_intermediate_size)."""
    renormalize: bool
    """Top-k weights rescaled to sum to 1 (Mixtral: always; Qwen3-MoE: norm_topk_prob)."""
    sparse_step: int = 1
    """Every sparse_step-th layer is sparse (Qwen3-MoE decoder_sparse_step)."""
    dense_layers: tuple[int, ...] = ()
    """Layers with a dense MLP of the model's intermediate_size (Qwen3-MoE mlp_only_layers)."""

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.sparse_step < 1:
            raise ValueError(f"decoder_sparse_step={self.sparse_step} must be >= 1")

    def is_sparse_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers and (layer + 1) % self.sparse_step == 0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, read from config.json or GGUF metadata."""

    architecture: str
    """HF `architectures[0]`, e.g. LlamaForCausalLM, Qwen2ForCausalLM, InternLM2ForCausalLM."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """HF rope_scaling dict normalized to carry `rope_type` (llama3, linear, dynamic), or None."""
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """q/k/v projections have biases (Qwen2: True; Llama: config.attention_bias; InternLM2: config.bias)."""
    o_proj_bias: bool = False
    """The output projection has a bias (Llama: attention_bias; InternLM2: bias; Qwen2: never)."""
    mlp_bias: bool = False
    hidden_act: str = "silu"
    torch_dtype: str = "float32"
    """The checkpoint's dtype name (bfloat16, float16, float32)."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    quantization_config: dict[str, Any] | None = None
    """HF quantization_config (quant_method awq / compressed-tensors ...), or None."""
    sliding_window: int | None = None
    """Attention window of the windowed layers (HF: key j is seen by query i when j > i - window), or None."""
    layer_types: tuple[str, ...] | None = None
    """Per layer "sliding_attention" or "full_attention"; None: every layer uses sliding_window (Mistral)."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before rotary (Qwen3, Qwen3-MoE, Gemma 3)."""
    rope_local_theta: float | None = None
    """Rotary base of the sliding layers when it differs from rope_theta (Gemma 3: rope_local_base_freq)."""
    query_pre_attn_scalar: float | None = None
    """Attention scale is query_pre_attn_scalar ** -0.5 when set (Gemma), else head_dim ** -0.5."""
    final_logit_softcapping: float | None = None
    """logits = cap * tanh(logits / cap) when set (Gemma)."""
    moe: MoEConfig | None = None
    """The sparse MLP of MoE models (their MoE layers); None for dense models."""

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else str(self.rope_scaling["rope_type"])

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_sliding_window(self, layer: int) -> int | None:
        """The attention window of one layer, or None for full attention."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def has_sliding_window(self) -> bool:
        return any(self.layer_sliding_window(i) is not None for i in range(self.num_hidden_layers))

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> ModelConfig:
        """Map an HF config.json dict (Llama, Mistral, Qwen2, InternLM2) onto a ModelConfig."""
        architecture = _architecture(d)
        hidden_size = int(_require(d, "hidden_size"))
        num_heads = int(_require(d, "num_attention_heads"))
        rope_theta, rope_scaling = _rope(d)
        hidden_act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
        if hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hidden_act={hidden_act!r} is not supported; supported: {SUPPORTED_ACTIVATIONS}"
            )
        num_layers = int(_require(d, "num_hidden_layers"))
        sliding_window = _sliding_window(architecture, d)
        fields = _gemma3_fields(d) if architecture == "Gemma3ForCausalLM" else {}
        rope_theta = fields.pop("rope_theta", rope_theta)
        return cls(
            **fields,
            architecture=architecture,
            vocab_size=int(_require(d, "vocab_size")),
            hidden_size=hidden_size,
            intermediate_size=int(_require(d, "intermediate_size")),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            hidden_act=hidden_act,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_eos_ids(d.get("eos_token_id")),
            quantization_config=d.get("quantization_config"),
            sliding_window=sliding_window,
            layer_types=_layer_types(d, num_layers) if sliding_window else None,
            qk_norm=architecture in _QK_NORM_ARCHITECTURES,
            moe=_moe_config(architecture, d),
            **_biases(architecture, d),
        )


def _architecture(d: dict[str, Any]) -> str:
    names = d.get("architectures") or []
    if not names:
        raise ValueError(
            f"architectures={names!r}: config.json names no architecture; supported: {SUPPORTED_ARCHITECTURES}"
        )
    if names[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture {names[0]!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}")
    return str(names[0])


def _require(d: dict[str, Any], key: str) -> Any:
    if d.get(key) is None:
        raise ValueError(f"config.json lacks required field {key!r}")
    return d[key]


def _rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Read rope theta and scaling from the old (rope_theta + rope_scaling) or new (rope_parameters) form."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if "full_attention" in params:  # per layer type (Gemma 3): the global layers' rope is the model's
        params = dict(params["full_attention"])
    theta = float(params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _sliding_window(architecture: str, d: dict[str, Any]) -> int | None:
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM") and not d.get(
        "use_sliding_window", False
    ):
        return None
    window = d.get("sliding_window")
    return int(window) if window else None


def _layer_types(d: dict[str, Any], num_layers: int) -> tuple[str, ...] | None:
    """Which layers slide: `layer_types`, else Gemma's `sliding_window_pattern` (every n-th layer global),
    else Qwen's `max_window_layers` (layers from there on slide), else None (all of them: Mistral)."""
    types = d.get("layer_types")
    if types is None and d.get("sliding_window_pattern"):
        pattern = int(d["sliding_window_pattern"])
        types = [LAYER_TYPES[(i + 1) % pattern == 0] for i in range(num_layers)]
    elif types is None and d.get("max_window_layers") is not None:
        types = [LAYER_TYPES[i < int(d["max_window_layers"])] for i in range(num_layers)]
    if types is None:
        return None
    if len(types) != num_layers or set(types) - set(LAYER_TYPES):
        raise ValueError(f"layer_types={types!r}: need {num_layers} entries, each one of {LAYER_TYPES}")
    return tuple(types)


def _gemma3_fields(d: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's own fields: the local layers' rotary base, the attention scalar and the soft-caps."""
    for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if d.get(key):
            raise ValueError(
                f"{key}={d[key]!r} is not supported for Gemma3ForCausalLM; supported: null/false"
            )
    params = d.get("rope_parameters") or {}
    local = dict(params.get("sliding_attention") or {})
    if local.get("rope_type", "default") != "default":
        raise ValueError(
            f"rope_parameters.sliding_attention={local!r}: only rope_type 'default' is supported"
        )
    fields: dict[str, Any] = {
        "rope_local_theta": float(local.get("rope_theta") or d.get("rope_local_base_freq") or 10000.0),
        "query_pre_attn_scalar": float(d.get("query_pre_attn_scalar") or 256),
        "final_logit_softcapping": d.get("final_logit_softcapping"),
    }
    if "rope_parameters" not in d and "rope_theta" not in d:
        fields["rope_theta"] = 1_000_000.0  # Gemma3TextConfig's global default
    return fields


def _moe_config(architecture: str, d: dict[str, Any]) -> MoEConfig | None:
    if (
        architecture in ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
        and d.get("hidden_act", "silu") != "silu"
    ):
        raise ValueError(
            f"hidden_act={d['hidden_act']!r} is not supported for {architecture}'s experts; supported: silu"
        )
    if architecture == "MixtralForCausalLM":
        return MoEConfig(
            num_experts=int(_require(d, "num_local_experts")),
            top_k=int(_require(d, "num_experts_per_tok")),
            intermediate_size=int(_require(d, "intermediate_size")),
            renormalize=True,
        )
    if architecture == "Qwen3MoeForCausalLM":
        num_experts = int(d.get("num_experts") or d.get("num_local_experts") or 0)
        if num_experts == 0:  # HF's Qwen3-MoE turns every layer dense then
            raise ValueError("num_experts=0: a Qwen3MoeForCausalLM without experts is not supported")
        return MoEConfig(
            num_experts=num_experts,
            top_k=int(_require(d, "num_experts_per_tok")),
            intermediate_size=int(_require(d, "moe_intermediate_size")),
            renormalize=bool(d.get("norm_topk_prob", False)),  # Qwen3MoeConfig's default
            sparse_step=int(d.get("decoder_sparse_step") or 1),
            dense_layers=tuple(int(i) for i in d.get("mlp_only_layers") or ()),
        )
    return None


def _biases(architecture: str, d: dict[str, Any]) -> dict[str, Any]:
    if architecture == "Qwen2ForCausalLM":
        return {"attention_bias": True, "o_proj_bias": False, "mlp_bias": False}
    if architecture == "InternLM2ForCausalLM":
        bias = bool(d.get("bias", True))  # InternLM2Config defaults bias=True
        return {"attention_bias": bias, "o_proj_bias": bias, "mlp_bias": False}
    if architecture == "InternLM3ForCausalLM":  # remote code: qkv_bias on q/k/v, bias on o_proj and the MLP
        qkv_bias = bool(d.get("qkv_bias", d.get("attention_bias", False)))
        bias = bool(d.get("bias", d.get("mlp_bias", False)))
        return {"attention_bias": qkv_bias, "o_proj_bias": bias, "mlp_bias": bias}
    bias = bool(d.get("attention_bias", False))
    return {"attention_bias": bias, "o_proj_bias": bias, "mlp_bias": bool(d.get("mlp_bias", False))}
