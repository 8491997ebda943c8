"""gpt-fast as a batch-1 decode peer: its own model.py (pytorch-labs/gpt-fast, fetched beside the tree, never copied
into lmserve), random weights of our Llama-3-8B shape, decode compiled as gpt-fast compiles it.

    PYTHONPATH=. python benchmarks/gptfast_peer.py --gptfast-dir PATH [--formats bf16 int4] [--json OUT] [--no-tuning]

PATH holds gpt-fast's model.py (e.g. `git -C <fetched repo> show HEAD:model.py > PATH/model.py`). What is
gpt-fast's here: the Transformer, its static KV cache and its forward; like its generate.py, decode runs
`torch.compile(mode="reduce-overhead", fullgraph=True)` with coordinate-descent tuning, under the math SDPA
backend, greedy, no host sync inside the timed loop. int4 is its `WeightOnlyInt4Linear` scheme written for
torch >= 2.5 (whose `_convert_weight_to_int4pack` takes packed uint8, not gpt-fast's int32): every nn.Linear,
the output head included as gpt-fast does, becomes torch's tinygemm `_weight_int4pack_mm`, group 128,
inner_k_tiles 8. Prompt 128 random tokens, then --tokens timed decode steps after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch._inductor.config
from torch import nn

CONFIG = dict(block_size=8192, n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336,
              vocab_size=128256, rope_base=500000)  # fmt: skip
"""benchmarks/configs/llama3-8b.json in gpt-fast's ModelArgs names (its "llama-3-8b" entry)."""
GROUP_SIZE, INNER_K_TILES = 128, 8


class Int4Linear(nn.Module):
    """gpt-fast's WeightOnlyInt4Linear forward (tinygemm), over random 4-bit weights and bf16 scales/zeros."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        q = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32, device="cuda")
        packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        self.register_buffer("weight", torch._convert_weight_to_int4pack(packed, INNER_K_TILES))
        scales = torch.rand(in_features // GROUP_SIZE, out_features, device="cuda") * 0.01 + 0.002
        zeros = (torch.rand_like(scales) - 0.5) * 0.1
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], -1).to(torch.bfloat16))
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch._weight_int4pack_mm(flat, self.weight, GROUP_SIZE, self.scales_and_zeros)
        return out.reshape(*x.shape[:-1], self.out_features)


def to_int4(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int4Linear(child.in_features, child.out_features))
        else:
            to_int4(child)


def build(model_module, fmt: str) -> nn.Module:
    with torch.device("cuda"):
        model = model_module.Transformer(model_module.ModelArgs(**CONFIG)).to(torch.bfloat16)
    if fmt == "int4":
        to_int4(model)
    torch.cuda.empty_cache()
    return model.eval()


def decode_rate(model: nn.Module, num_tokens: int, prompt_len: int = 128) -> dict[str, float]:
    """Greedy batch-1 decode tok/s after prefill and a compiled warm-up (the compile is not timed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.device("cuda"):  # as generate.py: the caches are built on the model's device
        model.setup_caches(max_batch_size=1, max_seq_length=prompt_len + 2 * num_tokens + 64)

    def decode_one(tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return model(tokens, input_pos)[:, -1].argmax(-1, keepdim=True).to(torch.int)

    compiled = torch.compile(decode_one, mode="reduce-overhead", fullgraph=True)
    prompt = torch.randint(1000, 100000, (1, prompt_len), device="cuda")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        token = model(prompt, torch.arange(prompt_len, device="cuda"))[:, -1].argmax(-1, keepdim=True).int()
        input_pos = torch.tensor([prompt_len], device="cuda")
        start = time.perf_counter()
        for _ in range(8):  # compile and capture
            token = compiled(token, input_pos).clone()
            input_pos += 1
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(num_tokens):
            token = compiled(token, input_pos).clone()
            input_pos += 1
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"tok_per_s": num_tokens / seconds, "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gptfast-dir", required=True, help="folder holding gpt-fast's model.py")
    parser.add_argument("--formats", nargs="+", default=["bf16", "int4"], choices=["bf16", "int4"])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--no-tuning",
        action="store_true",
        help="skip inductor's coordinate-descent tuning (a shorter compile; gpt-fast itself tunes)",
    )
    args = parser.parse_args()
    sys.path.insert(0, args.gptfast_dir)
    import model as gptfast_model  # gpt-fast's model.py

    torch._inductor.config.coordinate_descent_tuning = not args.no_tuning  # gpt-fast's generate.py sets it
    torch._inductor.config.triton.unique_kernel_names = True
    results: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    results["coordinate_descent_tuning"] = not args.no_tuning
    for fmt in args.formats:
        model = build(gptfast_model, fmt)
        results[f"gptfast_{fmt}_bs1"] = decode_rate(model, args.tokens)
        print(results, flush=True)
        if args.json:  # after each format: a later one may run out of time
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        del model
        torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
