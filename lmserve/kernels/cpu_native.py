"""CPU kernels in C (kernels/cpu/*.c, built by kernels/cpu_build.py) called through ctypes: few-row 4-bit
GEMV, the lm_head's int8 GEMV, add + RMSNorm, rotary + KV store, decode attention, silu(gate) * up.

torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) is compute-bound at decode shapes (SmolLM2: ~22 G
weights/s, hardly faster on 2 threads than on 1), so a one-stream decode step spent ~5 ms in it against the
~2 ms its 4-bit weights take to stream. The C kernel turns 64 nibbles into bf16 words with three vector ops
and multiplies them with AVX512-BF16's dot product (see the C file), keeps llama.cpp's Q4_1 values exactly
(scales and minimums in float16, as Q4_1 stores them: torch's kernel took them rounded to bf16) and splits
the rows over torch's own OpenMP threads.

A decode step of a small model is otherwise mostly small ops (~1,060 torch dispatches for SmolLM2, 1-8 us
each), so the float32 residual add + RMSNorm (~8 dispatches in torch) is one call here, and so are rotary +
KV store, the decode attention over the paged cache (torch's SDPA took ~50 us a layer for one query of 9
heads, most of it overhead), silu * up and the lm_head (float32 logits). Each wrapper below is written for
~200 calls a step: every torch op in it costs 1-4 us, as much as the kernel.

Used only where it can run (cpu_build.py: x86-64 with AVX512-BF16, a C compiler); anywhere else, with
LMSERVE_CPU_NATIVE=0, or if compiling fails (logged once), every caller keeps its torch path.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import threading
from typing import Any

import torch

from lmserve.kernels import cpu_build
from lmserve.kernels.cpu_build import NATIVE_ENV

__all__ = ["NATIVE_ENV", "kernel_available"]

logger = logging.getLogger(__name__)

GROUP_SIZE = 32
CHUNK = 64
"""Inputs per packed chunk: two groups, 32 bytes (the kernel's K must be a multiple of it)."""
ROW_BLOCK = 4
MAX_IN_FEATURES = 16384
MAX_ROWS = 4
"""Rows of x the GEMV kernels take (the linears' INT4_MAX_ROWS); 5 to GEMM_MAX_ROWS rows go to the 4-bit GEMM,
more to oneDNN's bf16 GEMM."""
LAYOUT = "q4-native-2"
"""Names pack_q4's and pack_q4_panels' layouts in the weight cache's key: change it with either."""


_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "lmserve_q4_gemv": (_I, [_P] * 5 + [_I] * 3),
    "lmserve_add_rms_norm": (None, [_P, _P, _I, _P, _P, _P, _I, _I, _F]),
    "lmserve_decode_attention": (_I, [_P, _I] + [_P] * 4 + [_I] * 7 + [_F, _I]),
    "lmserve_rotary_store": (None, [_P] + [_I] * 5 + [_P] * 4 + [_I] * 2),
    "lmserve_silu_and_mul": (None, [_P, _I, _P, _I, _I]),
    "lmserve_int8_gemv": (_I, [_P] * 4 + [_I] * 3),
    "lmserve_q4_gemm": (_I, [_P] * 5 + [_I] * 3),
    "lmserve_exact_q4": (_I, [_P, ctypes.c_long, _P, _P, _P]),
    "lmserve_decode_step": (_I, [_P, _I, _P] + [_P] * 4 + [_I] + [_P] * 4 + [_I, _P]),
}
"""The C functions' (return type, argument types): ctypes converts the Python ints and floats by these."""


def _load() -> ctypes.CDLL | None:
    try:
        path = cpu_build.build()
        if path is None:
            return None
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("the CPU kernels did not build (%s): the CPU keeps torch's kernels", error)
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(library, name)
        function.restype, function.argtypes = restype, argtypes
    return library


_built: list[ctypes.CDLL | None] = []
_building = threading.Lock()


def _library() -> ctypes.CDLL | None:
    """The loaded library (built on the first call; later calls, any thread, wait for that one), or None."""
    if _built:
        return _built[0]
    with _building:
        if not _built:
            _built.append(_load())
    return _built[0]


def _forget_library() -> None:
    """Tests: build (or refuse) again on the next call, e.g. after changing LMSERVE_CPU_NATIVE."""
    with _building:
        _built.clear()


def _loaded() -> ctypes.CDLL:
    """The library, for a caller that checked it can run (kernel_available or a *_supported check)."""
    library = _library()
    assert library is not None, "the CPU C kernels are not loaded (check kernel_available() first)"
    return library


def kernel_available() -> bool:
    """Whether the C kernels are built and loaded (building them on the first call)."""
    return _library() is not None


def shape_supported(out_features: int, in_features: int) -> bool:
    return in_features % CHUNK == 0 and out_features % ROW_BLOCK == 0 and in_features <= MAX_IN_FEATURES


