"""Pipeline: LMDeploy's offline Python API over the synchronous engine (batch, chat messages, streaming)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Union

from lmserve.config import EngineConfig
from lmserve.engine.engine import LLMEngine
from lmserve.generation import GenerationConfig, Response

Messages = list[dict[str, Any]]
Prompt = Union[str, Messages]
EmbedInput = Union[str, list[int]]


class Pipeline:
    """`pipe = pipeline(model); pipe("hi")`, `pipe([...])`, `pipe.stream_infer(...)`.

    A string prompt is wrapped as one user message and rendered with the model's chat
    template (as LMDeploy does); pass `do_preprocess=False` to send raw text.
    """

    def __init__(
        self,
        model: str | None = None,
        backend_config: EngineConfig | None = None,
        chat_template: str | None = None,
        engine: LLMEngine | None = None,
    ) -> None:
        self.engine = engine or LLMEngine.from_pretrained(model, backend_config, chat_template)
        self.tokenizer = self.engine.tokenizer

    def __call__(
        self,
        prompts: Prompt | Sequence[Prompt],
        gen_config: GenerationConfig | None = None,
        do_preprocess: bool = True,
        adapter_name: str | None = None,
    ) -> Response | list[Response]:
        return self.infer(prompts, gen_config, do_preprocess, adapter_name)

    def infer(
        self,
        prompts: Prompt | Sequence[Prompt],
        gen_config: GenerationConfig | None = None,
        do_preprocess: bool = True,
        adapter_name: str | None = None,
    ) -> Response | list[Response]:
        """Generate for one prompt (returns a Response) or a batch (returns a list, in order); `adapter_name`
        (LMDeploy's) runs them with one of `backend_config.adapters` (as GenerationConfig.adapter_name)."""
        single = _is_single(prompts)
        batch = _as_batch(prompts)
        responses: dict[str, Response] = {}
        for _ in self._run(batch, self._config(gen_config, adapter_name), do_preprocess, responses):
            pass
        ordered = list(responses.values())
        return ordered[0] if single else ordered

    def stream_infer(
        self,
        prompts: Prompt | Sequence[Prompt],
        gen_config: GenerationConfig | None = None,
        do_preprocess: bool = True,
        adapter_name: str | None = None,
    ) -> Iterator[Response]:
        """Yield a Response per output delta: `text` is the new text, `index` the prompt's position."""
        yield from self._run(_as_batch(prompts), self._config(gen_config, adapter_name), do_preprocess, {})

    def _config(self, gen_config: GenerationConfig | None, adapter_name: str | None) -> GenerationConfig:
        config = gen_config or self.engine.default_generation_config
        return config if adapter_name is None else config.with_updates(adapter_name=adapter_name)

    def encode(self, prompt: Prompt, do_preprocess: bool = True) -> list[int]:
        if isinstance(prompt, str) and not do_preprocess:
            return self.tokenizer.encode(prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return list(self.tokenizer.encode_chat(messages))

    def embed(self, inputs: EmbedInput | Sequence[EmbedInput]) -> list[float] | list[list[float]]:
        """Embeddings of one text (or token-id list) or of a batch, in order: raw text (no chat template),
        pooled as `backend_config.pooling` says and L2-normalized, batched through the engine's prefill."""
        single = _is_single_embed_input(inputs)
        batch: list[Any] = [inputs] if single else list(inputs)
        token_ids = [self.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in batch]
        request_ids: list[str] = []
        try:
            request_ids = [self.engine.add_embedding_request(ids) for ids in token_ids]
            embeddings = self._drain_embeddings(set(request_ids))
        finally:
            for request_id in request_ids:
                if request_id in self.engine.requests:
                    self.engine.abort(request_id)
        ordered = [embeddings[request_id] for request_id in request_ids]
        return ordered[0] if single else ordered

    def _drain_embeddings(self, pending: set[str]) -> dict[str, list[float]]:
        embeddings: dict[str, list[float]] = {}
        while pending - embeddings.keys():
            for out in self.engine.step():
                if out.request_id in pending and out.finished:
                    if out.embedding is None:
                        raise RuntimeError(out.error or f"embedding {out.request_id} ended without one")
                    embeddings[out.request_id] = out.embedding
        return embeddings

    def _run(
        self,
        batch: list[Prompt],
        gen_config: GenerationConfig | None,
        do_preprocess: bool,
        responses: dict[str, Response],
    ) -> Iterator[Response]:
        gen_config = gen_config or self.engine.default_generation_config
        index_of: dict[str, int] = {}
        try:
            for index, prompt in enumerate(batch):
                for config in gen_config.fan_out():
                    request_id = self.engine.add_request(self.encode(prompt, do_preprocess), config)
                    index_of[request_id] = index
                    responses[request_id] = Response("", 0, 0, index=index)
            yield from self._drain(index_of, responses)
        finally:
            for request_id in index_of:
                if request_id in self.engine.requests:
                    self.engine.abort(request_id)

    def _drain(self, index_of: dict[str, int], responses: dict[str, Response]) -> Iterator[Response]:
        pending = set(index_of)
        while pending:
            for out in self.engine.step():
                if out.request_id not in pending:
                    continue
                responses[out.request_id].extend(out)
                if out.finished:
                    pending.discard(out.request_id)
                    if out.error:
                        raise RuntimeError(out.error)
                yield Response(
                    out.text,
                    out.num_generated_tokens,
                    out.num_prompt_tokens,
                    out.finish_reason,
                    list(out.token_ids),
                    out.logprobs,
                    index_of[out.request_id],
                )


def _is_single(prompts: Any) -> bool:
    """A str, or a list of message dicts, is one prompt; a list of those is a batch."""
    return isinstance(prompts, str) or (
        isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], dict)
    )


def _is_single_embed_input(inputs: Any) -> bool:
    """A str, or a list of token ids, is one input; a list of those is a batch."""
    return isinstance(inputs, str) or (bool(inputs) and all(isinstance(x, int) for x in inputs))


def _as_batch(prompts: Any) -> list[Prompt]:
    return [prompts] if _is_single(prompts) else list(prompts)
