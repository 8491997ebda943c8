"""Tokenizer: the HF tokenizer of a ModelSource (folder or GGUF metadata) plus its chat template."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# transformers is imported where used (~1 s of CPU on the 2-core box): the engine core of a server starts
# without it (DeferredTokenizer). Even then AutoTokenizer and the model-specific classes are imported only where
# needed: `from transformers import AutoTokenizer` costs ~3x the rest of the import (its config and class maps),
# and a GGUF's tokenizer never needs it.
from lmserve.models.source import ModelSource, load_generation_defaults, read_json

TEMPLATES_DIR = Path(__file__).parent / "templates"


def builtin_chat_templates() -> tuple[str, ...]:
    """Names of the chat templates shipped in lmserve/models/templates."""
    return tuple(sorted(path.stem for path in TEMPLATES_DIR.glob("*.jinja")))


def load_chat_template(name_or_path: str) -> str:
    """A built-in template by name, or the text of a Jinja file; ValueError lists the built-in names."""
    builtin = TEMPLATES_DIR / f"{name_or_path}.jinja"
    if builtin.is_file():
        return builtin.read_text(encoding="utf-8").removesuffix("\n")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(
        f"chat_template={name_or_path!r} is neither a built-in template {list(builtin_chat_templates())} "
        "nor a path to a Jinja file"
    )


class Tokenizer:
    """Encode/decode and chat templating over an HF tokenizer (exposed as `hf` for detokenizing)."""

    def __init__(self, hf: Any, chat_template: str | None, eos_token_ids: tuple[int, ...], name: str) -> None:
        self._hf = hf
        self.chat_template = chat_template
        self._eos_token_ids = eos_token_ids
        self.name = name

    @property
    def hf(self) -> Any:
        return self._hf

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (base vocabulary plus added tokens)."""
        return len(self._hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._hf.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """Render `messages` to the prompt text; ValueError when the model has no chat template."""
        if self.chat_template is None:
            raise ValueError(
                f"{self.name} has no chat template; pass chat_template= one of "
                f"{list(builtin_chat_templates())} or a Jinja file"
            )
        return str(
            self._hf.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **template_kwargs,
            )
        )

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat; the template writes BOS itself, so none is added (as HF does).

        Tools, past calls and tool results go through the template's own `tools` argument; a template
        that knows no tools gets them written in Hermes style (what the qwen tool parser reads).
        """
        if tools or _has_tool_turns(messages):
            if self.renders_tools:
                kwargs["tools"] = tools or None
            else:
                messages = hermes_messages(messages, tools or [])
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template writes tools and tool turns itself."""
        return (
            self.chat_template is not None
            and "tools" in self.chat_template
            and "tool_calls" in self.chat_template
        )


_HERMES_TOOLS = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def _has_tool_turns(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def hermes_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools in the system prompt, calls as <tool_call> text, results as <tool_response> user turns (Qwen2.5's way)."""
    result = [_hermes_turn(m) for m in messages]
    if tools:
        prompt = _HERMES_TOOLS.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))
        if result and result[0]["role"] == "system":
            result[0] = {**result[0], "content": f"{result[0]['content']}\n\n{prompt}"}
        else:
            result.insert(0, {"role": "system", "content": prompt})
    return result


def _hermes_turn(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("role") == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.get('content', '')}\n</tool_response>"}
    if not message.get("tool_calls"):
        return message
    calls = [
        json.dumps(
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False
        )
        for c in message["tool_calls"]
    ]
    text = "".join(f"\n<tool_call>\n{call}\n</tool_call>" for call in calls)
    content = (message.get("content") or "") + text
    return {"role": "assistant", "content": content.lstrip("\n")}


def load_tokenizer(source: ModelSource, chat_template: str | None = None) -> Tokenizer:
    """The tokenizer of `source`; `chat_template` (built-in name or Jinja path) overrides the model's."""
    template = load_chat_template(chat_template) if chat_template is not None else None
    if source.kind == "gguf":
        hf = _load_gguf_tokenizer(source)
        name = str(source.gguf_path)
    else:
        hf = _load_folder_tokenizer(source.path)
        name = str(source.path)
    if template is None:
        template = _model_chat_template(hf)
    return Tokenizer(hf, template, _eos_token_ids(hf, source), name)


