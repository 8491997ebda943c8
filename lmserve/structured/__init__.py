"""Structured output: specs (spec.py), the grammar backend interface, xgrammar behind it, compile cache."""

from __future__ import annotations

from typing import Any

from lmserve.structured.spec import StructuredOutput, from_response_format

__all__ = ["StructuredOutput", "from_response_format", "check_structured", "make_backend"]


def make_backend(hf_tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> Any:
    """The grammar backend for a tokenizer (xgrammar, imported only when a request needs a grammar)."""
    from lmserve.structured.xgrammar_backend import XGrammarBackend

    return XGrammarBackend(hf_tokenizer, vocab_size, stop_token_ids)


def check_structured(spec: StructuredOutput) -> None:
    """Parse a spec without a tokenizer (front ends, before submitting); ValueError with the reason."""
    from lmserve.structured.xgrammar_backend import grammar_of

    grammar_of(spec)
