"""Tool-call and reasoning parsers on fixed model outputs, whole and streamed in every chunking."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lmserve.serve.assistant import AssistantStream, assistant_turn
from lmserve.serve.constraints import ToolPlan
from lmserve.serve.reasoning import REASONING_PARSERS
from lmserve.serve.tool_parsers import TOOL_PARSERS, ToolParser, tool_parser_for

WEATHER = {"city": 'Paris "Left" {Bank}', "days": [1, {"unit": "C"}]}
OUTPUTS = {
    "qwen": (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": %s}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    ),
    "internlm": (
        'Let me check.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": %s}<|action_end|>'
        '<|action_start|><|plugin|>\n{"name": "get_time", "parameters": {}}<|action_end|>'
    ),
    "llama3": '<|python_tag|>{"name": "get_weather", "parameters": %s}; {"name": "get_time", "parameters": {}}',
}


def expected_content(name: str) -> str | None:
    return None if name == "llama3" else "Let me check."


def reassemble(entries: list[dict[str, Any]]) -> list[dict[str, str]]:
    """What the openai client does with streamed tool_calls deltas: the first names the call, the rest append."""
    calls: list[dict[str, str]] = []
    for entry in entries:
        if "id" in entry:
            assert entry["index"] == len(calls) and entry["type"] == "function"
            calls.append({"id": entry["id"], "name": entry["function"]["name"], "arguments": ""})
        calls[entry["index"]]["arguments"] += entry["function"].get("arguments", "")
    return calls


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_whole_output_gives_two_parallel_calls(name: str) -> None:
    parsed = TOOL_PARSERS[name]().parse(OUTPUTS[name] % json.dumps(WEATHER))
    assert parsed.content == expected_content(name)
    assert [c.name for c in parsed.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(parsed.tool_calls[0].arguments) == WEATHER
    assert json.loads(parsed.tool_calls[1].arguments) == {}


@pytest.mark.parametrize("name", sorted(OUTPUTS))
@pytest.mark.parametrize("chunk_size", [1, 2, 5, 17, 1000])
def test_streamed_calls_reassemble_to_the_whole_parse(name: str, chunk_size: int) -> None:
    text = OUTPUTS[name] % json.dumps(WEATHER)
    stream = TOOL_PARSERS[name]().stream()
    content, entries = "", []
    for start in range(0, len(text), chunk_size):
        new_content, new_entries = stream.push(text[start : start + chunk_size])
        content += new_content
        entries += new_entries
    content += stream.finish()
    calls = reassemble(entries)
    assert content.strip() == (expected_content(name) or "")
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == WEATHER and json.loads(calls[1]["arguments"]) == {}
    if chunk_size < 5:  # arguments arrive in pieces, not in one chunk at the end
        assert sum(1 for e in entries if e["index"] == 0 and "id" not in e) > 3


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_plain_text_and_malformed_calls_stay_content(name: str) -> None:
    parser = TOOL_PARSERS[name]()
    assert parser.parse("The weather is fine. a < b").content == "The weather is fine. a < b"
    broken = OUTPUTS[name] % '{"city": '
    parsed = parser.parse(broken)
    assert parsed.tool_calls == [] and parsed.content == broken


def test_text_like_a_marker_start_is_flushed_at_the_end() -> None:
    stream = TOOL_PARSERS["qwen"]().stream()
    content, entries = stream.push("x <tool")
    assert (content, entries) == ("x ", [])
    assert stream.finish() == "<tool"


@pytest.mark.parametrize(
    ("template", "parser"),
    [
        ("{{ '<tool_call>' }}", "qwen"),
        ("<|action_start|><|plugin|>", "internlm"),
        ("<|python_tag|>", "llama3"),
        (None, "qwen"),
    ],
)
def test_parser_is_picked_from_the_chat_template(template: str | None, parser: str) -> None:
    assert tool_parser_for(None, template).name == parser
    assert tool_parser_for("llama3", template).name == "llama3"
    with pytest.raises(ValueError, match="tool-call-parser"):
        tool_parser_for("hermes2", template)


def plan(parser: ToolParser, parallel: bool = True) -> ToolPlan:
    return ToolPlan("auto", [], parser, None, parallel)


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    text = OUTPUTS["qwen"] % "{}"
    assert len(assistant_turn(text, None, plan(TOOL_PARSERS["qwen"]())).tool_calls) == 2
    assert [c.name for c in assistant_turn(text, None, plan(TOOL_PARSERS["qwen"](), False)).tool_calls] == [
        "get_weather"
    ]


# ---------------------------------------------------------------- reasoning

THINKING = "<think>\nThe user wants 2+2. That is 4.\n</think>\n\nThe answer is 4."


@pytest.mark.parametrize("name", ["qwen3", "deepseek-r1"])
def test_reasoning_split_whole(name: str) -> None:
    parser = REASONING_PARSERS[name]
    assert parser.split(THINKING) == ("\nThe user wants 2+2. That is 4.\n", "The answer is 4.")
    # DeepSeek-R1's template opens <think> in the prompt: the output starts inside the reasoning
    assert parser.split("Thinking.</think>Done.") == (
        ("Thinking.", "Done.") if name == "deepseek-r1" else (None, "Thinking.</think>Done.")
    )


def test_qwen3_without_thinking_is_all_content() -> None:
    assert REASONING_PARSERS["qwen3"].split("Just the answer.") == (None, "Just the answer.")


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
def test_reasoning_streamed_matches_whole(chunk_size: int) -> None:
    stream = AssistantStream(REASONING_PARSERS["qwen3"], None)
    deltas = []
    for start in range(0, len(THINKING), chunk_size):
        deltas += stream.push(THINKING[start : start + chunk_size])
    deltas += stream.push("", final=True)
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert reasoning == "".join(d.get("reasoning", "") for d in deltas)
    assert (reasoning, "".join(d.get("content", "") for d in deltas)) == REASONING_PARSERS["qwen3"].split(
        THINKING
    )


def test_reasoning_then_tool_call_streamed() -> None:
    text = "<think>need weather</think>\n" + OUTPUTS["qwen"] % "{}"
    stream = AssistantStream(REASONING_PARSERS["qwen3"], plan(TOOL_PARSERS["qwen"]()))
    deltas = [d for i in range(0, len(text), 4) for d in stream.push(text[i : i + 4])]
    deltas += stream.push("", final=True)
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "need weather"
    calls = reassemble([e for d in deltas for e in d.get("tool_calls", [])])
    assert [c["name"] for c in calls] == ["get_weather", "get_time"] and stream.made_calls
