"""Host time of an engine step by phase: which Python a decode step spends its wall time in, and how long the
host waits for the device (`DeviceSample.result`) — with the overlap scheduler, a host that waits there is
ahead of the GPU, a host that never waits keeps the GPU waiting.

`measure_decode(engine, ...)` runs the 256 x 512/256 job's steady decode with the engine's step methods wrapped
in timers (restored afterwards), so it measures the same code on the CPU (benchmarks/host_profile.py) and on
the GPU (benchmarks/job_profile.py --host-phases).
"""

from __future__ import annotations

import inspect
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from lmserve.bench.offline import fixed_length_config, random_prompts
from lmserve.engine import runner as runner_module
from lmserve.engine.engine import LLMEngine
from lmserve.engine.runner import ModelRunner
from lmserve.engine.sampler import DeviceSample, Sampler, SamplingBatch
from lmserve.engine.scheduler import Scheduler

PHASES: list[tuple[Any, str, str]] = [
    (LLMEngine, "step", "step (all)"),
    (LLMEngine, "_can_overlap", "can_overlap"),
    (Scheduler, "schedule", "schedule"),
    (LLMEngine, "_launch", "launch (all)"),
    (ModelRunner, "step_chunks", "launch: step_chunks"),
    (runner_module, "build_step_batch", "launch: build_step_batch"),
    (runner_module, "_fill_placeholders", "launch: fill_placeholders (device ops)"),
    (ModelRunner, "forward", "launch: forward (graph replay / eager model)"),
    (SamplingBatch, "build", "launch: SamplingBatch.build"),
    (Sampler, "sample_on_device", "launch: sample_on_device"),
    (Scheduler, "commit", "launch: commit"),
    (LLMEngine, "_finish", "finish (all)"),
    (DeviceSample, "result", "finish: result (waits for the device)"),
    (Scheduler, "apply_tokens", "finish: apply_tokens"),
    (LLMEngine, "_emit", "finish: emit"),
]


@contextmanager
def timed_phases(extra: Sequence[tuple[Any, str, str]] = ()) -> Iterator[dict[str, float]]:
    """Wrap each (owner, attribute) in a timer adding to the yielded {label: seconds}; restored on exit.
    Attributes an older tree lacks are skipped."""
    times: dict[str, float] = defaultdict(float)
    restore: list[tuple[Any, str, Any]] = []
    for owner, name, label in [*PHASES, *extra]:
        if not hasattr(owner, name):
            continue
        static = inspect.getattr_static(owner, name)
        original: Callable[..., Any] = getattr(owner, name)

        def wrapper(
            *args: Any, _original: Callable[..., Any] = original, _label: str = label, **kw: Any
        ) -> Any:
            start = time.perf_counter()
            try:
                return _original(*args, **kw)
            finally:
                times[_label] += time.perf_counter() - start

        restore.append(
            (owner, name, vars(owner).get(name))
        )  # None: inherited (a class's method on an instance)
        setattr(owner, name, staticmethod(wrapper) if isinstance(static, staticmethod) else wrapper)
    try:
        yield times
    finally:
        for owner, name, own in reversed(restore):
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)


def measure_decode(
    engine: LLMEngine, num_requests: int = 256, input_len: int = 512, output_len: int = 256, steps: int = 32
) -> dict[str, float]:
    """Microseconds per step of each phase over `steps` steady decode steps of the job (all requests running,
    a few steps after the last first token), then the job is run to its end untimed."""
    config = fixed_length_config(output_len)
    for prompt in random_prompts(num_requests, input_len, engine.model_config.vocab_size, seed=11):
        engine.add_request(prompt, config)
    while any(r.num_output_tokens == 0 for r in engine.requests.values()):
        engine.step()
    for _ in range(4):
        engine.step()
    marks = _DeviceMarks() if engine.resolved.device.type == "cuda" else None
    with marks.installed() if marks else nullcontext(), timed_phases() as times:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    result = {label: 1e6 * seconds / steps for label, seconds in times.items()}
    result["wall per step"] = 1e6 * wall / steps
    if marks is not None:
        result.update(marks.summary())
    waited = times.get("finish: result (waits for the device)", 0.0)
    device_calls = sum(
        times.get(label, 0.0)
        for label in ("launch: forward (graph replay / eager model)", "launch: sample_on_device")
    )
    result["host per step (wall - waiting - forward - sample_on_device)"] = (
        1e6 * (wall - waited - device_calls) / steps
    )
    return result


class _DeviceMarks:
    """CUDA events on the stream at three points of every launched step: A before its first op, C after the
    forward (graph replay) is queued, B after its last op (the tokens' copy to the host). On the device's own
    clock, B - A is the step's span, C - A its inputs and forward, and A(next) - B the time the GPU sat idle
    waiting for the host to queue the next step (about 0 when the host is ahead)."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.marks: list[tuple[str, Any]] = []

    def _mark(self, name: str) -> None:
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        self.marks.append((name, event))

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The engine's `_launch` and the runner's `forward` put the marks in while inside."""
        launch, forward = LLMEngine._launch, ModelRunner.forward

        def marked_launch(engine: LLMEngine, *args: Any, **kw: Any) -> Any:
            self._mark("A")
            out = launch(engine, *args, **kw)
            self._mark("B")
            return out

        def marked_forward(runner: ModelRunner, *args: Any, **kw: Any) -> Any:
            out = forward(runner, *args, **kw)
            self._mark("C")
            return out

        LLMEngine._launch = marked_launch  # type: ignore[method-assign,assignment]
        ModelRunner.forward = marked_forward  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            LLMEngine._launch, ModelRunner.forward = launch, forward  # type: ignore[method-assign]

    def summary(self) -> dict[str, float]:
        self.torch.cuda.synchronize()
        spans, forwards, idles = [], [], []
        previous_b = None
        a = c = None
        for name, event in self.marks:
            if name == "A":
                if previous_b is not None:
                    idles.append(previous_b.elapsed_time(event))
                a, c = event, None
            elif name == "C":
                c = event
            elif name == "B" and a is not None:
                spans.append(a.elapsed_time(event))
                if c is not None:
                    forwards.append(a.elapsed_time(c))
                previous_b = event
        mean = lambda values: 1e3 * sum(values) / max(1, len(values))  # noqa: E731  (ms -> us)
        return {
            "device: step span B-A": mean(spans),
            "device: inputs + forward C-A": mean(forwards),
            "device: idle between steps A(next)-B": mean(idles),
        }
