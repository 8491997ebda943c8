"""Request fields that constrain the output (response_format, vLLM's structured_outputs, LMDeploy's
regex_schema) and tool choices, turned into a StructuredOutput or a ToolPlan; 400s name the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from lmserve.serve.errors import APIError
from lmserve.serve.tool_parsers import ToolParser
from lmserve.structured import StructuredOutput, check_structured, tool_call_grammar

ToolMode = Literal["none", "auto", "required"]
_STRUCTURED_OUTPUT_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def checked(spec: StructuredOutput, param: str) -> StructuredOutput:
    """The spec if the grammar library can parse it; 400 naming `param` with its reason otherwise."""
    try:
        check_structured(spec)
    except ValueError as error:
        raise APIError(400, f"{param} is not a valid {spec.kind}: {error}", param) from error
    return spec


def structured_output_of(
    response_format: dict[str, Any] | None,
    structured_outputs: dict[str, Any] | None,
    regex_schema: str | None,
) -> StructuredOutput | None:
    """The one output constraint of a request (at most one of the three fields may set one)."""
    given = {
        "response_format": _from_response_format(response_format) if response_format else None,
        "structured_outputs": _from_structured_outputs(structured_outputs) if structured_outputs else None,
        "regex_schema": StructuredOutput("regex", regex_schema) if regex_schema is not None else None,
    }
    named = {param: spec for param, spec in given.items() if spec is not None}
    if len(named) > 1:
        raise APIError(400, f"give one output constraint, not all of {list(named)}", list(named)[1])
    for param, spec in named.items():
        return checked(spec, param)
    return None


def _from_response_format(value: dict[str, Any]) -> StructuredOutput | None:
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind != "json_schema":
        message = f"response_format.type={kind!r} must be one of ['text', 'json_object', 'json_schema']"
        raise APIError(400, message, "response_format.type")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        message = (
            "response_format.json_schema must be an object {name, schema, strict} with a 'schema' object"
        )
        raise APIError(400, message, "response_format.json_schema")
    if not isinstance(spec.get("name", ""), str) or not isinstance(
        spec.get("strict", False), (bool, type(None))
    ):
        raise APIError(
            400, "json_schema.name must be a string, strict a boolean", "response_format.json_schema"
        )
    # strict false still enforces the schema: a stricter answer is still a right one
    return StructuredOutput.json_schema(spec.get("schema", {"type": "object"}))


def _from_structured_outputs(value: dict[str, Any]) -> StructuredOutput:
    keys = [key for key in _STRUCTURED_OUTPUT_KEYS if value.get(key) not in (None, False)]
    if len(keys) != 1:
        message = f"structured_outputs must set exactly one of {list(_STRUCTURED_OUTPUT_KEYS)}, got {keys}"
        raise APIError(400, message, "structured_outputs")
    key = keys[0]
    item = value[key]
    param = f"structured_outputs.{key}"
    if key == "json":
        if isinstance(item, str):
            item = _json_text(item, param)
        if not isinstance(item, dict):
            raise APIError(400, f"{param} must be a JSON schema object", param)
        return StructuredOutput.json_schema(item)
    if key == "json_object":
        return StructuredOutput("json_object")
    if key == "choice":
        if not isinstance(item, list) or not item or not all(isinstance(c, str) and c for c in item):
            raise APIError(400, f"{param} must be a non-empty list of non-empty strings", param)
        return StructuredOutput.choice(item)
    if not isinstance(item, str):
        raise APIError(400, f"{param} must be a string", param)
    return StructuredOutput(key, item)  # type: ignore[arg-type]


def _json_text(text: str, param: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise APIError(400, f"{param} is not JSON: {error}", param) from error


# ---------------------------------------------------------------- tools


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools do: which are shown to the model, whether calls are parsed, the grammar."""

    mode: ToolMode
    tools: list[dict[str, Any]]
    """The tools the chat template renders (OpenAI's shape), [] when mode is none."""
    parser: ToolParser | None
    grammar: StructuredOutput | None
    """Set for tool_choice required or a named function: the output is calls, always parseable."""
    parallel: bool


