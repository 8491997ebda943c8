"""The CUDA C sources as NVRTC gets them: one self-contained string per kernel file, the shared header inlined,
every kernel name the Python launchers ask for defined (CPU-only: the sources are checked, not compiled)."""

from __future__ import annotations

import re

import pytest

from lmserve.kernels import cuda_jit
from lmserve.kernels.fp8 import CUDA_GEMV_SOURCE as FP8_SOURCE
from lmserve.kernels.fp8 import CUDA_VARIANTS
from lmserve.kernels.w4a16 import CUDA_GEMV_SOURCE as W4_SOURCE


@pytest.mark.parametrize("name", [W4_SOURCE, FP8_SOURCE])
def test_sources_inline_their_includes(name: str) -> None:
    raw = (cuda_jit.SOURCE_DIR / name).read_text()
    assert re.search(r'^#include "common.cuh"', raw, re.MULTILINE)
    text = cuda_jit.source_text(name)
    assert not re.search(r"^#include", text, re.MULTILINE)
    assert text.count("__device__ __forceinline__ float to_float(") == 1


def test_fp8_kernel_names_exist() -> None:
    text = cuda_jit.source_text(FP8_SOURCE)
    for dtype in ("bf16", "f16"):
        for warps, unroll in CUDA_VARIANTS:
            assert f"FP8_GEMV_BOTH(fp8_gemv_{dtype}_w{warps}_u{unroll}," in text


def test_missing_include_is_an_error(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "k.cu").write_text('#include "absent.cuh"\n')
    monkeypatch.setattr(cuda_jit, "SOURCE_DIR", tmp_path)
    with pytest.raises(FileNotFoundError):
        cuda_jit.source_text("k.cu")


def test_w4_kernel_names_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel the W4A16 launcher asks for, over its options (prefetch, _o3, silu, norm, PDL, group sizes,
    dtypes), is one that w4_gemv.cu's macros define: the launcher runs on the CPU with the driver calls recorded."""
    import torch

    from lmserve.kernels import w4a16

    text = cuda_jit.source_text(W4_SOURCE)
    defined = {
        base + form + pdl
        for base in re.findall(r"^W4_GEMV_(?:BOTH|ALL)\((w4_gemv_\w+),", text, re.MULTILINE)
        for form in ("", "_silu", "_norm")
        for pdl in ("", "_pdl")
    }
    asked: list[str] = []
    monkeypatch.setattr(cuda_jit, "function", lambda file_name, kernel, device: asked.append(kernel))
    monkeypatch.setattr(cuda_jit, "launch", lambda *args, **kwargs: None)
    monkeypatch.setattr(cuda_jit, "device_index", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 0})())
    monkeypatch.setattr(w4a16, "num_sms", lambda device: 132)
    monkeypatch.setattr(w4a16, "pdl_enabled", lambda device: True)
    k, n = 1024, 256
    for group in (32, 64, 128):
        qweight = torch.zeros(k, n // 8, dtype=torch.int32)
        qzeros = torch.zeros(k // group, n // 8, dtype=torch.int32)
        scales = torch.ones(k // group, n, dtype=torch.float16)
        weight = w4a16.repack_awq(qweight, qzeros, scales, group)
        for dtype in (torch.bfloat16, torch.float16):
            x, out = torch.zeros(1, k, dtype=dtype), torch.zeros(1, n, dtype=dtype)
            residual = torch.zeros(1, k, dtype=dtype)
            for kernel in ({"prefetch": 0}, {"prefetch": 1}, {"occupancy": 3}):
                if kernel.get("occupancy") == 3 and group < 64:
                    continue
                for pdl in (0, 1):
                    options = {**kernel, "pdl": pdl}
                    w4a16._cuda_gemv(x, weight, out, None, options)
                    w4a16._cuda_gemv(
                        torch.zeros(1, 2 * k, dtype=dtype), weight, out, None, {**options, "gated": 1}
                    )
                    w4a16._cuda_gemv(
                        x, weight, out, (residual, residual.clone(), x[0].clone(), 1e-5), options
                    )
    assert len(set(asked)) == 3 * 2 * 2 * 3 * 2 + 2 * 2 * 3 * 2  # every combination, each its own kernel
    assert set(asked) <= defined, sorted(set(asked) - defined)
