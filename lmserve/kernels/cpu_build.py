"""Builds the CPU kernels' shared library (kernels/cpu/*.c) with the machine's C compiler; torch-free.

One library per source, compiler and flag set. scripts/install.sh builds it into the package
(`kernels/cpu/prebuilt/`, `python -m lmserve.kernels.cpu_build`), as a wheel would ship it; where that copy is
missing or stale (sources edited, another compiler) the first user compiles it into `$LMSERVE_CACHE_DIR/native`
(else ~/.cache/lmserve/native; 1-3 s of CPU on the 2-core box). kernels/cpu_native.py loads it with ctypes: no
torch headers, no runtime dependency. Only where it can run: x86-64 whose /proc/cpuinfo lists AVX512-BF16 and
the other subsets below, and a `cc` (or $CC); LMSERVE_CPU_NATIVE=0 turns it off.

The engine core calls `start_building()` before it imports torch, so on a first start without the installed
copy the compiler runs on the other core while the process imports and loads; the first user waits for it
(`build`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

NATIVE_ENV = "LMSERVE_CPU_NATIVE"
"""Set to 0 to keep every CPU path on torch's kernels."""
SOURCES = tuple(
    Path(__file__).with_name("cpu") / name
    for name in (
        "q4_gemv.c",
        "q4_gemm.c",
        "int8_gemv.c",
        "norm.c",
        "decode_attention.c",
        "activation.c",
        "decode_step.c",
        "exact_q4.c",
    )
)
PREBUILT_DIR = Path(__file__).with_name("cpu") / "prebuilt"
"""Where the installer's copy lives (git-ignored; see prebuild)."""
HEADERS = tuple(Path(__file__).with_name("cpu") / name for name in ("simd.h", "kernels.h"))
CPU_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16", "avx512_vbmi2")
COMPILE_FLAGS = (
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512dq",
    "-mavx512vl",
    "-mavx512bf16",
    "-mavx512vbmi2",
    "-mfma",
    "-fopenmp",  # the OpenMP runtime the process has: torch's libgomp (same soname), so torch's threads
    "-fPIC",
    "-shared",
)

_lock = threading.Lock()
_started: list[bool] = []


def native_enabled() -> bool:
    return os.environ.get(NATIVE_ENV, "1") != "0"


def cpu_supports_kernels() -> bool:
    """x86-64 Linux whose /proc/cpuinfo lists the AVX512 subsets the kernels use."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return all(flag in flags for flag in CPU_FLAGS)


def native_cache_dir() -> Path:
    root = os.environ.get("LMSERVE_CACHE_DIR") or Path.home() / ".cache" / "lmserve"
    return Path(root) / "native"


def build(into: Path | None = None) -> Path | None:
    """The library's path, compiling it first if this source/compiler/flags set has none yet (into `into`, else
    the cache, where the installed copy does not match); None where the kernels cannot run (another CPU, no
    compiler, turned off). OSError when compiling fails."""
    compiler = _compiler()
    if compiler is None:
        return None
    with _lock:
        return _compile(compiler, into)


def _compiler() -> str | None:
    """$CC, cc or gcc where the kernels can run here, else None."""
    if not native_enabled() or not cpu_supports_kernels():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler found: the CPU keeps torch's kernels")
    return compiler


def start_building(device: str | None = None) -> None:
    """build() in a background thread, once per process (errors are reported again by the first real user).
    Skipped for device "cuda", and for "auto" on a machine with an NVIDIA device node (it will run on CUDA)."""
    if _started or device == "cuda" or (device in (None, "auto") and os.path.exists("/dev/nvidiactl")):
        return
    _started.append(True)

    def run() -> None:
        try:
            build()
        except (OSError, subprocess.SubprocessError):
            pass

    threading.Thread(target=run, name="lmserve-cpu-kernels", daemon=True).start()


def _compile(compiler: str, into: Path | None) -> Path:
    """`into`'s copy, or without `into` the installed copy else the cached one; compiled into the last of those
    where none matches, atomically: concurrent starts each write their own temp file, then rename."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    sources = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    key = hashlib.sha256(sources + version.encode() + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
    paths = [
        folder / f"lmserve_cpu-{key}.so"
        for folder in ([into] if into else [PREBUILT_DIR, native_cache_dir()])
    ]
    found = next((path for path in paths if path.is_file()), None)
    if found is not None:
        return found
    path = paths[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as scratch:
        objects = _compile_objects(compiler, Path(scratch))
        temp_path = Path(scratch) / "lmserve_cpu.so"
        _run([compiler, *COMPILE_FLAGS, "-o", str(temp_path), *map(str, objects), "-lm"])
        os.replace(temp_path, path)
    return path


def prebuild() -> Path | None:
    """Build the library into the package (PREBUILT_DIR), dropping older builds there; None where the kernels
    cannot run here. What an installer calls, so that no start pays for the compile."""
    path = build(into=PREBUILT_DIR)
    if path is None:
        return None
    for old in PREBUILT_DIR.glob("lmserve_cpu-*.so"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def _compile_objects(compiler: str, scratch: Path) -> list[Path]:
    """One compiler process per source, all at once: a first start waits for the slowest file (~0.6 s), not
    the sum (~1.9 s serially on the 2-core box), while the process imports beside them."""
    flags = [flag for flag in COMPILE_FLAGS if flag != "-shared"]
    objects = [scratch / f"{source.stem}.o" for source in SOURCES]
    compiles = [
        subprocess.Popen(
            [compiler, *flags, "-c", str(source), "-o", str(target)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for source, target in zip(SOURCES, objects, strict=True)
    ]
    errors = [process.communicate(timeout=300)[1] for process in compiles]
    for process, error in zip(compiles, errors, strict=True):
        if process.returncode:
            raise OSError(error.decode(errors="replace").strip()[-500:])
    return objects


def _run(command: list[str]) -> None:
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=300)
    except subprocess.CalledProcessError as error:
        raise OSError(error.stderr.decode(errors="replace").strip()[-500:]) from error


def main() -> None:
    """`python -m lmserve.kernels.cpu_build`: build the installed copy (scripts/install.sh); never fails the
    install: without it the first start compiles."""
    try:
        path = prebuild()
    except (OSError, subprocess.SubprocessError) as error:
        print(f"lmserve: the CPU kernels were not built ({error}); the first start will try again")
        return
    print(
        f"lmserve: CPU kernels built: {path}"
        if path
        else "lmserve: no CPU kernels for this machine (torch's run)"
    )


if __name__ == "__main__":
    main()