class DeferredTokenizer:
    """A tokenizer loaded on first use, its EOS ids read from the model's files at once.

    A server's engine core needs only the EOS ids to stop requests (its front end encodes and detokenizes);
    the tokenizer itself only on a first structured-output request (xgrammar reads its vocabulary). So the core
    starts without transformers' import and the tokenizer's load (~1.3 s of CPU on the 2-core box, on the
    path to the first answer). Made by `deferred_tokenizer` only where the files give the same EOS ids as the
    loaded tokenizer would (tests/models/test_tokenizer.py); anything else is delegated to the loaded one.
    """

    def __init__(
        self, source: ModelSource, chat_template: str | None, eos_token_ids: tuple[int, ...]
    ) -> None:
        self.source = source
        self.chat_template_name = chat_template
        self._eos_token_ids = eos_token_ids
        self._loaded: Tokenizer | None = None
        self._lock = threading.Lock()

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def hf(self) -> Any:
        return self.loaded().hf

    def loaded(self) -> Tokenizer:
        with self._lock:
            if self._loaded is None:
                self._loaded = load_tokenizer(self.source, self.chat_template_name)
            return self._loaded

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loaded(), name)


def deferred_tokenizer(
    source: ModelSource, chat_template: str | None = None
) -> Tokenizer | DeferredTokenizer:
    """A DeferredTokenizer where the EOS ids can be read from the files alone, else the loaded tokenizer."""
    eos_token_id = _eos_token_id_from_files(source)
    if eos_token_id is False:
        return load_tokenizer(source, chat_template)
    return DeferredTokenizer(source, chat_template, _with_generation_eos(eos_token_id, source))


