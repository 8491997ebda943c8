"""Start-up time of the embedded model on this machine: where the seconds go, and command to first /v1/models answer.

Each measurement runs in a fresh Python process (imports count). With a private cache folder, the first start
converts the tokenizer and builds the weight cache (a fresh install); the second start reads both.

    python benchmarks/startup.py                               # first start, then second, in temporary caches
    python benchmarks/startup.py --cache-dir ~/.cache/lmserve  # a start over the user's own caches
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BREAKDOWN = r"""
import json, sys, time
marks = [("start", time.perf_counter())]
def mark(name): marks.append((name, time.perf_counter()))
import torch
from lmserve.config import EngineConfig
from lmserve.engine import builder
from lmserve.models.loader import load_model_config, resolve_model
from lmserve.models.tokenizer import deferred_tokenizer
from lmserve.models.weight_cache import weight_cache_for
mark("imports")
source = resolve_model(None)
model_config = load_model_config(source)
mark("parse")
config = EngineConfig()
resolved = builder.resolve_config(config, model_config)
cache = weight_cache_for(source, model_config, resolved.dtype, resolved.device)
cached = cache is not None and cache.path.is_file()
model = builder.load_model(source, model_config, resolved)
mark("weights (cache read)" if cached else "weights (convert + cache write)")
num_blocks = builder.num_kv_blocks(config, resolved, model_config)
builder.allocate_kv_cache(model.attention_backend, num_blocks, config.cache_block_seq_len, model_config, resolved)
mark(f"KV cache ({num_blocks} blocks)")
deferred_tokenizer(source)  # what a server's engine core does; its front end loads the tokenizer meanwhile
mark("EOS ids (tokenizer deferred)")
print(json.dumps([(name, end - begin) for (_, begin), (name, end) in zip(marks, marks[1:])]))
"""


def load_average() -> float:
    return os.getloadavg()[0]


def breakdown(env: dict[str, str]) -> list[tuple[str, float]]:
    """Seconds per phase of LLMEngine.from_pretrained's work, in the order the engine core does it."""
    done = subprocess.run(
        [sys.executable, "-c", BREAKDOWN], env=env, capture_output=True, text=True, check=True
    )
    return [tuple(item) for item in json.loads(done.stdout.strip().splitlines()[-1])]  # type: ignore[misc]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_up(env: dict[str, str], timeout: float) -> float:
    """Seconds from `lmserve serve api_server` to the first 200 from /v1/models."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "lmserve",
        "serve",
        "api_server",
        "--server-port",
        str(port),
        "--log-level",
        "ERROR",
    ]
    start = time.perf_counter()
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode} before answering")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"no answer from /v1/models within {timeout} s")
    finally:
        server.terminate()
        server.wait(30)


def measure(
    label: str, server_env: dict[str, str], breakdown_env: dict[str, str], timeout: float
) -> dict[str, Any]:
    """One server start and one breakdown, each from the same cache state (two folders when cold)."""
    load_before = load_average()
    up = server_up(server_env, timeout)
    phases = breakdown(breakdown_env)
    return {
        "start": label,
        "server_up_s": up,
        "phases": phases,
        "load_before": load_before,
        "load_after": load_average(),
    }


def print_start(result: dict[str, Any]) -> None:
    print(
        f"{result['start']} start: server answered /v1/models after {result['server_up_s']:.2f} s "
        f"(load average {result['load_before']:.2f} -> {result['load_after']:.2f})"
    )
    for name, seconds in result["phases"]:
        print(f"    {name:<34} {seconds:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cache-dir", help="measure warm starts over this LMSERVE_CACHE_DIR only (no cold start)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmserve-startup-") as scratch:
        server_env, breakdown_env = (_env(Path(scratch) / name) for name in ("server", "breakdown"))
        results = []
        if args.cache_dir:
            server_env = breakdown_env = _env(Path(args.cache_dir).expanduser())
        else:
            results.append(measure("first (empty caches)", server_env, breakdown_env, args.timeout))
        results.append(measure("second", server_env, server_env, args.timeout))
    print(f"{os.cpu_count()} CPUs")
    for result in results:
        print_start(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _env(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "LMSERVE_CACHE_DIR": str(cache_dir), "TQDM_DISABLE": "1"}


if __name__ == "__main__":
    main()
