"""Reasoning parsers (--reasoning-parser deepseek-r1|qwen3): <think> text apart from the answer, whole or streamed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningParser:
    """Splits `<think>reasoning</think>answer`.

    `always_thinks`: the prompt opened `<think>` already (DeepSeek-R1's template), so text before any
    `</think>` is reasoning even without a `<think>` in the output; otherwise (Qwen3, whose thinking can
    be off) an output without `<think>` is all answer.
    """

    name: str
    always_thinks: bool
    start: str = "<think>"
    end: str = "</think>"

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning or None, content) of a whole output."""
        reasoning, content, _ = self.partial(text, final=True)
        return reasoning, content

    def partial(self, text: str, final: bool = False) -> tuple[str | None, str, bool]:
        """(reasoning so far, content so far, reasoning ended); a marker half written is held back."""
        stripped = text.lstrip()
        opened = stripped.startswith(self.start)
        if not opened and not self.always_thinks:
            if not final and self.start.startswith(stripped) and stripped:
                return None, "", False  # may be "<thi" of "<think>"
            return None, text, True
        body = stripped[len(self.start) :] if opened else text
        end = body.find(self.end)
        if end >= 0:
            return body[:end], body[end + len(self.end) :].lstrip("\n"), True
        if final:
            return body, "", False
        return body[: len(body) - _partial_suffix(body, self.end)], "", False

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)


def _partial_suffix(text: str, marker: str) -> int:
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


class ReasoningStream:
    """Text deltas in, (reasoning delta, content delta) out."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.text = ""
        self.num_reasoning_sent = 0
        self.num_content_sent = 0

    def push(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        reasoning, content, _ = self.parser.partial(self.text, final)
        reasoning = reasoning or ""
        new = reasoning[self.num_reasoning_sent :], content[self.num_content_sent :]
        self.num_reasoning_sent, self.num_content_sent = len(reasoning), len(content)
        return new


REASONING_PARSERS = {
    "deepseek-r1": ReasoningParser("deepseek-r1", always_thinks=True),
    "qwen3": ReasoningParser("qwen3", always_thinks=False),
}


def reasoning_parser_for(name: str | None) -> ReasoningParser | None:
    if name is None:
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(f"--reasoning-parser={name!r} must be one of {sorted(REASONING_PARSERS)}")
    return REASONING_PARSERS[name]
