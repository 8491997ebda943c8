"""HTTP vs offline on one GPU, in one call: is the api_server as fast as the engine it serves?

Makes a Llama-3-8B-shaped checkpoint with random bf16 weights (vocab 49152, so SmolLM2's tokenizer fits),
runs the offline engine (`lmserve bench throughput`'s function) on 256 streams twice (the second run is
reported: Triton and cuBLAS warmed), the offline engine at 32 and 1 streams, then serves it with `lmserve serve api_server` (engine core in its
own process; one front end, then two) and loads it with `lmserve bench serving` at the same 256, 32 and
1 concurrent streams (512-token prompts, 256 output tokens; two front ends at 256 only).

Usage (on the GPU machine, from the repo root):
    PYTHONPATH=. python benchmarks/serving_gpu.py --tokenizer DIR --out OUT_DIR [--servers process:1 thread:1]
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


def offline(folder: Path, out: Path, loads: list[tuple[int, int]]) -> dict[str, dict[str, float]]:
    """The offline engine on the same job and loads, in a process of its own (it frees the GPU after)."""
    pairs = [f"{c}:{n}" for c, n in loads]
    run([sys.executable, __file__, "--offline-worker", str(folder), str(out), *pairs])
    return json.loads((out / "offline.json").read_text())


def offline_worker(folder: Path, out: Path, pairs: list[str]) -> None:
    """One engine, `lmserve bench throughput`'s function at 256 streams (twice: the second is reported) and
    at every other load, as `lmserve bench throughput --concurrency C` runs it."""
    from lmserve.bench.offline import throughput
    from lmserve.config import EngineConfig
    from lmserve.engine.engine import LLMEngine

    engine = LLMEngine.from_pretrained(str(folder), EngineConfig(max_batch_size=256))
    job = (JOB["input_len"], JOB["output_len"])
    throughput(engine, 256, *job, 256)  # warm-up: Triton and cuBLAS pick their kernels
    results = {}
    for pair in pairs:
        concurrency, num = (int(x) for x in pair.split(":"))
        results[f"c{concurrency}"] = throughput(engine, num, *job, concurrency).as_dict()
    (out / "offline.json").write_text(json.dumps(results, indent=2))


def serve(folder: Path, mode: str, count: int, port: int, log: Path) -> subprocess.Popen[bytes]:
    args = ["serve", "api_server", str(folder), "--engine-core", mode, "--max-batch-size", "256"]
    args += ["--api-server-count", str(count)]
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


def load(port: int, concurrency: int, num: int, path: Path, workers: int = 1) -> dict[str, float]:
    args = ["bench", "serving", "--base-url", f"http://127.0.0.1:{port}", "--concurrency", str(concurrency)]
    args += [
        "--num-prompts",
        str(num),
        "--input-len",
        str(JOB["input_len"]),
        "--output-len",
        str(JOB["output_len"]),
    ]
    run([*LMSERVE, *args, "--warmup", "2", "--num-workers", str(workers), "--json", str(path)])
    return json.loads(path.read_text())


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "TQDM_DISABLE": "1"})


def main() -> None:
    if sys.argv[1:2] == ["--offline-worker"]:
        offline_worker(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json etc.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/llama3-8b-shape-random"))
    parser.add_argument(
        "--servers", nargs="+", default=["process:1", "process:2"], help="engine-core:api-server-count"
    )
    parser.add_argument("--loads", nargs="+", default=list(LOADS), help="concurrency:requests pairs")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--client-workers", nargs="+", type=int, default=[1], help="load-generator processes")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    make_checkpoint(args.tokenizer, args.checkpoint)
    loads = [(int(c), int(n)) for c, n in (pair.split(":") for pair in args.loads)]
    report: dict[str, object] = {"job": JOB}
    if not args.skip_offline:
        report["offline"] = offline(args.checkpoint, args.out, loads)
    for server_spec in args.servers:
        mode, count = server_spec.split(":")
        name = f"{mode}x{count}"
        server = serve(args.checkpoint, mode, int(count), 23333, args.out / f"server_{name}.log")
        try:
            report[name] = {
                f"c{c}w{w}": load(23333, c, n, args.out / f"http_{name}_c{c}w{w}.json", w)
                for c, n in loads
                for w in args.client_workers
            }
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
        loads = loads[:1]  # more front ends matter at the highest load only
    (args.out / "serving_gpu.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
