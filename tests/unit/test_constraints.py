"""Request fields -> StructuredOutput / ToolPlan: the tool grammar accepts exactly well-formed calls of the
listed tools (checked by xgrammar's own matcher on strings), and bad shapes are 400s naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
import xgrammar as xgr

from lmserve.serve.constraints import structured_output_of, tool_plan
from lmserve.serve.errors import APIError
from lmserve.serve.tool_parsers import TOOL_PARSERS
from lmserve.structured import StructuredOutput, from_response_format
from lmserve.structured.xgrammar_backend import grammar_of

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
# a character vocabulary: enough for xgrammar to match strings against a grammar, no tokenizer needed
CHAR_INFO = xgr.TokenizerInfo([chr(c) for c in range(32, 127)] + ["\n", "</s>"], stop_token_ids=[96])


def accepts(spec: StructuredOutput, text: str) -> bool:
    compiled = xgr.GrammarCompiler(CHAR_INFO).compile_grammar(grammar_of(spec))
    matcher = xgr.GrammarMatcher(compiled)
    return bool(matcher.accept_string(text)) and matcher.is_completed()


def call(name: str, arguments: dict[str, Any]) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def test_required_grammar_accepts_listed_calls_only() -> None:
    grammar = tool_plan(TOOLS, "required", True, TOOL_PARSERS["qwen"]()).grammar
    assert grammar is not None
    assert accepts(grammar, call("get_weather", {"city": "Oslo"}))
    assert accepts(grammar, call("get_weather", {"city": "Oslo"}) + "\n" + call("get_time", {}))
    assert not accepts(grammar, call("get_weather", {"town": "Oslo"}))  # city is required
    assert not accepts(grammar, call("send_mail", {}))
    assert not accepts(grammar, "Sure, " + call("get_time", {}))


def test_named_and_non_parallel_allow_one_call() -> None:
    named = tool_plan(
        TOOLS, {"type": "function", "function": {"name": "get_time"}}, True, TOOL_PARSERS["qwen"]()
    )
    assert named.mode == "required" and [t["function"]["name"] for t in named.tools] == ["get_time"]
    assert named.grammar is not None and accepts(named.grammar, call("get_time", {}))
    assert not accepts(named.grammar, call("get_time", {}) + "\n" + call("get_time", {}))
    assert not accepts(named.grammar, call("get_weather", {"city": "Oslo"}))
    single = tool_plan(TOOLS, "required", False, TOOL_PARSERS["qwen"]()).grammar
    assert single is not None and not accepts(single, call("get_time", {}) + "\n" + call("get_time", {}))


def test_allowed_tools_narrow_the_tools() -> None:
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [TOOLS[1]]}}
    plan = tool_plan(TOOLS, choice, True, TOOL_PARSERS["qwen"]())
    assert plan.mode == "auto" and plan.grammar is None and plan.tools == [TOOLS[1]]
    assert tool_plan(TOOLS, "none", True, TOOL_PARSERS["qwen"]()).tools == []


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
        (TOOLS, {"type": "function", "function": 5}, "tool_choice.function.name"),
        (
            TOOLS,
            {"type": "allowed_tools", "allowed_tools": {"mode": "all", "tools": TOOLS}},
            "tool_choice.mode",
        ),
        (TOOLS, "sometimes", "tool_choice"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
            "auto",
            "tools.0.function.parameters",
        ),
        ([{"type": "retrieval"}], "auto", "tools.0.type"),
        (None, "required", "tool_choice"),
    ],
)
def test_bad_tool_fields_name_the_field(tools: Any, choice: Any, param: str) -> None:
    with pytest.raises(APIError) as raised:
        tool_plan(tools, choice, True, TOOL_PARSERS["qwen"]())
    assert raised.value.status_code == 400 and raised.value.param == param


def test_one_constraint_per_request() -> None:
    regex = structured_output_of(None, None, "[0-9]+")
    assert regex == StructuredOutput("regex", "[0-9]+") and accepts(regex, "123")
    choice = structured_output_of(None, {"choice": ["a b", "c"]}, None)
    assert choice is not None and accepts(choice, "a b") and not accepts(choice, "a")
    assert structured_output_of({"type": "text"}, None, None) is None
    with pytest.raises(APIError) as raised:
        structured_output_of({"type": "json_object"}, None, "[0-9]")
    assert raised.value.param == "regex_schema"


def test_python_api_takes_openai_response_format() -> None:
    spec = from_response_format({"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}})
    assert spec == StructuredOutput.json_schema(WEATHER)
    assert accepts(spec, '{"city": "Oslo"}') and not accepts(spec, '{"town": "Oslo"}')
    with pytest.raises(ValueError, match="response_format"):
        from_response_format({"type": "yaml"})
