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
