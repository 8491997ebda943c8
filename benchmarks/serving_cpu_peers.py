"""16 streams over HTTP on the CPU box: lmserve vs llama.cpp's native llama-server and llama-cpp-python's server.

Same GGUF (the embedded SmolLM2-135M Q4_1), same load generator (`lmserve bench serving`: 128 in / 128 out,
greedy, ignore_eos), one run. llama-server gets 4 continuous-batching slots and 2 threads (`-np 4 -t 2`, issue 18);
build it with `benchmarks/build_llama_server.sh`. Each figure starts once the 1-minute load average is below 0.4;
the load average before and after it and the cores other work took meanwhile (the machine's busy time less the
benchmark's own processes', steal included) are recorded, and a ratio is refused when the loads before differ by
more than MAX_LOAD_CHANGE or other work took more than MAX_OTHER_CORES (cpu_peers.ratio).

    PYTHONPATH=. python benchmarks/serving_cpu_peers.py --llama-server PATH [--peer-python PY] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from cpu_peers import MAX_LOAD_CHANGE, MAX_OTHER_CORES, ratio, with_load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def gguf_path() -> str:
    from lmserve.models.source import resolve_model

    return str(resolve_model(None).gguf_path)


def wait_up(url: str, process: subprocess.Popen[bytes], seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


def settle(max_load: float = 0.4, seconds: float = 180) -> None:
    """Wait (up to `seconds`) for the 1-minute load average to fall below max_load: each figure starts quiet."""
    deadline = time.monotonic() + seconds
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        time.sleep(2)


def serve_and_bench(command: list[str], port: int, args: argparse.Namespace, name: str) -> dict[str, float]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(f"http://127.0.0.1:{port}/v1/models", process)
        settle()
        out = Path(args.out_dir) / f"{name}_c{args.concurrency}.json"

        def bench() -> dict[str, float]:
            subprocess.run(
                [sys.executable, "-m", "lmserve", "bench", "serving", "--base-url", f"http://127.0.0.1:{port}",
                 "--concurrency", str(args.concurrency), "--num-prompts", str(args.num_prompts),
                 "--input-len", "128", "--output-len", "128", "--json", str(out)],
                check=True, cwd=ROOT,
            )  # fmt: skip
            report = json.loads(out.read_text())
            return {
                "output_tok_s": report["output_tok_per_s"],
                "tpot_ms_median": 1000 * report["tpot_s"]["p50"],
            }

        return with_load(bench, roots=lambda: [process.pid])
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", required=True, help="llama.cpp's llama-server binary")
    parser.add_argument(
        "--peer-python", default=None, help="a Python with llama-cpp-python[server] (optional row)"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--out-dir", default="benchmarks/out")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    gguf = gguf_path()
    results: dict[str, object] = {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    lmserve = [
        sys.executable,
        "-m",
        "lmserve",
        "serve",
        "api_server",
        "--server-port",
        "23390",
        "--log-level",
        "ERROR",
    ]
    results["lmserve"] = serve_and_bench(lmserve, 23390, args, "lmserve")
    native = [args.llama_server, "-m", gguf, "--port", "23391", "-np", "4", "-t", "2", "-c", "4096", "-cb"]
    results["llama_server"] = serve_and_bench(native, 23391, args, "llama_server")
    if args.peer_python:
        peer = [args.peer_python, "-m", "llama_cpp.server", "--model", gguf, "--port", "23392", "--n_threads", "2",
                "--n_ctx", "4096"]  # fmt: skip
        try:
            results["llama_cpp_python_server"] = serve_and_bench(peer, 23392, args, "llama_cpp_python")
        except RuntimeError as error:  # an optional row: say why it is missing, keep the others
            print(f"llama-cpp-python server row skipped: {error}")
    value = ratio(results, "lmserve", "llama_server", key="output_tok_s")
    results["lmserve_vs_llama_server"] = value
    for name in ("lmserve", "llama_server", "llama_cpp_python_server"):
        if name in results:
            r = results[name]
            assert isinstance(r, dict)
            print(f"{name:<26} {r['output_tok_s']:8.1f} output tok/s  TPOT p50 {r['tpot_ms_median']:.1f} ms  "
                  f"(load {r['load_before']:.2f} -> {r['load_after']:.2f}, other work {r['other_cores']:.2f} cores)")  # fmt: skip
    if value is None:
        print(
            f"lmserve / llama-server: refused, the loads before differ by more than {MAX_LOAD_CHANGE} or other "
            f"work took more than {MAX_OTHER_CORES} cores"
        )
    else:
        print(f"lmserve / llama-server: {value:.2f}x (goal >= 2.5x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