def exact_q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """layers/linear.py's exact_int4 in one C pass, for a contiguous float32 weight [N, K] (K % 32 == 0): the same
    (codes uint8 [N, K], scale, low float32 [N, K / 32]), or None when it is not 4-bit exact."""
    library = _loaded()
    num_out, num_in = weight.shape
    codes = torch.empty(num_out, num_in, dtype=torch.uint8)
    scale = torch.empty(num_out, num_in // GROUP_SIZE, dtype=torch.float32)
    low = torch.empty_like(scale)
    exact = library.lmserve_exact_q4(
        weight.data_ptr(), weight.numel() // GROUP_SIZE, codes.data_ptr(), scale.data_ptr(), low.data_ptr()
    )
    return (codes, scale, low) if exact else None


def pack_q4(
    codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [N, K] (0..15), scale and low [N, K / 32] (w = scale * code + low) -> the kernel's (qs, d, m).

    qs [N / 4, 2 K] uint8: per block of 4 rows, per 64 inputs, the 4 rows' 32 bytes in turn, byte i holding
    input i (low nibble) and input 32 + i (high nibble). d and m [N, K / 32] in float16, as Q4_1 stores them
    (torch's int4 kernel takes them in the activations' dtype: bf16 keeps 3 bits fewer).
    """
    num_out, num_in = codes.shape
    halves = codes.to(torch.uint8).reshape(num_out, num_in // CHUNK, 2, CHUNK // 2)
    rows = halves[:, :, 0] | (halves[:, :, 1] << 4)  # [N, chunk, 32]
    qs = rows.reshape(num_out // ROW_BLOCK, ROW_BLOCK, num_in // CHUNK, CHUNK // 2).transpose(1, 2)
    groups = num_in // GROUP_SIZE
    d = scale.reshape(num_out, groups).to(torch.float16)
    m = low.reshape(num_out, groups).to(torch.float16)
    return qs.reshape(num_out // ROW_BLOCK, 2 * num_in).contiguous(), d.contiguous(), m.contiguous()


def q4_linear(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 (1 <= M <= MAX_ROWS) @ the packed 4-bit weight^T (pack_q4's layout) -> [M, N] bf16."""
    library = _loaded()
    if not x.is_contiguous():
        x = x.contiguous()
    num_rows, num_in = x.shape
    num_out = d.shape[0]
    out = torch.empty(num_rows, num_out, dtype=torch.bfloat16)
    status = library.lmserve_q4_gemv(
        x.data_ptr(), qs.data_ptr(), d.data_ptr(), m.data_ptr(), out.data_ptr(), num_rows, num_out, num_in
    )
    if status:
        raise ValueError(
            f"q4_linear: unsupported shapes x {tuple(x.shape)}, weight {tuple(qs.shape)} (packed)"
        )
    return out


PANEL = 16
GEMM_MAX_ROWS = 16
"""Rows the 4-bit GEMM (q4_gemm.c) takes; more rows (prefill) go to oneDNN's bf16 GEMM."""


def panels_supported(out_features: int, in_features: int) -> bool:
    return in_features % GROUP_SIZE == 0 and out_features % PANEL == 0 and in_features <= MAX_IN_FEATURES


def pack_q4_panels(
    codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [N, K] (0..15), scale and low [N, K / 32] -> q4_gemm.c's (qs, d, m): per panel of 16 outputs, per 4
    inputs k .. k + 3, 32 bytes, byte 2 j + e = q[n_j, k + e] | q[n_j, k + 2 + e] << 4; d and m [N / 16, K / 32,
    16] float16."""
    num_out, num_in = codes.shape
    quads = codes.to(torch.uint8).reshape(num_out // PANEL, PANEL, num_in // 4, 4)
    pairs = quads[..., :2] | (quads[..., 2:] << 4)  # [panel, j, quad, e]
    qs = pairs.permute(0, 2, 1, 3).reshape(num_out // PANEL, num_in * PANEL // 2)
    groups = num_in // GROUP_SIZE

    def by_panel(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(num_out // PANEL, PANEL, groups).transpose(1, 2).to(torch.float16).contiguous()

    return qs.contiguous(), by_panel(scale), by_panel(low)


def q4_gemm(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 (1 <= M <= GEMM_MAX_ROWS) @ the 4-bit weight^T in pack_q4_panels' layout -> [M, N] bf16."""
    library = _loaded()
    if not x.is_contiguous():
        x = x.contiguous()
    num_rows, num_in = x.shape
    num_out = d.shape[0] * PANEL
    out = torch.empty(num_rows, num_out, dtype=torch.bfloat16)
    status = library.lmserve_q4_gemm(
        x.data_ptr(), qs.data_ptr(), d.data_ptr(), m.data_ptr(), out.data_ptr(), num_rows, num_out, num_in
    )
    if status:
        raise ValueError(f"q4_gemm: unsupported shapes x {tuple(x.shape)}, weight {tuple(qs.shape)} (packed)")
    return out


def dequantize_q4(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """pack_q4's inverse: the float32 weight [N, K]."""
    num_out, groups = d.shape
    num_in = groups * GROUP_SIZE
    blocks = qs.reshape(num_out // ROW_BLOCK, num_in // CHUNK, ROW_BLOCK, 1, CHUNK // 2).transpose(1, 2)
    codes = torch.cat([blocks & 15, blocks >> 4], dim=3).reshape(num_out, groups, GROUP_SIZE)
    weight = codes.float() * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)
    return weight.reshape(num_out, num_in)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16 rms_norm(residual + x) * weight, the float32 sum) for x bf16 [T, H], residual [T, H] float32
    (updated in place) or bf16, weight float32 [H]: F.rms_norm's float32 numbers, rounded once.

    Written for a decode step's ~60 calls: each torch op here costs 1-4 us, as much as the kernel.
    """
    library = _loaded()
    if not x.is_contiguous():
        x = x.contiguous()
    if residual.dtype != torch.float32 or not residual.is_contiguous():
        source = residual.contiguous() if residual.dtype == torch.bfloat16 else residual.float().contiguous()
        residual = torch.empty(x.shape, dtype=torch.float32)
    else:
        source = residual
    out = torch.empty_like(x)
    num_rows, hidden = x.shape
    library.lmserve_add_rms_norm(
        x.data_ptr(),
        source.data_ptr(),
        source.dtype == torch.float32,
        residual.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        num_rows,
        hidden,
        eps,
    )
    return out, residual


def decode_attention_supported(q: torch.Tensor, layer_cache: torch.Tensor) -> bool:
    """Whether decode_attention takes these: bf16 queries [B, Hq, D] and heads-first cache, D % 32 == 0, <= 256."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = layer_cache.shape[1]
    return (
        q.dtype == torch.bfloat16
        and layer_cache.dtype == torch.bfloat16
        and head_dim % 32 == 0
        and head_dim <= 256
        and num_heads % num_kv_heads == 0
        and num_heads // num_kv_heads <= 16
        and layer_cache.is_contiguous()
        and kernel_available()
    )


def decode_attention(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D], over the cache [2, Hkv, blocks, block_size, D] through the first B
    rows of block_tables [>= B, n] and seq_lens [>= B] (int32; keys 0 .. len - 1, the last sliding_window of
    them) -> [B, Hq, D] bf16."""
    library = _loaded()
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:  # rows may be strided (q of the fused qkv output)
        q = q.contiguous()
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    if not seq_lens.is_contiguous():
        seq_lens = seq_lens.contiguous()
    num_seqs, num_heads, head_dim = q.shape
    _, num_kv_heads, num_blocks, block_size, _ = layer_cache.shape
    out = torch.empty((num_seqs, num_heads, head_dim), dtype=q.dtype)
    status = library.lmserve_decode_attention(
        q.data_ptr(),
        q.stride(0),
        layer_cache.data_ptr(),
        block_tables.data_ptr(),
        seq_lens.data_ptr(),
        out.data_ptr(),
        num_seqs,
        num_heads,
        num_kv_heads,
        head_dim,
        num_blocks,
        block_size,
        block_tables.stride(0),
        scale,
        sliding_window or 0,
    )
    if status == -2:
        raise MemoryError("decode_attention: no memory for the scratch buffer")
    if status:
        raise ValueError(
            f"decode_attention: unsupported shapes q {tuple(q.shape)}, cache {tuple(layer_cache.shape)}"
        )
    return out


def rotary_store_supported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_cache: torch.Tensor
) -> bool:
    """Whether rotary_store takes these dtypes and sizes: bf16 q, k, v [T, H, D] and heads-first cache,
    D % 32 == 0. The caller checks the layout: k's heads right after q's, v's after k's, in each row of one
    fused qkv output (attention/torch_backend.py: heads_follow)."""
    return (
        q.dtype == k.dtype == v.dtype == layer_cache.dtype == torch.bfloat16
        and q.shape[-1] % 32 == 0
        and layer_cache.is_contiguous()
        and kernel_available()
    )


def rotary_store(
    q: torch.Tensor,
    k: torch.Tensor,
    layer_cache: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotate q and k (views into the fused qkv rows, v right after k) in place by cos/sin [T, 1 or none, D]
    (RotaryEmbedding's layout) and store k and v at their slots (-1: not stored). Checked by
    rotary_store_supported and the caller's layout check; HF's roundings, bit for bit."""
    library = _loaded()
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, num_blocks, block_size, _ = layer_cache.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    if slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous():
        slot_mapping = slot_mapping.long().contiguous()
    library.lmserve_rotary_store(
        q.data_ptr(),
        num_tokens,
        q.stride(0) if num_tokens > 1 else 0,
        num_heads,
        num_kv_heads,
        head_dim,
        cos.data_ptr(),
        sin.data_ptr(),
        layer_cache.data_ptr(),
        slot_mapping.data_ptr(),
        num_blocks,
        block_size,
    )


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for bf16 gate_up [T, 2 I] (I % 16 == 0, rows contiguous), torch's roundings; None when
    the C kernels cannot take it (the caller computes it in torch)."""
    num_tokens, width = gate_up.shape
    if gate_up.dtype != torch.bfloat16 or width % 32 or gate_up.stride(1) != 1 or not kernel_available():
        return None
    library = _loaded()
    out = torch.empty((num_tokens, width // 2), dtype=torch.bfloat16)
    library.lmserve_silu_and_mul(
        gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), num_tokens, width // 2
    )
    return out


def int8_logits(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """float32 logits x [M, K] bf16 @ (int8 codes [N, K] * bf16 scales [N])^T for 1..MAX_ROWS rows; None when the
    C kernels cannot take them (the caller runs torch's int8 kernel, whose logits are rounded to bf16)."""
    num_rows, num_in = x.shape
    if (
        x.dtype != torch.bfloat16
        or not 1 <= num_rows <= MAX_ROWS
        or num_in % 16
        or num_in > MAX_IN_FEATURES
        or codes.shape[0] % ROW_BLOCK
        or scales.dtype != torch.bfloat16
        or not kernel_available()
    ):
        return None
    library = _loaded()
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty((num_rows, codes.shape[0]), dtype=torch.float32)
    library.lmserve_int8_gemv(
        x.data_ptr(), codes.data_ptr(), scales.data_ptr(), out.data_ptr(), num_rows, codes.shape[0], num_in
    )
    return out


class Q4Weight(ctypes.Structure):
    """decode_step.c's lmserve_q4_weight: pack_q4's (qs, d, m) and pack_q4_panels' (or NULLs)."""

    _fields_ = [("qs", _P), ("d", _P), ("m", _P), ("panel_qs", _P), ("panel_d", _P), ("panel_m", _P)]


class DecodeLayer(ctypes.Structure):
    """decode_step.c's lmserve_layer: one decoder layer's 4-bit linears, float32 norm weights, KV cache."""

    _fields_ = [
        ("qkv", Q4Weight),
        ("o", Q4Weight),
        ("gate_up", Q4Weight),
        ("down", Q4Weight),
        ("input_norm", _P),
        ("post_norm", _P),
        ("cache", _P),
        ("window", _I),
    ]


class ModelShape(ctypes.Structure):
    """decode_step.c's lmserve_model_shape."""

    _fields_ = [
        ("hidden", _I),
        ("heads", _I),
        ("kv_heads", _I),
        ("head_dim", _I),
        ("intermediate", _I),
        ("num_blocks", _I),
        ("block_size", _I),
        ("eps", _F),
        ("scale", _F),
    ]


def q4_weight(
    packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    panels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> Q4Weight:
    pointers = [t.data_ptr() for t in packed] + ([t.data_ptr() for t in panels] if panels else [None] * 3)
    return Q4Weight(*pointers)


def decode_step(
    layers: ctypes.Array[DecodeLayer],
    shape: ModelShape,
    normed0: torch.Tensor,
    hidden0: torch.Tensor,
    final_norm: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> torch.Tensor:
    """Every decoder layer and the final norm of a decode step in one call (kernels/cpu/decode_step.c), B <=
    GEMM_MAX_ROWS (> MAX_ROWS: every linear needs its panels): normed0 and hidden0 [B, H] bf16 contiguous (layer
    0's input norm, the embeddings), cos/sin [B, D] bf16 contiguous, slots [B] int64, block_tables [>= B, n]
    int32 (rows contiguous), seq_lens [>= B] int32 -> [B, H] bf16. The caller (models/cpu_decode.py) checks what
    the kernels need."""
    library = _loaded()
    out = torch.empty_like(hidden0)
    status = library.lmserve_decode_step(
        ctypes.addressof(layers),
        len(layers),
        ctypes.addressof(shape),
        normed0.data_ptr(),
        hidden0.data_ptr(),
        final_norm.data_ptr(),
        out.data_ptr(),
        hidden0.shape[0],
        cos.data_ptr(),
        sin.data_ptr(),
        slots.data_ptr(),
        block_tables.data_ptr(),
        block_tables.stride(0),
        seq_lens.data_ptr(),
    )
    if status == -2:
        raise MemoryError("decode_step: no memory for the step's buffers")
    if status:
        raise ValueError("decode_step: unsupported shapes")
    return out