def tool_plan(
    tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None, parser: ToolParser
) -> ToolPlan:
    """Check tools and tool_choice (OpenAI's shapes plus allowed_tools) and plan the request."""
    parallel = parallel_tool_calls is not False
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        return ToolPlan("none", [], None, None, parallel)
    functions = {_function_name(tool, i): tool for i, tool in enumerate(tools)}
    mode, names = _choice(tool_choice, functions)
    if mode == "none":
        return ToolPlan("none", [], None, None, parallel)
    chosen = [functions[name] for name in names]
    grammar = None
    if mode == "required":
        grammar = _calls_grammar(chosen, parser, parallel and not _is_named(tool_choice))
    return ToolPlan(mode, chosen, parser, grammar, parallel)


def _is_named(tool_choice: Any) -> bool:
    """A named function: exactly one call of it (parallel_tool_calls cannot add more)."""
    return isinstance(tool_choice, dict) and tool_choice.get("type") == "function"


def _function_name(tool: Any, index: int) -> str:
    param = f"tools.{index}"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise APIError(400, f"{param} must be {{'type': 'function', 'function': {{...}}}}", f"{param}.type")
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise APIError(
            400, f"{param}.function must be an object with a non-empty 'name'", f"{param}.function"
        )
    parameters = function.get("parameters", {"type": "object"})
    if not isinstance(parameters, dict):
        raise APIError(
            400, f"{param}.function.parameters must be a JSON schema object", f"{param}.function.parameters"
        )
    checked(StructuredOutput.json_schema(parameters), f"{param}.function.parameters")
    return str(function["name"])


def _choice(tool_choice: Any, functions: dict[str, Any]) -> tuple[ToolMode, list[str]]:
    """(mode, names of the tools the model may call)."""
    if tool_choice is None or tool_choice in ("none", "auto", "required"):
        return (tool_choice or "auto"), list(functions)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        return "required", [_listed(_function_name_of(tool_choice), functions, "tool_choice.function.name")]
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "allowed_tools":
        allowed = tool_choice.get("allowed_tools", tool_choice)
        if not isinstance(allowed, dict):
            raise APIError(400, "tool_choice.allowed_tools must be an object {mode, tools}", "tool_choice")
        mode = allowed.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise APIError(
                400, f"allowed_tools mode={mode!r} must be 'auto' or 'required'", "tool_choice.mode"
            )
        entries = allowed.get("tools")
        if not isinstance(entries, list) or not entries:
            raise APIError(400, "allowed_tools.tools must be a non-empty list", "tool_choice.tools")
        names = [_function_name_of(entry) for entry in entries]
        return mode, [_listed(name, functions, "tool_choice.tools") for name in names]
    message = (
        "tool_choice must be 'none', 'auto', 'required', a function {type, function: {name}} or allowed_tools"
    )
    raise APIError(400, message, "tool_choice")


def _function_name_of(entry: Any) -> Any:
    """The name in {type: function, function: {name}}, or None when the shape is not that."""
    function = entry.get("function") if isinstance(entry, dict) else None
    return function.get("name") if isinstance(function, dict) else None


def _listed(name: Any, functions: dict[str, Any], param: str) -> str:
    if not isinstance(name, str) or name not in functions:
        raise APIError(400, f"tool_choice names {name!r}, which is not in tools {sorted(functions)}", param)
    return str(name)


def _calls_grammar(tools: list[dict[str, Any]], parser: ToolParser, parallel: bool) -> StructuredOutput:
    """The model's own call syntax around JSON {"name": one of the tools, arguments: its parameters}."""
    schemas = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool["function"]["name"]},
                parser.arguments_key: tool["function"].get("parameters", {"type": "object"}),
            },
            "required": ["name", parser.arguments_key],
        }
        for tool in tools
    ]
    separator = parser.call_separator if parallel else None
    grammar = tool_call_grammar(schemas, parser.grammar_call_start, parser.grammar_call_end, separator)
    return checked(grammar, "tools")
