"""StructuredOutput: what a request's output must match (JSON schema, regex, choice, EBNF), as plain data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

StructuredKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
STRUCTURED_KINDS: tuple[str, ...] = ("json_object", "json_schema", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """One output constraint; hashable, so it keys the compiled-grammar cache and crosses to the core as is.

    `spec` holds the constraint as text: the JSON schema (json_schema), the regex, the JSON list of
    choices (choice), the EBNF grammar (grammar); empty for json_object (any JSON object).
    """

    kind: StructuredKind
    spec: str = ""
    start_after_token_id: int | None = None
    """The grammar applies only after this token (a reasoning model's `</think>`); None: from the first token."""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"response_format kind={self.kind!r} must be one of {list(STRUCTURED_KINDS)}")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> StructuredOutput:
        text = schema if isinstance(schema, str) else json.dumps(schema)  # key order is the output's order
        return cls("json_schema", text)

    @classmethod
    def choice(cls, choices: list[str]) -> StructuredOutput:
        return cls("choice", json.dumps(list(choices)))

    @property
    def choices(self) -> list[str]:
        assert self.kind == "choice"
        return list(json.loads(self.spec))


def from_response_format(value: StructuredOutput | dict[str, Any] | None) -> StructuredOutput | None:
    """OpenAI's response_format dict ({"type": "json_schema", "json_schema": {"schema": ...}} ...) or ours.

    ValueError naming the field for a shape we do not know; `{"type": "text"}` is no constraint (None).
    """
    if value is None or isinstance(value, StructuredOutput):
        return value
    if not isinstance(value, dict):
        raise ValueError(
            f"response_format={value!r} must be a StructuredOutput or an OpenAI response_format dict"
        )
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        return StructuredOutput.json_schema(_schema_of(value.get("json_schema")))
    if kind in ("regex", "grammar") and isinstance(value.get(kind), str):
        return StructuredOutput(kind, value[kind])
    if kind == "choice" and _is_string_list(value.get("choice")):
        return StructuredOutput.choice(value["choice"])
    raise ValueError(
        f"response_format type={kind!r} must be one of ['text', 'json_object', 'json_schema', 'regex', "
        "'choice', 'grammar'] (json_schema with a json_schema.schema object; regex/grammar/choice with "
        "a field of that name)"
    )


def _schema_of(json_schema: Any) -> dict[str, Any]:
    if not isinstance(json_schema, dict) or not isinstance(json_schema.get("schema"), dict):
        raise ValueError("response_format.json_schema must be an object with a 'schema' object")
    return dict(json_schema["schema"])


def _is_string_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, str) for item in value)
