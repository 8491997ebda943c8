"""Tool-call parsing shared by every format: calls found in text, streamed as OpenAI deltas by diffing."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


@dataclass(frozen=True)
class ToolCall:
    """One function call as OpenAI returns it: the arguments are JSON text, as the model wrote them."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class PartialCall:
    """A call as far as the text goes: name once complete, the arguments' text so far, whether it ended."""

    name: str | None
    arguments: str
    complete: bool


@dataclass
class CallRegion:
    """Where one call's JSON lies in the output (end: where its closing marker starts; None: not yet)."""

    body_start: int
    end: int | None


class ToolParser:
    """A model family's call syntax: `call_start` JSON `call_end` (subclasses say how calls are found).

    `parse` reads a whole output; `stream()` gives a ToolCallStream that turns text deltas into OpenAI's
    content and tool_calls deltas. Both read calls the same way, so a stream reassembles to `parse`.
    """

    name = ""
    call_start = ""
    call_end = ""
    arguments_key = "arguments"
    """The key the model's own format gives the arguments (the grammar for required/named writes it)."""
    call_separator = "\n"
    """Between parallel calls, in the grammar for required calls."""
    markers_are_special = False
    """The call markers are special tokens (decoding must keep them for the parser to see the calls)."""
    grammar_call_start = ""
    grammar_call_end = ""
    """The markers the grammar writes around each call (the model's own, with its usual newlines)."""

    def regions(self, text: str) -> tuple[list[CallRegion], int]:
        """The call regions in `text`, and where the plain content before the first call ends."""
        regions = []
        position = text.find(self.call_start)
        content_end = len(text) - partial_suffix(text, self.call_start) if position < 0 else position
        while position >= 0:
            body_start = position + len(self.call_start)
            end = text.find(self.call_end, body_start)
            regions.append(CallRegion(body_start, None if end < 0 else end))
            position = -1 if end < 0 else text.find(self.call_start, end + len(self.call_end))
        return regions, content_end

    def partial(self, text: str) -> tuple[str, list[PartialCall]]:
        """Content so far and every call as far as it goes (the streaming view)."""
        regions, content_end = self.regions(text)
        calls = [_partial_call(text[r.body_start : len(text) if r.end is None else r.end]) for r in regions]
        for call, region in zip(calls, regions, strict=True):
            call.complete = call.complete and (region.end is not None or not self.call_end)
        return text[:content_end], calls

    def parse(self, text: str) -> ParsedOutput:
        """Calls with a name and JSON arguments; the text of anything that does not parse stays content."""
        content, calls = self.partial(text)
        tool_calls = [ToolCall(c.name, c.arguments) for c in calls if c.name is not None and _is_valid(c)]
        if len(tool_calls) < len(calls):  # a malformed call: the model wrote text, not a call
            return ParsedOutput(text, [])
        return ParsedOutput(content.strip() or None, tool_calls)

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)


def _is_valid(call: PartialCall) -> bool:
    if not call.complete or call.name is None:
        return False
    try:
        return isinstance(json.loads(call.arguments), dict)
    except ValueError:
        return False


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (held back: it may be a call starting)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


def _partial_call(body: str) -> PartialCall:
    """Read `{"name": ..., "arguments": {...}}` as far as it goes (name first, as models write it)."""
    name_match = _NAME.search(body)
    arguments_match = _ARGUMENTS.search(body, name_match.end() if name_match else 0)
    name = json.loads(f'"{name_match.group(1)}"') if name_match else None
    if name is None or arguments_match is None:
        return PartialCall(name, "", False)
    arguments, complete = scan_json_value(body, arguments_match.end())
    return PartialCall(name, arguments, complete)


def scan_json_value(text: str, start: int) -> tuple[str, bool]:
    """The JSON object/array at `start` as far as it goes, and whether it closed (strings and escapes aware)."""
    depth, in_string, escaped = 0, False, False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return text[start : index + 1], True
        elif depth == 0 and not char.isspace():
            break  # not an object: a model writing something else
    return text[start:], False


class ToolCallStream:
    """Text deltas in, OpenAI deltas out: content first, then per call its header, then argument fragments."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.num_content_sent = 0
        self.calls_sent: list[tuple[str, int]] = []
        """Per call started in the stream: its id and how much of its arguments went out."""

    def push(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        """(new content text, new tool_calls delta entries) after `delta`."""
        self.text += delta
        content, calls = self.parser.partial(self.text)
        new_content = content[self.num_content_sent :]
        self.num_content_sent = len(content)
        entries = [entry for index, call in enumerate(calls) for entry in self._call_deltas(index, call)]
        return new_content, entries

    def _call_deltas(self, index: int, call: PartialCall) -> list[dict[str, Any]]:
        if call.name is None:
            return []
        entries = []
        if index == len(self.calls_sent):
            call_id = f"call_{uuid.uuid4().hex[:24]}"
            self.calls_sent.append((call_id, 0))
            header = {"name": call.name, "arguments": ""}
            entries.append({"index": index, "id": call_id, "type": "function", "function": header})
        call_id, num_sent = self.calls_sent[index]
        if len(call.arguments) > num_sent:
            entries.append({"index": index, "function": {"arguments": call.arguments[num_sent:]}})
            self.calls_sent[index] = (call_id, len(call.arguments))
        return entries

    def finish(self) -> str:
        """Content held back at the end (it looked like a call starting, and none did)."""
        if self.calls_sent:
            return ""
        rest = self.text[self.num_content_sent :]
        self.num_content_sent = len(self.text)
        return rest

    @property
    def num_calls(self) -> int:
        return len(self.calls_sent)
