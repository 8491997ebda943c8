"""`lmserve bench throughput` warms up on other prompts before the timed run (tiny random Llama, CPU)."""

from __future__ import annotations

import pytest

from lmserve.bench.offline import throughput
from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from tests.models.model_helpers import tiny_hf_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> LLMEngine:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama").save_pretrained(folder)
    config = EngineConfig(device="cpu", dtype="float32", enable_prefix_caching=True)
    return LLMEngine.from_random_weights(str(folder / "config.json"), config)


def test_warmup_runs_the_same_job_on_other_prompts_first(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted: list[list[int]] = []
    add_request = engine.add_request

    def recording_add_request(prompt: list[int], *args: object, **kwargs: object) -> str:
        submitted.append(list(prompt))
        return add_request(prompt, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "add_request", recording_add_request)
    result = throughput(engine, num_requests=3, input_len=8, output_len=4, warmup=1)
    assert len(submitted) == 6 and result.num_requests == 3
    warm, timed = submitted[:3], submitted[3:]
    # no warm-up prompt shares a first block with a timed one: the prefix cache cannot serve the timed run
    assert not {tuple(p[:4]) for p in warm} & {tuple(p[:4]) for p in timed}
    assert result.output_tok_per_s == pytest.approx(3 * 4 / result.elapsed_s)


def test_no_warmup_submits_only_the_timed_job(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    add_request = engine.add_request
    monkeypatch.setattr(engine, "add_request", lambda p, *a, **k: calls.append(1) or add_request(p, *a, **k))
    throughput(engine, num_requests=2, input_len=8, output_len=2)
    assert len(calls) == 2
