"""One-stream CPU decode, before vs after a change, interleaved in one process.

This VM drifts by ±20 % over minutes, so two processes run minutes apart compare little. Here one engine (the
embedded SmolLM2 Q4_1 GGUF, bf16, 2 threads) alternates between the current code ("after") and a previous
implementation swapped back in ("before"). `--compare`:
- `step` (default): all decoder layers of a decode step in one C call (models/cpu_decode.py) vs the same C
  kernels called op by op from the layers (as before 2026-12-04);
- `native`: (op by op, as `q4`) the C kernels (kernels/cpu_native.py: 4-bit linears, add + RMSNorm, decode attention)
  vs torch's (int4 kernel with the same Q4_1 values, F.rms_norm, SDPA), as before 2026-12-03 evening;
- `q4`: only the 4-bit linears, C kernel vs torch's int4 kernel (op by op: the one-call step off for both);
- `afternoon`: the 2026-12-03 afternoon changes vs commit f4c0664: the half-width rotary tables and the
  out-of-place rotate-half rotary, two `index_copy_` calls per KV store, and the block gather for a lone sequence.
Per round each variant decodes one request (128-token prompt, --output-len tokens, EOS ignored); printed: the
median decode step per round, the median over rounds of after/before, the rounds after won, prefill (first
step) times, and whether both produced the same tokens.

    PYTHONPATH=. python benchmarks/cpu_one_stream_ab.py --rounds 16 --output-len 64 [--compare afternoon]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

import lmserve.models.llama as llama_module
from lmserve.attention.torch_backend import CPUAttentionBackend, TorchAttentionBackend
from lmserve.bench.offline import fixed_length_config, random_prompts
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.kernels import cpu_native
from lmserve.kernels.cpu_native import dequantize_q4
from lmserve.layers.linear import Linear, pack_int4_if_exact


def rotate_qk_before(qk: torch.Tensor, num_q_heads: int, rope: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """f4c0664: cos/sin [T, 1, D / 2], rotate-half with a cat, a new tensor."""
    half = qk.shape[-1] // 2
    x1, x2 = qk[..., :half], qk[..., half:]
    rotated = torch.cat((x1 * rope.cos - x2 * rope.sin, x2 * rope.cos + x1 * rope.sin), dim=-1)
    return rotated[:, :num_q_heads], rotated[:, num_q_heads:]


def store_before(
    self: Any, layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    flat = layer_cache.view(2, layer_cache.shape[1], -1, layer_cache.shape[-1])
    flat[0].index_copy_(1, slots, k.transpose(0, 1).to(layer_cache.dtype))
    flat[1].index_copy_(1, slots, v.transpose(0, 1).to(layer_cache.dtype))


class AfternoonVariants:
    """Swaps the model between the current code and the previous pieces (class and module attributes)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.rotary = engine.runner.model.model.rotary
        self.tables_after = (self.rotary.cos_cache, self.rotary.sin_cache)
        half = self.tables_after[0].shape[-1] // 2
        # the old tables: cos of the first half, sin = -(the stored first half)
        self.tables_before = (
            self.tables_after[0][:, :half].contiguous(),
            (-self.tables_after[1][:, :half]).contiguous(),
        )
        self.after = (llama_module.rotate_qk, CPUAttentionBackend.store, CPUAttentionBackend.decode_kv)
        self.before = (rotate_qk_before, store_before, TorchAttentionBackend.decode_kv)

    def use(self, name: str) -> None:
        tables, (rotate_qk, store, decode_kv) = (
            (self.tables_after, self.after) if name == "after" else (self.tables_before, self.before)
        )
        self.rotary.cos_cache, self.rotary.sin_cache = tables
        llama_module.rotate_qk = rotate_qk  # type: ignore[assignment]
        CPUAttentionBackend.store = store  # type: ignore[method-assign,assignment]
        CPUAttentionBackend.decode_kv = decode_kv  # type: ignore[method-assign]


class StepVariants:
    """The one-call C decode step (models/cpu_decode.py) on and off."""

    def __init__(self, engine: LLMEngine) -> None:
        self.decode_step_for = llama_module.decode_step_for

    def use(self, name: str) -> None:
        llama_module.decode_step_for = (  # type: ignore[assignment]
            self.decode_step_for if name == "after" else lambda *args: None
        )


