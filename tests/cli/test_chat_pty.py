"""`lmserve chat` driven through a real pty: two turns that share history, `end` resets it, `exit` quits.

The independent truth is `pipeline()` greedy output for the same message lists on the same model.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lmserve import pipeline
from lmserve.config import EngineConfig

PROMPT = "\n>>> "
FIRST = "Let's talk about Paris."
SECOND = "Which city are we talking about?"  # answerable only from the first turn
MAX_NEW_TOKENS = 24
# one thread each: the REPL process and the pipeline here load side by side on two cores, with equal numerics
ENGINE_FLAGS = ["--dtype", "float32", "--num-cpu-threads", "1"]
SAMPLING_FLAGS = ["--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS)]
LOAD_TIMEOUT_S = 240.0
TURN_TIMEOUT_S = 120.0


class Repl:
    """A child process whose stdin/stdout are a pty (no echo, no CR/LF translation); stderr goes to a file."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.ONLCR  # output flags: keep "\n" as sent
        attrs[3] &= ~termios.ECHO  # local flags: typed text is not echoed into the output
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=self.stderr, close_fds=True)
        os.close(slave)
        self.output = ""

    def read_until(self, marker: str, timeout: float) -> str:
        """Everything up to and including the next `marker`; fails with the output so far on timeout/exit."""
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            if time.monotonic() > deadline or not self._read_some(deadline):
                pytest.fail(
                    f"no {marker!r} from lmserve chat; output: {self.output!r}; stderr: {self.errors()}"
                )
        head, _, self.output = self.output.partition(marker)
        return head + marker

    def _read_some(self, deadline: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return True  # timed out: the caller's deadline check fails
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: the child closed the pty
            return False
        self.output += data.decode("utf-8", errors="replace")
        return bool(data)

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def turn(self, message: str) -> str:
        """Send a message (ended by an empty line, the REPL's rule) and return the streamed reply."""
        self.send(message + "\n\n")
        return self.read_until(PROMPT, TURN_TIMEOUT_S).removesuffix(PROMPT).removesuffix("\n")

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-3000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)
        self.stderr.close()


@pytest.fixture
def repl(smollm2_gguf_path: Any) -> Iterator[Repl]:
    session = Repl([sys.executable, "-m", "lmserve", "chat", *ENGINE_FLAGS, *SAMPLING_FLAGS])
    yield session
    session.close()


@pytest.fixture
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pipeline_replies() -> tuple[str, str, str]:
    """Greedy replies of the offline pipeline: turn 1, turn 2 with turn 1 as history, and turn 2 alone."""
    pipe = pipeline(None, backend_config=EngineConfig(dtype="float32", num_cpu_threads=1))
    greedy = pipe.engine.default_generation_config.with_updates(
        temperature=0.0, do_sample=False, max_new_tokens=MAX_NEW_TOKENS
    )
    first = [{"role": "user", "content": FIRST}]
    reply_1 = pipe(first, greedy).text  # type: ignore[union-attr]
    history = [*first, {"role": "assistant", "content": reply_1}, {"role": "user", "content": SECOND}]
    reply_2 = pipe(history, greedy).text  # type: ignore[union-attr]
    alone = pipe([{"role": "user", "content": SECOND}], greedy).text  # type: ignore[union-attr]
    return reply_1, reply_2, alone


def test_two_turns_share_history_then_end_resets_it(repl: Repl, single_thread: None) -> None:
    expected_1, expected_2, expected_alone = pipeline_replies()  # computed while the REPL loads
    assert "Paris" in expected_2 and "Paris" not in expected_alone  # the pair really depends on history
    banner = repl.read_until(PROMPT, LOAD_TIMEOUT_S)
    assert "`end`" in banner and "`exit`" in banner

    assert repl.turn(FIRST) == expected_1
    reply_2 = repl.turn(SECOND)
    assert reply_2 == expected_2
    assert "Paris" in reply_2

    repl.send("end\n")
    assert "new conversation" in repl.read_until(PROMPT, TURN_TIMEOUT_S)
    assert repl.turn(SECOND) == expected_alone

    repl.send("exit\n")
    assert repl.process.wait(timeout=60) == 0, repl.errors()
    assert "Traceback" not in repl.errors()
