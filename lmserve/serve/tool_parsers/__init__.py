"""Tool-call parsers (LMDeploy's --tool-call-parser names) and the choice of one from a chat template."""

from __future__ import annotations

from lmserve.serve.tool_parsers.base import ParsedOutput, ToolCall, ToolCallStream, ToolParser
from lmserve.serve.tool_parsers.formats import InternLMToolParser, Llama3ToolParser, QwenToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "qwen": QwenToolParser,
    "internlm": InternLMToolParser,
    "llama3": Llama3ToolParser,
}

__all__ = ["TOOL_PARSERS", "ParsedOutput", "ToolCall", "ToolCallStream", "ToolParser", "tool_parser_for"]


def tool_parser_for(name: str | None, chat_template: str | None) -> ToolParser:
    """The parser named by --tool-call-parser, else the one the chat template's call syntax shows.

    A template without a call syntax of its own gets Hermes (qwen): the tokenizer renders tools that way.
    """
    if name is not None:
        if name not in TOOL_PARSERS:
            raise ValueError(f"--tool-call-parser={name!r} must be one of {sorted(TOOL_PARSERS)}")
        return TOOL_PARSERS[name]()
    template = chat_template or ""
    if "<|plugin|>" in template or "<|action_start|>" in template:
        return InternLMToolParser()
    if "<|python_tag|>" in template or "ipython" in template:
        return Llama3ToolParser()
    return QwenToolParser()
