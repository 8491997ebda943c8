"""Quality of the CPU's one-row decode path: teacher-forced perplexity through one-token steps.

`lmserve eval ppl` scores windows as prefills, which on the CPU run the dense bf16 GEMM (more than 4 rows), so
it never measures the few-row 4-bit kernels a decode step uses. Here each held-out token is fed as its own
one-token step (the KV cache holding the window so far), exactly as decoding runs, and scored. Variants, one
engine each (the embedded SmolLM2 Q4_1 GGUF): float32 (dense float32 weights: the reference), bf16 on the C
kernels (kernels/cpu_native.py, the default where they build: 4-bit GEMV, float32 logits, norm, rotary,
attention), and bf16 on torch's kernels (LMSERVE_CPU_NATIVE=0: torch's int4 kernel with the same Q4_1 values,
bf16 logits, F.rms_norm, SDPA; as before 2026-12-03 evening). Printed: perplexity and the mean
|log p - log p_float32| of the target tokens.

    PYTHONPATH=. python benchmarks/cpu_decode_quality.py --tokens 2048 --window 256
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmserve.attention.metadata import SequenceChunk, build_step_batch
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.kernels import cpu_native
from lmserve.quant.corpus import evaluation_tokens


@torch.inference_mode()
def decode_logprobs(engine: LLMEngine, tokens: torch.Tensor, window: int) -> torch.Tensor:
    """log p(tokens[i] | window so far) for every token but each window's first, one-token steps."""
    runner = engine.runner
    ids = tokens.tolist()
    scores: list[torch.Tensor] = []
    for begin in tqdm(range(0, len(ids) - 1, window), desc="windows", leave=False):
        chunk = ids[begin : begin + window]
        table = list(range(-(-len(chunk) // runner.block_size)))
        for position in range(len(chunk) - 1):
            batch = build_step_batch(
                [SequenceChunk([chunk[position]], position, table)], runner.block_size, runner.device
            )
            logits = runner.model.compute_logits(runner.forward(batch)).float()
            scores.append(F.log_softmax(logits[-1], dim=-1)[chunk[position + 1]])
    return torch.stack(scores)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    reference: torch.Tensor | None = None
    for name in ("float32", "bf16, C kernels", "bf16, torch kernels"):
        if name == "bf16, torch kernels":
            os.environ[cpu_native.NATIVE_ENV] = "0"  # (its weight cache entry holds torch's 4-bit layout)
            cpu_native._forget_library()
        config = EngineConfig(
            dtype="float32" if name == "float32" else "bfloat16", device="cpu", session_len=args.window
        )
        engine = LLMEngine.from_pretrained(None, config)
        tokens = evaluation_tokens(engine.tokenizer, None, args.tokens)
        logprobs = decode_logprobs(engine, tokens, args.window)
        reference = logprobs if reference is None else reference
        results[name] = {
            "perplexity": math.exp(-float(logprobs.mean())),
            "mean_abs_logprob_diff_vs_float32": float((logprobs - reference).abs().mean()),
            "scored_tokens": len(logprobs),
        }
        print(name, results[name], f"load {os.getloadavg()[0]:.2f}", flush=True)
        del engine
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
