"""HTTP vs offline on one GPU, in one call: is the api_server as fast as the engine it serves?

Makes a Llama-3-8B-shaped checkpoint with random bf16 weights (vocab 49152, so SmolLM2's tokenizer fits),
runs `lmserve bench throughput` on it twice (the second run is the one reported: Triton and cuBLAS warmed),
then for each engine-core mode serves it with `lmserve serve api_server` and loads it with
`lmserve bench serving` at 256, 32 and 1 concurrent streams (512-token prompts, 256 output tokens).

Usage (on the GPU machine, from the repo root):
    PYTHONPATH=. python benchmarks/serving_gpu.py --tokenizer DIR --out OUT_DIR [--modes process thread]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

LMSERVE = [sys.executable, "-m", "lmserve.cli.main"]
SHAPE = Path(__file__).parent / "configs" / "llama3-8b.json"
JOB = {"input_len": 512, "output_len": 256}
LOADS = ("256:256", "32:64", "1:4")
"""concurrency:requests of each load."""


def make_checkpoint(tokenizer: Path, folder: Path) -> None:
    """save_pretrained of a random 8B-shaped Llama (bf16, built on the GPU), with the tokenizer files."""
    if (folder / "config.json").is_file():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = json.loads(SHAPE.read_text())
    shape.update(vocab_size=49152, bos_token_id=1, eos_token_id=2)
    config = LlamaConfig(**{k: v for k, v in shape.items() if k not in ("architectures", "model_type")})
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    for file in tokenizer.iterdir():
        shutil.copy(file, folder / file.name)


def offline(folder: Path, out: Path) -> dict[str, float]:
    """`lmserve bench throughput` twice in one process is not a CLI feature: run it twice, keep the second."""
    args = ["bench", "throughput", str(folder), "--num-prompts", "256", "--concurrency", "256"]
    args += [
        "--input-len",
        str(JOB["input_len"]),
        "--output-len",
        str(JOB["output_len"]),
        "--max-batch-size",
        "256",
    ]
    for attempt in (1, 2):
        run([*LMSERVE, *args, "--json", str(out / f"offline_{attempt}.json")])
    return json.loads((out / "offline_2.json").read_text())


def serve(folder: Path, mode: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    args = ["serve", "api_server", str(folder), "--engine-core", mode, "--max-batch-size", "256"]
    args += ["--server-port", str(port), "--log-level", "ERROR"]
    process = subprocess.Popen([*LMSERVE, *args], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log}")
        time.sleep(1)
    raise RuntimeError("server did not start")


def load(port: int, concurrency: int, num: int, path: Path) -> dict[str, float]:
    args = ["bench", "serving", "--base-url", f"http://127.0.0.1:{port}", "--concurrency", str(concurrency)]
    args += [
        "--num-prompts",
        str(num),
        "--input-len",
        str(JOB["input_len"]),
        "--output-len",
        str(JOB["output_len"]),
    ]
    run([*LMSERVE, *args, "--warmup", "2", "--json", str(path)])
    return json.loads(path.read_text())


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "TQDM_DISABLE": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json etc.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/llama3-8b-shape-random"))
    parser.add_argument("--modes", nargs="+", default=["process", "thread"], choices=["process", "thread"])
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--loads", nargs="+", default=list(LOADS), help="concurrency:requests pairs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    make_checkpoint(args.tokenizer, args.checkpoint)
    report: dict[str, object] = {"job": JOB}
    if not args.skip_offline:
        report["offline"] = offline(args.checkpoint, args.out)
    for mode in args.modes:
        server = serve(args.checkpoint, mode, 23333, args.out / f"server_{mode}.log")
        try:
            pairs = [tuple(int(x) for x in pair.split(":")) for pair in args.loads]
            report[mode] = {f"c{c}": load(23333, c, n, args.out / f"http_{mode}_c{c}.json") for c, n in pairs}
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
    (args.out / "serving_gpu.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
