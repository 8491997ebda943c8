"""The call syntaxes of LMDeploy's --tool-call-parser names: qwen (Hermes), internlm, llama3."""

from __future__ import annotations

from lmserve.serve.tool_parsers.base import CallRegion, ToolParser, partial_suffix, scan_json_value


class QwenToolParser(ToolParser):
    """Hermes style, Qwen2.5/Qwen3 and ChatML models: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>."""

    name = "qwen"
    call_start = "<tool_call>"
    call_end = "</tool_call>"
    arguments_key = "arguments"
    grammar_call_start = "<tool_call>\n"
    grammar_call_end = "\n</tool_call>"


class InternLMToolParser(ToolParser):
    """InternLM2/2.5: <|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>."""

    name = "internlm"
    call_start = "<|action_start|><|plugin|>"
    call_end = "<|action_end|>"
    arguments_key = "parameters"
    markers_are_special = True
    grammar_call_start = "<|action_start|><|plugin|>\n"
    grammar_call_end = "<|action_end|>"


class Llama3ToolParser(ToolParser):
    """Llama 3.1+: <|python_tag|> then JSON calls separated by ';', or an output that starts with '{'."""

    name = "llama3"
    call_start = "<|python_tag|>"
    call_end = ""
    arguments_key = "parameters"
    markers_are_special = True
    call_separator = "; "

    def regions(self, text: str) -> tuple[list[CallRegion], int]:
        tag = text.find(self.call_start)
        if tag >= 0:
            content_end, position = tag, tag + len(self.call_start)
        elif text.lstrip().startswith("{") or not text.strip():
            content_end, position = 0, 0
        else:
            return [], len(text) - partial_suffix(text, self.call_start)
        return self._calls_from(text, position), content_end

    @staticmethod
    def _calls_from(text: str, position: int) -> list[CallRegion]:
        regions = []
        start = text.find("{", position)
        while start >= 0:
            value, complete = scan_json_value(text, start)
            if not complete:
                regions.append(CallRegion(start, None))
                break
            end = start + len(value)
            regions.append(CallRegion(start, end))
            separator = text.find(";", end)
            start = -1 if separator < 0 else text.find("{", separator)
        return regions
