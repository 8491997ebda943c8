"""SequenceGrammar: one sequence's matcher, active from the first token or after its reasoning ends."""

from __future__ import annotations

from typing import Any

from lmserve.structured.backend import GrammarBackend, SequenceMatcher


class SequenceGrammar:
    """Feeds a sequence's sampled tokens to its matcher once the grammar has started.

    With `start_after_token_id` (a thinking model's `</think>`) the model writes freely until it
    samples that token; the mask and the matcher apply to what follows.
    """

    def __init__(
        self, backend: GrammarBackend, matcher: SequenceMatcher, start_after_token_id: int | None = None
    ) -> None:
        self.backend = backend
        self.matcher = matcher
        self.start_after_token_id = start_after_token_id
        self.active = start_after_token_id is None

    def advance(self, token_id: int) -> bool:
        """Take one sampled token; True when the grammar is done (terminated, or it cannot go on)."""
        if not self.active:
            self.active = token_id == self.start_after_token_id
            return False
        if not self.matcher.accept_token(token_id):
            return True  # only when no allowed token could be sampled: end rather than run unconstrained
        return self.matcher.is_terminated()


def compiled_matcher(
    backend: GrammarBackend, compiled: Any, start_after_token_id: int | None
) -> SequenceGrammar:
    return SequenceGrammar(backend, backend.matcher(compiled), start_after_token_id)
