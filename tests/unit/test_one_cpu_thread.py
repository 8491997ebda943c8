"""builder.one_cpu_thread: CPU weight conversion on one torch thread, the caller's count restored after."""

from __future__ import annotations

import pytest
import torch

from lmserve.engine.builder import one_cpu_thread


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_one_thread_inside_and_restored_after_an_error(two_threads) -> None:
    with pytest.raises(RuntimeError), one_cpu_thread(torch.device("cpu")):
        assert torch.get_num_threads() == 1
        raise RuntimeError("a failed conversion")
    assert torch.get_num_threads() == 2


def test_other_devices_keep_the_thread_count(two_threads) -> None:
    with one_cpu_thread(torch.device("meta")):
        assert torch.get_num_threads() == 2
