"""Sampling parameters (GenerationConfig, LMDeploy's names) and what the engine returns."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from lmserve.structured.spec import StructuredOutput, from_response_format

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class GenerationConfig:
    """How to sample one request. The one sampling type: pipeline, server and engine all use it.

    Field names follow LMDeploy's `GenerationConfig`; OpenAI's names map onto them in serve/.
    """

    max_new_tokens: int | None = 512
    """Most tokens to generate; None: up to the end of the session (context)."""
    do_sample: bool = False
    """False: greedy (temperature, top_p, top_k ignored)."""
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    """Token id -> bias added to its logit before sampling (OpenAI's logit_bias)."""
    random_seed: int | None = None
    """Per-request seed: the same seed and prompt give the same tokens."""
    stop_words: tuple[str, ...] = ()
    """Stop strings (any length, may span tokens); not included in the output."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end generation (the model's EOS ids always do unless ignore_eos)."""
    ignore_eos: bool = False
    min_new_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the sampled token's logprob plus the top-k alternatives."""
    n: int = 1
    """Completions per prompt (the pipeline/server fan out; the engine sees n=1 requests)."""
    response_format: StructuredOutput | None = None
    """The output must match this grammar (also takes OpenAI's response_format dict); None: free text."""
    adapter_name: str | None = None
    """The LoRA adapter (one of EngineConfig.adapters) this request runs with; None: the base model."""

    def __post_init__(self) -> None:
        # lists are accepted from callers for convenience; stored as tuples to stay hashable/frozen
        if isinstance(self.stop_words, (list, str)):
            words = [self.stop_words] if isinstance(self.stop_words, str) else self.stop_words
            object.__setattr__(self, "stop_words", tuple(words))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "response_format", from_response_format(self.response_format))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field for values out of range."""
        checks = [
            (
                self.max_new_tokens is None or self.max_new_tokens >= 1,
                f"max_new_tokens={self.max_new_tokens} must be >= 1",
            ),
            (0.0 <= self.temperature <= 2.0, f"temperature={self.temperature} must be in [0, 2]"),
            (0.0 < self.top_p <= 1.0, f"top_p={self.top_p} must be in (0, 1]"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0"),
            (0.0 <= self.min_p <= 1.0, f"min_p={self.min_p} must be in [0, 1]"),
            (self.repetition_penalty > 0.0, f"repetition_penalty={self.repetition_penalty} must be > 0"),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                f"frequency_penalty={self.frequency_penalty} must be in [-2, 2]",
            ),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                f"presence_penalty={self.presence_penalty} must be in [-2, 2]",
            ),
            (
                _valid_logit_bias(self.logit_bias),
                f"logit_bias={self.logit_bias} must map token ids >= 0 to biases in [-100, 100]",
            ),
            (self.min_new_tokens >= 0, f"min_new_tokens={self.min_new_tokens} must be >= 0"),
            (
                self.logprobs is None or 0 <= self.logprobs <= 20,
                f"logprobs={self.logprobs} must be in [0, 20]",
            ),
            (1 <= self.n <= 128, f"n={self.n} must be in [1, 128]"),
            # a grammar ends with EOS: banning EOS would leave it no way to finish
            (
                self.response_format is None or not (self.ignore_eos or self.min_new_tokens),
                "ignore_eos=True and min_new_tokens > 0 cannot be combined with response_format",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0 or self.top_k == 1

    def with_updates(self, **changes: Any) -> GenerationConfig:
        return replace(self, **changes)

    def fan_out(self) -> list[GenerationConfig]:
        """The n single-sequence configs the engine runs for n choices (the engine takes n=1 only).

        Choice i gets seed + i, so a seeded n > 1 request gives different yet reproducible choices.
        """
        if self.n == 1:
            return [self]
        seed = self.random_seed
        return [replace(self, n=1, random_seed=None if seed is None else seed + i) for i in range(self.n)]


def _valid_logit_bias(logit_bias: dict[int, float] | None) -> bool:
    if logit_bias is None:
        return True
    return all(
        isinstance(token_id, int) and token_id >= 0 and -100.0 <= bias <= 100.0
        for token_id, bias in logit_bias.items()
    )


@dataclass(frozen=True)
class TokenLogprob:
    """Logprob of one generated token and the top alternatives at that position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """One step's news about one request: the *delta* since the last RequestOutput."""

    request_id: str
    text: str = ""
    """New text since the previous output (stop strings already cut)."""
    token_ids: list[int] = field(default_factory=list)
    """New token ids since the previous output."""
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    """Total generated so far (not just this delta)."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
    error: str | None = None
    bad_request: bool = False
    """The error is the request's fault (e.g. its grammar did not compile): an HTTP 400, not a 500."""
    embedding: list[float] | None = None
    """An embedding request's pooled, L2-normalized hidden state (its one, finished output)."""


def rejected(request_id: str, reason: str) -> RequestOutput:
    """The one output of a request the engine refused (a bad request, not an engine failure)."""
    return RequestOutput(request_id, finished=True, finish_reason="error", error=reason, bad_request=True)


@dataclass
class Response:
    """A whole generation, as `pipeline()` returns it (LMDeploy's Response)."""

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: FinishReason | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    index: int = 0

    def extend(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids.extend(out.token_ids)
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.logprobs
        self.generate_token_len = out.num_generated_tokens
        self.input_token_len = out.num_prompt_tokens
        if out.finished:
            self.finish_reason = out.finish_reason


class PromptThenOutput:
    """Views of a token list that holds the prompt, then the generated tokens (engine and sampler rows)."""

    token_ids: list[int]
    num_prompt_tokens: int

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens
