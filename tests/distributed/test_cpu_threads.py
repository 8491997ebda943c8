"""CPU ranks of the mp executor share the machine's cores instead of each spinning torch's full thread count."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lmserve.config import EngineConfig
from lmserve.distributed.parallel_state import share_cpu_cores

CPU = torch.device("cpu")


@pytest.fixture
def four_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("options", "threads"),
    [
        ({"tp": 2}, 2),
        ({"tp": 3}, 1),
        ({"tp": 8}, 1),  # never 0
        ({"tp": 1}, 4),
        ({"tp": 2, "num_cpu_threads": 3}, 4),  # the flag wins (apply_torch_settings sets it)
        ({"tp": 2, "distributed_executor_backend": "ray"}, 4),  # Ray gives each actor its CPUs
    ],
)
def test_mp_ranks_split_the_threads(four_threads: None, options: dict[str, object], threads: int) -> None:
    share_cpu_cores(EngineConfig(device="cpu", **options), CPU)  # type: ignore[arg-type]
    assert torch.get_num_threads() == threads


def test_cuda_ranks_keep_their_threads(four_threads: None) -> None:
    share_cpu_cores(EngineConfig(tp=2), torch.device("cuda", 0))
    assert torch.get_num_threads() == 4
