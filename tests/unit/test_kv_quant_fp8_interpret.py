"""The FP8 KV cache through the Triton kernels and backend, run by Triton's interpreter on tiny shapes.

The checks are tests/gpu/test_kv_quant_fp8_gpu.py's; as in test_kv_quant_interpret.py, the one test pytest runs
here starts a child pytest with TRITON_INTERPRET=1 set before Triton is imported.
"""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels.testing import in_interpreter_child, run_under_interpreter

IN_CHILD = in_interpreter_child()
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child process")
CPU = torch.device("cpu")
DTYPE = torch.float16  # numpy, under the interpreter, has no bfloat16
LAYOUT = (4, 2, 32)  # query heads, KV heads, head_dim

if IN_CHILD:
    from tests.gpu.test_kv_quant_fp8_gpu import check_backend, check_decode, check_prefill


def test_fp8_kernels_match_references_under_interpreter() -> None:
    run_under_interpreter(__file__, timeout=600)


@child_only
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("block_n", [16, None])  # None: the fp8 default tile (128 keys)
def test_decode_reads_e4m3(num_splits: int, block_n: int | None) -> None:
    check_decode(CPU, DTYPE, LAYOUT, 8, [1, 17, 40, 300], num_splits, block_n)


@child_only
def test_prefill_reads_e4m3() -> None:
    check_prefill(CPU, DTYPE, LAYOUT, 8, [1, 40, 5, 9], [6, 40, 37, 9], 16, 16)


@child_only
@pytest.mark.parametrize("sliding_window", [None, 8])
def test_triton_backend_matches_torch_backend(sliding_window: int | None) -> None:
    check_backend(CPU, DTYPE, LAYOUT, 16, [1, 1, 12, 5], [3, 33, 12, 21], True, sliding_window)


# The fused rotary store is checked on CUDA only (tests/gpu): its rotated keys are not e4m3 values, and the
# interpreter's float -> e4m3 conversion drops the rounding carry (0.4851 -> 0.25 where the GPU gives 0.5).
