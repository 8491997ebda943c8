"""CUDA C kernels (lmserve/kernels/cuda/*.cu) compiled at run time by NVRTC and launched through the driver API.

No nvcc, no build step, no extension module: NVRTC (libnvrtc, which PyTorch's CUDA wheels bring) compiles a
source for the device's own architecture (sm_XY, so Hopper gets its own machine code), the cubin is cached in
`$LMSERVE_CACHE_DIR/cuda` (else ~/.cache/lmserve/cuda) keyed by the source, the architecture and NVRTC's
version, and libcuda's `cuModuleLoadData` / `cuLaunchKernel` run it on PyTorch's current stream, so launches are
captured by CUDA graphs like any other kernel. `LMSERVE_CUDA_JIT=0` turns these kernels off (callers fall back to
their Triton kernels); so does any failure to find NVRTC or to compile, reported once in the log.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ENV = "LMSERVE_CUDA_JIT"
SOURCE_DIR = Path(__file__).with_name("cuda")

_lock = threading.Lock()
_modules: dict[tuple[str, int], Any] = {}
_failed: dict[tuple[str, int], str] = {}
_functions: dict[tuple[str, int, str], ctypes.c_void_p] = {}
_libs: dict[str, ctypes.CDLL] = {}


class CudaJitError(RuntimeError):
    """NVRTC or the driver refused (no library, a compile error, a failed load or launch)."""


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("LMSERVE_CACHE_DIR") or Path.home() / ".cache" / "lmserve"
    return Path(root) / "cuda"


def _libcuda() -> ctypes.CDLL:
    if "cuda" not in _libs:
        _libs["cuda"] = ctypes.CDLL("libcuda.so.1")
    return _libs["cuda"]


def _nvrtc_candidates() -> list[str]:
    names = [f"libnvrtc.so.{major}" for major in (13, 12, 11)] + ["libnvrtc.so"]
    found = []
    for root in sys.path:  # PyTorch's CUDA wheels: site-packages/nvidia/{cu13,cuda_nvrtc}/lib/libnvrtc.so.*
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so*")), reverse=True)
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            found += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")), reverse=True)
    return names + [path for path in found if "builtins" not in path and "alt" not in path]


def _libnvrtc() -> ctypes.CDLL:
    if "nvrtc" not in _libs:
        errors = []
        for candidate in _nvrtc_candidates():
            try:
                _libs["nvrtc"] = ctypes.CDLL(candidate)
                break
            except OSError as error:
                errors.append(str(error))
        else:
            raise CudaJitError("NVRTC (libnvrtc.so) not found: " + "; ".join(errors[-2:]))
    return _libs["nvrtc"]


def _check_cuda(result: int, what: str) -> None:
    if result:
        message = ctypes.c_char_p()
        _libcuda().cuGetErrorString(result, ctypes.byref(message))
        raise CudaJitError(f"{what} failed: {(message.value or b'').decode()} ({result})")


def _check_nvrtc(result: int, what: str) -> None:
    if result:
        lib = _libnvrtc()
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise CudaJitError(f"{what} failed: {lib.nvrtcGetErrorString(result).decode()} ({result})")


def _nvrtc_version() -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check_nvrtc(_libnvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return f"{major.value}.{minor.value}"


def compile_cubin(source: str, name: str, arch: int, options: tuple[str, ...] = ()) -> bytes:
    """Machine code of `source` for sm_<arch> (e.g. 90), through NVRTC; CudaJitError with the log on failure."""
    lib = _libnvrtc()
    program = ctypes.c_void_p()
    _check_nvrtc(
        lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None),
        "nvrtcCreateProgram",
    )
    try:
        flags = [f"--gpu-architecture=sm_{arch}", "--std=c++17", *options]
        array = (ctypes.c_char_p * len(flags))(*(flag.encode() for flag in flags))
        result = lib.nvrtcCompileProgram(program, len(flags), array)
        if result:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(program, log)
            raise CudaJitError(
                f"NVRTC could not compile {name}:\n{log.value.decode(errors='replace')[-2000:]}"
            )
        size = ctypes.c_size_t()
        _check_nvrtc(lib.nvrtcGetCUBINSize(program, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(lib.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


INCLUDE = re.compile(r'^#include "([A-Za-z0-9_.]+)"\s*$', re.MULTILINE)


def source_text(file_name: str) -> str:
    """A kernel source with its `#include "name"` lines (files beside it, one level) inlined: NVRTC compiles one
    self-contained string."""
    return INCLUDE.sub(
        lambda match: (SOURCE_DIR / match.group(1)).read_text(), (SOURCE_DIR / file_name).read_text()
    )


def _cached_cubin(file_name: str, arch: int) -> bytes:
    source = source_text(file_name)
    key = hashlib.sha256(f"{source}\0{arch}\0{_nvrtc_version()}".encode()).hexdigest()[:16]
    path = cache_dir() / f"{Path(file_name).stem}-sm{arch}-{key}.cubin"
    if path.is_file():
        return path.read_bytes()
    cubin = compile_cubin(source, file_name, arch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".", suffix=".cubin", delete=False) as tmp:
            tmp.write(cubin)
        os.replace(tmp.name, path)
    except OSError as error:  # a read-only cache still runs, compiling each start
        logger.info("could not cache %s: %s", path, error)
    return cubin


def _module(file_name: str, device_index: int) -> Any:
    key = (file_name, device_index)
    if key in _modules:
        return _modules[key]
    if key in _failed:
        raise CudaJitError(_failed[key])
    import torch

    with _lock:
        if key in _modules:
            return _modules[key]
        try:
            major, minor = torch.cuda.get_device_capability(device_index)
            cubin = _cached_cubin(file_name, 10 * major + minor)
            with torch.cuda.device(device_index):
                if not torch.cuda.is_current_stream_capturing():  # a capturing stream has its context current
                    torch.cuda.current_stream().synchronize()  # the runtime makes the primary context current
                module = ctypes.c_void_p()
                _check_cuda(_libcuda().cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")
        except (CudaJitError, OSError) as error:
            _failed[key] = str(error)
            logger.warning("CUDA kernels of %s unavailable, using the Triton kernels: %s", file_name, error)
            raise CudaJitError(str(error)) from error
        _modules[key] = module
        return module


def device_index(device: Any) -> int:
    """The CUDA ordinal of a torch device (its index, or the current device for a bare "cuda")."""
    import torch

    return device.index if device.index is not None else torch.cuda.current_device()


def available_on(file_name: str, device: Any) -> bool:
    """available() for a torch device: False off CUDA."""
    return device.type == "cuda" and available(file_name, device_index(device))


def available(file_name: str, device_index: int) -> bool:
    """Whether `file_name`'s kernels compile and load on this device (compiling and caching them if needed)."""
    if not enabled():
        return False
    try:
        _module(file_name, device_index)
    except CudaJitError:
        return False
    return True


