"""xgrammar behind GrammarBackend: JSON schema / regex / choice / EBNF grammars and its bitmask kernels."""

from __future__ import annotations

import json
import re
from typing import Any

import torch
import xgrammar as xgr

from lmserve.structured.spec import StructuredOutput

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; the rest is for people
_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")
_ANY_OBJECT = '{"type": "object"}'
SERIAL_FILL_ROWS = 16
"""Up to this many rows one thread fills faster (16 JSON rows: 0.14 ms serial vs 0.31 ms on the pool, 2-core CPU)."""
_ROOT_RULE = re.compile(r"\broot\b")


def grammar_of(spec: StructuredOutput) -> xgr.Grammar:
    """The xgrammar Grammar of a spec; ValueError with xgrammar's reason when it does not parse."""
    try:
        return _parse(spec)
    except Exception as error:  # xgrammar raises RuntimeError mostly, others for odd JSON: all mean "invalid"
        raise ValueError(_LOCATION.sub("", str(error)).strip()) from error


def _parse(spec: StructuredOutput) -> xgr.Grammar:
    if spec.kind in ("json_object", "json_schema"):
        # compact JSON (no free whitespace): small models otherwise emit newlines until max_tokens
        schema = spec.spec if spec.kind == "json_schema" else _ANY_OBJECT
        return xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
    if spec.kind == "regex":
        return xgr.Grammar.from_regex(spec.spec)
    if spec.kind == "choice":
        alternatives = " | ".join(json.dumps(choice) for choice in spec.choices)
        return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
    return xgr.Grammar.from_ebnf(spec.spec)


def repeated_calls_ebnf(
    call_schemas: list[dict[str, Any]], call_start: str, call_end: str, separator: str | None
) -> str:
    """EBNF of tool calls in a model's own syntax: the calls' JSON grammar renamed, wrapped in the markers."""
    schema = call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas}
    json_rules = _ROOT_RULE.sub(
        "call_json", str(grammar_of(StructuredOutput("json_schema", json.dumps(schema))))
    )
    markers = [
        json.dumps(call_start) if call_start else "",
        "call_json",
        json.dumps(call_end) if call_end else "",
    ]
    call = " ".join(part for part in markers if part)
    more = f" ({json.dumps(separator)} {call})*" if separator is not None else ""
    return f"root ::= {call}{more}\n{json_rules}"


class XGrammarMatcher:
    """An xgrammar GrammarMatcher seen through SequenceMatcher."""

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self.inner = matcher

    def accept_token(self, token_id: int) -> bool:
        return bool(self.inner.accept_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self.inner.is_terminated())


class XGrammarBackend:
    """Compiles for one tokenizer; `vocab_size` is the model's logits width (may exceed the tokenizer's)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        info = xgr.TokenizerInfo.from_huggingface(
            hf_tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        self.batch_matcher = xgr.BatchGrammarMatcher(max_threads="auto")

    def compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        return self.compiler.compile_grammar(grammar_of(spec))

    def matcher(self, compiled: xgr.CompiledGrammar) -> XGrammarMatcher:
        return XGrammarMatcher(xgr.GrammarMatcher(compiled))

    def fill_bitmask(self, matchers: list[Any], rows: list[int], num_rows: int) -> torch.Tensor:
        bitmask = xgr.allocate_token_bitmask(num_rows, self.vocab_size)
        inner = [matcher.inner for matcher in matchers]
        if len(inner) <= SERIAL_FILL_ROWS:
            for matcher, row in zip(inner, rows, strict=True):
                matcher.fill_next_token_bitmask(bitmask, row)
        else:  # xgrammar's thread pool fills the rows in parallel (batch 64 on a GPU host)
            self.batch_matcher.batch_fill_next_token_bitmask(inner, bitmask, rows)
        return bitmask

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        bitmask = bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=rows)