def _eos_token_id_from_files(source: ModelSource) -> int | None | bool:
    """The id the loaded tokenizer's eos_token_id would be (None: it has none), or False where only loading
    it can tell (no tokenizer.json, a token the vocabulary lacks or holds twice, special_tokens_map.json)."""
    if source.kind == "gguf":
        from lmserve.models.gguf_file import read_gguf_file

        gguf = read_gguf_file(source.gguf_path)
        token_id = gguf.get("tokenizer.ggml.eos_token_id")
        if token_id is None:
            return None
        tokens = gguf.get("tokenizer.ggml.tokens")  # convert_gguf_tokenizer's eos_token is tokens[token_id]
        return int(token_id) if tokens is not None and tokens.count(tokens[token_id]) == 1 else False
    folder = source.path
    config_path, vocab_path = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not config_path.is_file() or not vocab_path.is_file() or (folder / "special_tokens_map.json").exists():
        return False
    config = read_json(config_path)
    if "eos_token" not in config or config.get("tokenizer_class") not in _FAST_CLASSES:
        return False
    token = config["eos_token"]
    if token is None:
        return None
    token = token.get("content") if isinstance(token, dict) else token
    vocab_file = read_json(vocab_path)
    ids = [item["id"] for item in vocab_file.get("added_tokens", []) if item.get("content") == token]
    vocab = (vocab_file.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and token in vocab:
        ids.append(vocab[token])
    elif isinstance(vocab, list):
        ids.extend(i for i, entry in enumerate(vocab) if entry and entry[0] == token)
    return int(ids[0]) if len(set(ids)) == 1 else False


_FAST_CLASSES = (
    "PreTrainedTokenizerFast",
    "TokenizersBackend",
    "LlamaTokenizerFast",
    "LlamaTokenizer",
    "GPT2Tokenizer",
    "GPT2TokenizerFast",
    "Qwen2Tokenizer",
    "Qwen2TokenizerFast",
)
"""tokenizer_class values whose eos_token_id is tokenizer.json's id of tokenizer_config.json's eos_token."""


def _load_gguf_tokenizer(source: ModelSource) -> Any:
    """Build the tokenizer from GGUF metadata once and keep it as an HF folder.

    The cache key is the file's path, size and mtime, so a changed file is converted again.
    Where the cache cannot be written, the tokenizer is simply rebuilt each time. The server's two processes
    (front end, engine core) both load it: an exclusive lock beside the entry makes one of them convert
    (~1.2 s of CPU on the 2-core box) while the other waits and reads what it wrote.
    """
    stat = source.gguf_path.stat()
    key = hashlib.sha256(f"{source.gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    cached = cache_dir() / "gguf-tokenizers" / key
    if (cached / "tokenizer_config.json").is_file():
        return _backend().from_pretrained(str(cached))  # the class convert_gguf_tokenizer made
    with _converting(cached):
        if (cached / "tokenizer_config.json").is_file():  # the other process converted it meanwhile
            return _backend().from_pretrained(str(cached))
        hf = convert_gguf_tokenizer(source)
        try:
            with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
                hf.save_pretrained(tmp)
                os.replace(tmp, cached)
                os.makedirs(tmp)  # TemporaryDirectory removes its path on exit
        except OSError:
            pass
    return hf


@contextlib.contextmanager
def _converting(cached: Path) -> Iterator[None]:
    """Hold `cached`'s lock file (fcntl, released by the kernel if the holder dies); no lock where it cannot be
    made (a read-only cache: then each process converts for itself)."""
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        lock = open(cached.with_name(cached.name + ".lock"), "a")  # noqa: SIM115 (closed below)
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def convert_gguf_tokenizer(source: ModelSource) -> Any:
    """The tokenizer AutoTokenizer builds from a GGUF (same backend, special tokens and template), 20x sooner.

    AutoTokenizer first derives the model config with gguf-py's GGUFReader (~7 s for SmolLM2's 49k-token
    vocabulary, ~25 s for Gemma 3's 262k) only to pick the tokenizer class; the conversion itself is done by
    transformers' architecture-aware builders, as `TokenizersBackend.from_pretrained(gguf_file=...)` does. The
    metadata comes from our own reader (models/gguf_file.py), not transformers', which imports torch: the
    server's front end never does (~0.8 s of a first start's CPU).
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer as build

    architecture, fields, config = gguf_tokenizer_fields(source.gguf_path)
    backend, extra = build(architecture, fields)
    return _backend()(
        tokenizer_object=backend,
        name_or_path=str(source.path),
        vocab_file=source.gguf_file,
        **config,
        **extra,
    )


def gguf_tokenizer_fields(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(architecture, tokenizer fields, tokenizer_config) as transformers' `get_gguf_tokenizer` reads them."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    from lmserve.models.gguf_file import read_gguf_file

    gguf = read_gguf_file(path)
    grouped = {
        group: {
            name: gguf.get(f"tokenizer.{key}")
            for key, name in renames.items()
            if f"tokenizer.{key}" in gguf.fields
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    fields, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if fields.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to a sentencepiece vocabulary by default
        config.setdefault("add_bos_token", True)
    elif fields.get("tokenizer_type") == "gemma4":  # its chat template writes <bos> itself
        config["add_bos_token"] = False
    for name, key in GGUF_SPECIAL_TOKENS.items():
        token_id = gguf.get(f"tokenizer.ggml.{key}")
        config[name] = fields["tokens"][token_id] if token_id is not None else None
    return str(gguf.get("general.architecture")), fields, config


GGUF_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}
"""transformers' get_gguf_tokenizer's map: special token -> its GGUF id key."""


def cache_dir() -> Path:
    """Where lmserve keeps derived files: $LMSERVE_CACHE_DIR, else ~/.cache/lmserve."""
    return Path(os.environ.get("LMSERVE_CACHE_DIR") or Path.home() / ".cache" / "lmserve")


def _model_chat_template(hf: Any) -> str | None:
    template = getattr(hf, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the unnamed one is "default"
        template = template.get("default")
    return template


def _eos_token_ids(hf: Any, source: ModelSource) -> tuple[int, ...]:
    return _with_generation_eos(hf.eos_token_id, source)


def _with_generation_eos(eos_token_id: int | None, source: ModelSource) -> tuple[int, ...]:
    """The tokenizer's EOS id, then generation_config.json's."""
    ids: list[int] = [] if eos_token_id is None else [int(eos_token_id)]
    generation_eos = load_generation_defaults(source).get("eos_token_id")
    if isinstance(generation_eos, int):
        ids.append(generation_eos)
    elif isinstance(generation_eos, list):
        ids.extend(int(i) for i in generation_eos)
    return tuple(dict.fromkeys(ids))


def _load_folder_tokenizer(folder: Path) -> Any:
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = read_json(config_path) if config_path.is_file() else {}
    tokenizer_class = tokenizer_config.get("tokenizer_class")
    if tokenizer_class and not _transformers_has(tokenizer_class):
        return _load_without_remote_code(folder, tokenizer_config, tokenizer_class)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _backend() -> Any:
    from transformers import TokenizersBackend

    return TokenizersBackend


def _transformers_has(class_name: str) -> bool:
    import transformers

    names = (class_name, class_name.removesuffix("Fast"))
    return any(getattr(transformers, name, None) is not None for name in names)


def _load_without_remote_code(folder: Path, tokenizer_config: dict[str, Any], class_name: str) -> Any:
    """A custom tokenizer class (InternLM2Tokenizer ...) rebuilt from its files, never running its code."""
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        raise FileNotFoundError(
            f"{folder}: tokenizer_class {class_name!r} is custom code, and there is no tokenizer.json "
            "or sentencepiece tokenizer.model to build it from"
        )
    # InternLM2Tokenizer is the sentencepiece Llama tokenizer (BOS added, no EOS) under another name.
    return LlamaTokenizer.from_pretrained(
        str(folder),
        add_bos_token=tokenizer_config.get("add_bos_token", True),
        add_eos_token=tokenizer_config.get("add_eos_token", False),
        add_prefix_space=_adds_dummy_prefix(model_file),
        legacy=False,
    )


def _adds_dummy_prefix(model_file: Path) -> bool:
    """Whether the sentencepiece model prepends a space to the text (its normalizer's add_dummy_prefix)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as error:  # protobuf's DecodeError
        raise ValueError(f"{model_file}: not a sentencepiece model ({error})") from error
    return bool(proto.normalizer_spec.add_dummy_prefix)
