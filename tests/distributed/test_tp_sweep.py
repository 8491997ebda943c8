"""benchmarks/tp_sweep.py refuses a --tp above the GPUs present before it builds anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "tp_sweep.py"


@pytest.mark.skipif(torch.cuda.device_count() >= 4, reason="this machine can run the sweep")
def test_sweep_beyond_the_gpus_present_is_refused_naming_the_flag() -> None:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tp", "1", "2", "4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    present = torch.cuda.device_count()
    assert f"--tp 4 needs 4 GPUs but {present} are present" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
