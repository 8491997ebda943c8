"""Optional Triton import: the torch references work without it, the kernels need it."""

from __future__ import annotations

import os
from typing import Any

# float32 tl.dot would otherwise run on TF32 tensor cores (10-bit mantissa): a float32 engine must compute in
# float32, as torch does by default. bf16/fp16 dots are unaffected. Set before Triton compiles anything.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


def _wants_triton() -> bool:
    """Triton kernels launch only on CUDA tensors or under its interpreter (TRITON_INTERPRET=1, the CPU kernel
    tests): without either, importing it (~0.15 s on the 2-core box) only slows the CPU engine's start."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()


try:
    if not _wants_triton():
        raise ImportError("no CUDA device and no TRITON_INTERPRET: the torch references run")
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs run the torch references
    triton = None
    tl = None
    HAS_TRITON = False


def jit(fn: Any) -> Any:
    """triton.jit when Triton is installed; otherwise the plain function, never launched."""
    return triton.jit(fn) if HAS_TRITON else fn


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_SM_COUNTS: dict[int, int] = {}


def num_sms(device: Any) -> int:
    """Multiprocessor count of a CUDA device (cached; a fixed guess off CUDA, e.g. the interpreter)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def triton_dtype(dtype: Any) -> Any:
    """The Triton dtype of a torch float dtype (a kernel's constexpr: what to round a float32 result to)."""
    import torch

    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


PDL_ENV = "LMSERVE_PDL"
"""On sm_90+ GPUs the decode path's Triton kernels and CUDA GEMVs launch as programmatic dependents (Hopper's PDL)
unless LMSERVE_PDL=0: each one waits for the kernel before it (griddepcontrol.wait) before it reads or writes
anything the kernel before may touch (the CUDA GEMVs issue their first weight loads before the wait), then lets
its dependent launch, so the next kernel's launch overlaps this one's run. (Signalling before the wait let a chain
of kernels launch early, each holding SM slots while it waits: FP8 lost 2.4 % that way.) On one H200, batch-1
decode: bf16 +4.6 %, AWQ +9.7 %, FP8 +8.1 % (benchmarks/RESULTS.md, 2026-12-06)."""

FUSION_ENV = "LMSERVE_DECODE_FUSION"
"""Launch fusions of the decode step, built and tested, off unless named in LMSERVE_DECODE_FUSION (comma-separated;
on an H100 "reduce" and "norm" lost and "rotary" won only AWQ at batch 1, benchmarks/RESULTS.md 2026-12-07 evening): "rotary" (rotary_store_kv inside the decode attention launch, decode-only
steps), "reduce" (the last split of each sequence and KV head combines the splits: no reduce launch) and "norm"
(the residual add and RMSNorm inside the one-row GEMV of qkv and gate_up: no norm launch). benchmarks/gpu_sweep.py's
+fuseattn / +fusenorm formats are their A/B."""
DECODE_FUSIONS = frozenset(name.strip() for name in os.environ.get(FUSION_ENV, "").split(",") if name.strip())
if DECODE_FUSIONS - {"rotary", "reduce", "norm"}:
    raise ValueError(f"{FUSION_ENV}={os.environ[FUSION_ENV]!r}: the fusions are rotary, reduce and norm")

HAS_GDC = False
if HAS_TRITON:
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        HAS_GDC = True
    except ImportError:  # Triton before 3.4
        pass

PDL_WANTED = HAS_GDC and os.environ.get(PDL_ENV, "1") != "0"
"""Read once at import: pdl_enabled runs on every launch of the eager (prefill) path."""
_PDL_DEVICES: dict[int, bool] = {}
_PDL_KEYWORDS = {"PDL": True, "launch_pdl": True}


def pdl_enabled(device: Any) -> bool:
    """Whether kernels on `device` launch as programmatic dependents: an sm_90+ GPU, unless LMSERVE_PDL=0."""
    import torch

    if not PDL_WANTED:
        return False
    device = torch.device(device)
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PDL_DEVICES:
        _PDL_DEVICES[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _PDL_DEVICES[index]


def pdl_options(device: Any) -> dict[str, bool]:
    """Launch keywords of a Triton kernel that starts with pdl_enter(PDL): PDL and launch_pdl where pdl_enabled,
    else nothing (PDL keeps its default, False). Read only: the same dict every time."""
    return _PDL_KEYWORDS if pdl_enabled(device) else {}


if HAS_TRITON:

    @triton.jit
    def pdl_enter(PDL: tl.constexpr):  # noqa: N803 (a constexpr)
        """First statement of a kernel launched with pdl_options: wait for the kernel before, then let the next launch;
        nothing unless PDL."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

else:

    def pdl_enter(PDL: Any) -> None:  # noqa: N803
        """Without Triton no kernel runs: nothing to do."""