class Q4Variants:
    """Swaps every 4-bit linear between the C kernel's layout and torch's int4 kernel's (the same values)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.linears = [
            m for m in engine.runner.model.modules() if isinstance(m, Linear) and m.q4 is not None
        ]
        if not self.linears:
            raise SystemExit(
                "no linear runs the C kernel here (kernels/cpu_native.py: kernel_available() is False)"
            )
        self.layouts = {
            id(m): (m.q4, pack_int4_if_exact(dequantize_q4(*m.q4), m.weight.dtype)) for m in self.linears
        }

    def use(self, name: str) -> None:
        # kernels compared op by op: the one-call step (which holds the C layouts' pointers) stays off for both
        llama_module.decode_step_for = lambda *args: None  # type: ignore[assignment]
        for module in self.linears:
            q4, int4 = self.layouts[id(module)]
            module.q4, module.int4 = (q4, None) if name == "after" else (None, int4)


class NativeVariants(Q4Variants):
    """Q4Variants, and the C add + RMSNorm and decode attention switched off for "before"."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__(engine)
        self.checks = (cpu_native.kernel_available, cpu_native.decode_attention_supported)

    def use(self, name: str) -> None:
        super().use(name)
        if name == "after":
            cpu_native.kernel_available, cpu_native.decode_attention_supported = self.checks  # type: ignore[assignment]
        else:
            cpu_native.kernel_available = lambda: False  # type: ignore[assignment]
            cpu_native.decode_attention_supported = lambda *args: False  # type: ignore[assignment]


def one_request(
    engine: LLMEngine, prompt: list[int], output_len: int
) -> tuple[float, list[float], list[int]]:
    """(prefill s, decode step s after the first two, tokens) of one greedy request."""
    engine.add_request(prompt, fixed_length_config(output_len))
    steps: list[float] = []
    tokens: list[int] = []
    while engine.has_unfinished():
        start = time.perf_counter()
        outputs = engine.step()
        steps.append(time.perf_counter() - start)
        tokens = outputs[-1].token_ids if outputs else tokens
    return steps[0], steps[2:], list(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare", choices=("step", "native", "q4", "afternoon"), default="step")
    args = parser.parse_args()
    config = EngineConfig(dtype="bfloat16", device="cpu", session_len=512, num_cpu_threads=args.threads)
    engine = LLMEngine.from_pretrained(None, config)
    prompt = random_prompts(1, 128, engine.model_config.vocab_size)[0]
    variants = {
        "step": StepVariants,
        "native": NativeVariants,
        "q4": Q4Variants,
        "afternoon": AfternoonVariants,
    }[args.compare](engine)
    steps: dict[str, list[float]] = {"before": [], "after": []}
    prefills: dict[str, list[float]] = {"before": [], "after": []}
    tokens: dict[str, list[int]] = {}
    for name in steps:  # warm-up
        variants.use(name)
        one_request(engine, prompt, 16)
    for round_index in range(args.rounds):
        for name in steps:
            variants.use(name)
            prefill, decode, tokens[name] = one_request(engine, prompt, args.output_len)
            steps[name].append(1000 * statistics.median(decode))
            prefills[name].append(1000 * prefill)
        print(f"round {round_index}: load {os.getloadavg()[0]:.2f}, step ms before {steps['before'][-1]:.2f} "
              f"after {steps['after'][-1]:.2f}", flush=True)  # fmt: skip
    ratios = [after / before for before, after in zip(steps["before"], steps["after"], strict=True)]
    print(
        f"median step ms: before {statistics.median(steps['before']):.2f}, after {statistics.median(steps['after']):.2f}"
    )
    print(f"after / before, median over rounds: {statistics.median(ratios):.3f} "
          f"(after faster in {sum(r < 1 for r in ratios)} of {len(ratios)} rounds)")  # fmt: skip
    print(f"prefill ms median: before {statistics.median(prefills['before']):.1f}, "
          f"after {statistics.median(prefills['after']):.1f}")  # fmt: skip
    print("same tokens:", tokens["before"] == tokens["after"])


if __name__ == "__main__":
    main()