def function(file_name: str, kernel: str, device_index: int) -> ctypes.c_void_p:
    key = (file_name, device_index, kernel)
    if key not in _functions:
        handle = ctypes.c_void_p()
        _check_cuda(
            _libcuda().cuModuleGetFunction(
                ctypes.byref(handle), _module(file_name, device_index), kernel.encode()
            ),
            f"cuModuleGetFunction({kernel})",
        )
        _functions[key] = handle
    return _functions[key]


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_bytes", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)),
        ("num_attrs", ctypes.c_uint),
    ]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def launch(
    handle: ctypes.c_void_p,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    args: list[Any],
    stream: int,
    shared_bytes: int = 0,
    programmatic: bool = False,
) -> None:
    """cuLaunchKernel on `stream` (a cudaStream_t as an int); args are ctypes values in the kernel's order;
    shared_bytes of dynamic shared memory (at most 48 KB without an opt-in). programmatic: cuLaunchKernelEx as a
    programmatic dependent launch (Hopper's PDL), for kernels that run griddepcontrol.wait before they read what
    the kernel before them wrote."""
    pointers = (ctypes.c_void_p * len(args))(*(ctypes.addressof(arg) for arg in args))
    if programmatic:
        attribute = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
        attribute.value[0] = 1
        config = _LaunchConfig(
            (ctypes.c_uint * 3)(*grid),
            (ctypes.c_uint * 3)(*block),
            shared_bytes,
            ctypes.c_void_p(stream),
            ctypes.pointer(attribute),
            1,
        )
        _check_cuda(
            _libcuda().cuLaunchKernelEx(ctypes.byref(config), handle, pointers, None), "cuLaunchKernelEx"
        )
        return
    _check_cuda(
        _libcuda().cuLaunchKernel(
            handle, *grid, *block, shared_bytes, ctypes.c_void_p(stream), pointers, None
        ),
        "cuLaunchKernel",
    )
