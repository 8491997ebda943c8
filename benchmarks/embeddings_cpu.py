"""Embeddings throughput: lmserve's Pipeline.embed vs HF transformers, same model, same inputs, same run.

    python benchmarks/embeddings_cpu.py --batch-size 32 --num-tokens 128 --dtype float32

Inputs are random token ids of one length (no padding on either side); both pool the last token of the final
hidden state and L2-normalize. Prints inputs/s for each and the largest difference between their vectors.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch

from lmserve.config import EngineConfig
from lmserve.models.loader import resolve_model
from lmserve.pipeline import Pipeline

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timed(run: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """Best wall time of `repeats` runs after one warm-up, and the last result."""
    result = run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def hf_embed(model: torch.nn.Module, batch: list[list[int]]) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model(torch.tensor(batch)).last_hidden_state[:, -1].float()
    return torch.nn.functional.normalize(hidden, dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    source = resolve_model(args.model)
    budget = args.batch_size * args.num_tokens  # the whole batch in one prefill step, as HF's one forward
    pipe = Pipeline(args.model, EngineConfig(dtype=args.dtype, max_prefill_token_num=budget, pooling="last"))
    vocab = pipe.engine.model_config.vocab_size
    rng = random.Random(0)
    batch = [[rng.randrange(vocab) for _ in range(args.num_tokens)] for _ in range(args.batch_size)]

    from transformers import AutoModel

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    hf = AutoModel.from_pretrained(str(source.path), dtype=DTYPES[args.dtype], **kwargs).eval()

    ours_s, ours = timed(lambda: torch.tensor(pipe.embed(batch)), args.repeats)
    hf_s, theirs = timed(lambda: hf_embed(hf, batch), args.repeats)
    print(
        f"batch {args.batch_size} x {args.num_tokens} tokens, {args.dtype}, {torch.get_num_threads()} threads"
    )
    print(f"lmserve Pipeline.embed: {args.batch_size / ours_s:8.2f} inputs/s ({ours_s * 1000:.0f} ms)")
    print(f"HF transformers:        {args.batch_size / hf_s:8.2f} inputs/s ({hf_s * 1000:.0f} ms)")
    print(
        f"ratio {hf_s / ours_s:.2f}x; max |difference| of the vectors {(ours - theirs).abs().max().item():.2e}"
    )


if __name__ == "__main__":
    main()
