"""The assistant turn made from generated text: reasoning apart, tool calls parsed; whole or as stream deltas.

Reusable outside the OpenAI chat route (Anthropic messages, responses): text in, parts out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmserve.serve.constraints import ToolPlan
from lmserve.serve.reasoning import ReasoningParser, ReasoningStream
from lmserve.serve.tool_parsers import ToolCall, ToolCallStream


@dataclass(frozen=True)
class AssistantTurn:
    content: str | None
    reasoning: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


def assistant_turn(text: str, reasoning: ReasoningParser | None, tools: ToolPlan | None) -> AssistantTurn:
    """Split a whole output into reasoning, content and tool calls (calls only when the plan parses them)."""
    thought, content = reasoning.split(text) if reasoning is not None else (None, text)
    if tools is None or tools.parser is None:
        return AssistantTurn(content, thought)
    parsed = tools.parser.parse(content)
    calls = parsed.tool_calls if tools.parallel else parsed.tool_calls[:1]
    return AssistantTurn(parsed.content, thought, calls)


def finish_reason(engine_reason: str | None, made_calls: bool) -> str | None:
    """OpenAI's "tool_calls" when the model called a tool and stopped by itself."""
    return "tool_calls" if made_calls and engine_reason == "stop" else engine_reason


def reasoning_delta(text: str) -> dict[str, Any]:
    """Reasoning under both names: reasoning_content (LMDeploy, SGLang) and reasoning (vLLM's newer one)."""
    return {"reasoning_content": text, "reasoning": text}


class AssistantStream:
    """Text deltas in, OpenAI chat `delta` objects out (reasoning, content, tool_calls), in order."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolPlan | None) -> None:
        self.reasoning: ReasoningStream | None = reasoning.stream() if reasoning is not None else None
        self.tools: ToolCallStream | None = tools.parser.stream() if tools and tools.parser else None
        self.parallel = tools.parallel if tools is not None else True

    def push(self, text: str, final: bool = False) -> list[dict[str, Any]]:
        thought, content = self.reasoning.push(text, final) if self.reasoning is not None else ("", text)
        deltas = [reasoning_delta(thought)] if thought else []
        if self.tools is None:
            return deltas + ([{"content": content}] if content else [])
        content, calls = self.tools.push(content)
        if final:
            content += self.tools.finish()
        if content:
            deltas.append({"content": content})
        calls = [call for call in calls if self.parallel or call["index"] == 0]
        if calls:
            deltas.append({"tool_calls": calls})
        return deltas

    @property
    def made_calls(self) -> bool:
        return self.tools is not None and self.tools.num_calls > 0
