"""Start-up progress on stderr: one line per loading phase and its time, on a terminal only (as tqdm's bars)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def loading_phase(name: str) -> Iterator[None]:
    """Times the block; prints `lmserve: <name> (1.23 s)` on stderr when stderr is a terminal."""
    start = time.perf_counter()
    yield
    if sys.stderr.isatty():
        print(f"lmserve: {name} ({time.perf_counter() - start:.2f} s)", file=sys.stderr, flush=True)
