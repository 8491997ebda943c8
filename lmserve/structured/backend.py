"""The grammar backend interface: compile a StructuredOutput once, then one matcher per sequence."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from lmserve.structured.spec import StructuredOutput


class SequenceMatcher(Protocol):
    """One sequence's place in its grammar (no rollback: the engine never takes a sampled token back)."""

    def accept_token(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar forbids it (the mask should have prevented it)."""
        ...

    def is_terminated(self) -> bool:
        """The grammar has accepted a stop token: the sequence is complete."""
        ...


class GrammarBackend(Protocol):
    """A grammar library behind the engine (xgrammar; llguidance could be a second)."""

    def compile(self, spec: StructuredOutput) -> Any:
        """The tokenizer-specific compiled grammar (expensive; thread-safe, run off the engine loop)."""
        ...

    def matcher(self, compiled: Any) -> SequenceMatcher: ...

    def fill_bitmask(self, matchers: list[SequenceMatcher], rows: list[int], num_rows: int) -> torch.Tensor:
        """int32[num_rows, words]: the allowed next tokens of each matcher in its row (other rows: all)."""
        ...

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Set the disallowed tokens of the given rows to -inf, in place."""
        ...
