"""Incremental detokenization: UTF-8-safe streaming text and stop strings, O(new tokens) per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmserve.generation import FinishReason, GenerationConfig

PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens decoded in front of the output, so the first output token gets its leading space."""

REPLACEMENT_CHAR = "\ufffd"


class StopStringMatcher:
    """Finds stop strings in streamed text, holding back any tail that could start one."""

    def __init__(self, stop_words: tuple[str, ...], include_stop_str_in_output: bool) -> None:
        self.stop_words = tuple(word for word in stop_words if word)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        """Text that is now safe to emit; sets `stopped` and cuts the text when a stop string completes."""
        if self.stopped or not self.stop_words:
            return "" if self.stopped else text
        held = self._held + text
        cut = self._find_stop(held)
        if cut is not None:
            self.stopped, self._held = True, ""
            return held[:cut]
        num_held = self._partial_match_length(held)
        self._held = held[len(held) - num_held :]
        return held[: len(held) - num_held]

    def flush(self) -> str:
        """Release the held-back tail (generation ended for another reason)."""
        text, self._held = self._held, ""
        return text

    def _find_stop(self, text: str) -> int | None:
        """Cut position for the stop string that completes first in text (the longest on a tie)."""
        best: tuple[int, int] | None = None  # (end, start)
        for word in self.stop_words:
            start = text.find(word)
            if start >= 0 and (best is None or (start + len(word), start) < best):
                best = (start + len(word), start)
        if best is None:
            return None
        return best[0] if self.include_stop_str_in_output else best[1]

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        longest = 0
        for word in self.stop_words:
            for length in range(min(len(word) - 1, len(text)), longest, -1):
                if text.endswith(word[:length]):
                    longest = length
                    break
        return longest


class IncrementalDetokenizer:
    """Turns one request's token ids into text as they arrive (the vLLM prefix/read-offset method).

    The text is decoded in a small window: `prefix_offset..read_offset` is text already emitted,
    decoded again only so the new tokens join it correctly (spaces, merged bytes). Text ending in
    U+FFFD is an unfinished UTF-8 character and waits for the next token. The last few prompt
    tokens seed the window, so a SentencePiece first token keeps its leading space as in vLLM; for
    byte-level BPE tokenizers the result is exactly `tokenizer.decode(output_ids)`.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], gen_config: GenerationConfig) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = gen_config.skip_special_tokens
        self.spaces_between_special_tokens = gen_config.spaces_between_special_tokens
        self._special_ids = _special_token_ids(tokenizer)
        self._added_tokens = _added_tokens_needing_own_segment(tokenizer)
        self._tokens = self._prompt_context(prompt_token_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._stop = StopStringMatcher(gen_config.stop_words, gen_config.include_stop_str_in_output)
        self.output_text = ""

    @property
    def stopped(self) -> bool:
        """True once a stop string appeared; later steps return ""."""
        return self._stop.stopped

    def step(self, new_token_ids: list[int]) -> str:
        """Newly stable text after these tokens (stop strings cut, possible stop prefixes held back)."""
        if self.stopped:
            return ""
        self._tokens.extend(self._to_tokens(new_token_ids))
        return self._emit(self._stop.push(self._read_new_text(final=False)))

    def finish(self) -> str:
        """Release everything held back: unfinished characters and partial stop strings."""
        if self.stopped:
            return ""
        text = self._stop.push(self._read_new_text(final=True))
        return self._emit(text + self._stop.flush())

    def _emit(self, text: str) -> str:
        self.output_text += text
        return text

    def _read_new_text(self, final: bool) -> str:
        """Text of the tokens after read_offset; "" while it ends in half a character (unless final)."""
        prefix_text = self._to_string(self._tokens[self._prefix_offset : self._read_offset])
        full_text = self._to_string(self._tokens[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or (full_text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return full_text[len(prefix_text) :]

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[str]:
        context = self._to_tokens(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # a prompt that ends inside a character would glue its bytes to the output's: no context then
        return [] if self._to_string(context).endswith(REPLACEMENT_CHAR) else context

    def _to_tokens(self, token_ids: list[int]) -> list[str]:
        if self.skip_special_tokens:
            token_ids = [token_id for token_id in token_ids if token_id not in self._special_ids]
        return list(self.tokenizer.convert_ids_to_tokens(token_ids))

    def _to_string(self, tokens: list[str]) -> str:
        if not self._added_tokens:
            return str(self.tokenizer.convert_tokens_to_string(tokens))
        return self._to_string_with_added_tokens(tokens)

    def _to_string_with_added_tokens(self, tokens: list[str]) -> str:
        """Slow tokenizers: added tokens are decoded apart from the text around them (HF 4.x, vLLM)."""
        segments: list[str] = []
        pending: list[str] = []
        for token in tokens:
            if token not in self._added_tokens:
                pending.append(token)
                continue
            if pending:
                segments.append(self.tokenizer.convert_tokens_to_string(pending))
                pending = []
            segments.append(token)
        if pending:
            segments.append(self.tokenizer.convert_tokens_to_string(pending))
        return (" " if self.spaces_between_special_tokens else "").join(segments)


def _special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that decode(skip_special_tokens=True) drops: the named specials and added tokens marked special."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    marked = {token_id for token_id, token in added.items() if getattr(token, "special", False)}
    return frozenset(set(tokenizer.all_special_ids) | marked)


def _added_tokens_needing_own_segment(tokenizer: Any) -> frozenset[str]:
    """Added tokens of a slow tokenizer (fast tokenizers decode them inline, ignoring the spacing flag)."""
    if getattr(tokenizer, "is_fast", True):
        return frozenset()
    return frozenset(tokenizer.get_added_vocab())


@dataclass(frozen=True)
class TextDelta:
    """What a batch of new tokens adds to a request's text."""

    text: str
    num_tokens: int
    """How many of the pushed tokens belong to the output (fewer when a stop string ended it early)."""
    finish_reason: FinishReason | None


class TextStream:
    """One request's text as its tokens arrive: incremental detokenization, stop strings, the final flush.

    The one stop/detokenize implementation: the in-process engine pushes one token per step, the front end
    of an engine-core process pushes whatever arrived since the client last read (several tokens when it
    fell behind). The end comes from the engine (`finish_reason`: a stop token, the length limit) or from a
    stop string found here; in that case the caller ends the request in the engine.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], gen_config: GenerationConfig) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, gen_config)
        self._token_by_token = bool(gen_config.stop_words)

    @property
    def stopped(self) -> bool:
        """True once a stop string ended the text."""
        return self._detokenizer.stopped

    def push(self, token_ids: list[int], finish_reason: FinishReason | None) -> TextDelta:
        """Text of new tokens; finish_reason 'stop' from the engine means the last token is the stop token."""
        if self.stopped:
            return TextDelta("", 0, "stop")
        visible = token_ids[:-1] if finish_reason == "stop" else token_ids
        if self._token_by_token:
            text, num_read = self._push_until_stop_string(visible)
            if self.stopped:
                return TextDelta(text, num_read, "stop")
        else:
            text = self._detokenizer.step(visible) if visible else ""
        if finish_reason in ("stop", "length"):
            text += self._detokenizer.finish()
        return TextDelta(text, len(token_ids), finish_reason)

    def _push_until_stop_string(self, token_ids: list[int]) -> tuple[str, int]:
        """One token at a time, so the output ends at the token that completes a stop string."""
        pieces = []
        for index, token_id in enumerate(token_ids):
            pieces.append(self._detokenizer.step([token_id]))
            if self.stopped:
                return "".join(pieces), index + 1
        return "".join(pieces), len(token_ids)
