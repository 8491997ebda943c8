"""Structured output: specs (spec.py), the grammar backend interface, xgrammar behind it, compile cache."""

from __future__ import annotations

from typing import Any

from lmserve.structured.spec import StructuredOutput, from_response_format

__all__ = [
    "StructuredOutput",
    "check_structured",
    "from_response_format",
    "make_backend",
    "tool_call_grammar",
]


def make_backend(hf_tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> Any:
    """The grammar backend for a tokenizer (xgrammar, imported only when a request needs a grammar)."""
    from lmserve.structured.xgrammar_backend import XGrammarBackend

    return XGrammarBackend(hf_tokenizer, vocab_size, stop_token_ids)


def check_structured(spec: StructuredOutput) -> None:
    """Parse a spec without a tokenizer (front ends, before submitting); ValueError with the reason."""
    from lmserve.structured.xgrammar_backend import grammar_of

    grammar_of(spec)


def tool_call_grammar(
    call_schemas: list[dict[str, Any]], call_start: str, call_end: str, separator: str | None
) -> StructuredOutput:
    """`call_start` JSON `call_end` once, or (a separator given) one or more times; JSON of one of the schemas."""
    from lmserve.structured.xgrammar_backend import repeated_calls_ebnf

    return StructuredOutput("grammar", repeated_calls_ebnf(call_schemas, call_start, call_end, separator))
