"""Batched sampling: grammar masks, penalties, temperature, min-p/top-k/top-p, per-request seeds, logprobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lmserve.attention.metadata import upload
from lmserve.generation import GenerationConfig, PromptThenOutput, TokenLogprob
from lmserve.kernels.argmax import greedy_argmax
from lmserve.structured.backend import GrammarBackend
from lmserve.structured.sequence import SequenceGrammar

Device = torch.device | str


def make_generator(seed: int, device: Device) -> torch.Generator:
    """The private random stream of one seeded request (created once, when the request arrives)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class SamplingRequest(PromptThenOutput):
    """What the sampler needs to know about one row of the batch."""

    gen_config: GenerationConfig
    token_ids: list[int]
    """Prompt then output tokens: the engine's own list, not copied per step (only penalties read it)."""
    num_prompt_tokens: int
    num_pending_tokens: int = 0
    """Output tokens sampled but not read back yet (overlap): they count towards min_new_tokens."""
    generator: torch.Generator | None = None
    grammar: SequenceGrammar | None = None
    """The row's structured-output matcher (response_format, tool calls); masks only while active."""

    @classmethod
    def from_lists(
        cls,
        gen_config: GenerationConfig,
        prompt_token_ids: list[int],
        output_token_ids: list[int],
        generator: torch.Generator | None = None,
    ) -> SamplingRequest:
        return cls(
            gen_config, prompt_token_ids + output_token_ids, len(prompt_token_ids), generator=generator
        )


class SamplingRow(Protocol):
    """What the sampler reads of one row: a SamplingRequest, or the engine's Request itself (same fields),
    which the runner passes as it is instead of copying 256 of them into SamplingRequests every step."""

    @property
    def gen_config(self) -> GenerationConfig: ...
    @property
    def token_ids(self) -> list[int]: ...
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def num_pending_tokens(self) -> int: ...
    @property
    def generator(self) -> torch.Generator | None: ...
    @property
    def grammar(self) -> SequenceGrammar | None: ...
    @property
    def num_output_tokens(self) -> int: ...
    @property
    def output_token_ids(self) -> list[int]: ...


@dataclass
class SampleResult:
    """One sampled token per row, and its logprobs where the request asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass
class DeviceSample:
    """One step's sampled tokens (and logprobs) on the device, on their way to the host.

    The copies to the host are queued behind the step without waiting for it: the engine launches the
    next step first (overlap scheduling), whose decodes read `token_ids` on the device, and only then
    calls `result()`, which waits for the copies alone.
    """

    token_ids: torch.Tensor
    """int64[N] on the device."""
    host: list[torch.Tensor]
    """Host copies of token_ids and, with logprobs, of the chosen logprobs, top values and top ids."""
    num_logprobs: list[int | None]
    ready: torch.cuda.Event | None
    """Recorded after the copies (CUDA); None on the CPU, where they are done already."""

    @classmethod
    def copy_to_host(
        cls, token_ids: torch.Tensor, logprobs: list[torch.Tensor], num_logprobs: list[int | None]
    ) -> DeviceSample:
        tensors = [token_ids, *logprobs]
        if token_ids.device.type == "cpu":
            return cls(token_ids, tensors, num_logprobs, None)
        host = [
            torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors
        ]
        ready = torch.cuda.Event()
        ready.record()
        return cls(token_ids, host, num_logprobs, ready)

    def result(self) -> SampleResult:
        """The tokens as host lists (waits for the step and its copies)."""
        if self.ready is not None:
            self.ready.synchronize()
        token_ids: list[int] = self.host[0].tolist()
        if len(self.host) == 1:
            return SampleResult(token_ids, [None] * len(token_ids))
        chosen, top_values, top_ids = (t.tolist() for t in self.host[1:])
        return SampleResult(token_ids, _logprobs(token_ids, chosen, top_values, top_ids, self.num_logprobs))


@dataclass
class GrammarMask:
    """The allowed next tokens of the batch's constrained rows, as one bitmask over the vocabulary."""

    backend: GrammarBackend
    bitmask: torch.Tensor
    """int32[N, ceil(V / 32)] on the host; rows not in `rows` are not read."""
    rows: list[int]

    @classmethod
    def build(cls, requests: Sequence[SamplingRow]) -> GrammarMask | None:
        """None when no row is constrained now (most batches: nothing to fill or apply)."""
        rows = [row for row, r in enumerate(requests) if r.grammar is not None and r.grammar.active]
        if not rows:
            return None
        grammars = [requests[row].grammar for row in rows]
        backend = grammars[0].backend  # type: ignore[union-attr]
        matchers = [grammar.matcher for grammar in grammars]  # type: ignore[union-attr]
        return cls(backend, backend.fill_bitmask(matchers, rows, len(requests)), rows)

    def apply(self, logits: torch.Tensor) -> None:
        self.backend.apply_bitmask(logits, self.bitmask, self.rows)


@dataclass
class SamplingBatch:
    """Per-row sampling tensors; a field is None when no row needs that step (the fast path)."""

    greedy: torch.Tensor | None
    """bool[N]: rows that take the argmax; None when all do (nothing to upload)."""
    all_greedy: bool
    any_greedy: bool
    temperature: torch.Tensor | None
    """float[N, 1]; 1.0 for greedy rows."""
    min_p: torch.Tensor | None
    """float[N, 1]; 0.0 disables."""
    top_k: torch.Tensor | None
    """int64[N]; vocab_size disables."""
    top_p: torch.Tensor | None
    """float[N]; 1.0 disables."""
    repetition_penalty: torch.Tensor | None
    """float[N, 1], with seen_token_mask bool[N, V] over prompt + output tokens."""
    seen_token_mask: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    """float[N, 1], with presence_penalty and output_token_counts float[N, V] over output tokens."""
    presence_penalty: torch.Tensor | None
    output_token_counts: torch.Tensor | None
    banned_rows: torch.Tensor | None
    """int64[B] with banned_token_ids: (row, token) pairs forced to -inf (min_new_tokens, ignore_eos)."""
    banned_token_ids: torch.Tensor | None
    bias_rows: torch.Tensor | None
    """int64[B] with bias_token_ids and bias_values float[B]: logit_bias entries, added to the logits."""
    bias_token_ids: torch.Tensor | None
    bias_values: torch.Tensor | None
    seeded_rows: list[tuple[int, torch.Generator]]
    num_logprobs: list[int | None]
    logprob_rows: torch.Tensor | None
    """int64[M]: rows that asked for logprobs."""
    grammar_mask: GrammarMask | None = None

    @classmethod
    def build(
        cls,
        requests: Sequence[SamplingRow],
        eos_token_ids: tuple[int, ...],
        vocab_size: int,
        device: Device,
    ) -> SamplingBatch:
        """Whether a step is needed at all is asked of the batch's distinct configs (most batches share a few,
        the offline job one), so an all-greedy batch builds no per-row lists but the banned tokens."""
        configs = [request.gen_config for request in requests]
        distinct = list({id(config): config for config in configs}.values())
        all_greedy = all(config.greedy for config in distinct)
        frequency, presence, counts = _output_penalties(configs, distinct, requests, vocab_size, device)
        repetition, seen = _repetition_penalty(configs, distinct, requests, vocab_size, device)
        banned_rows, banned_token_ids = _banned_tokens(requests, configs, eos_token_ids, vocab_size, device)
        bias_rows, bias_token_ids, bias_values = _logit_bias(configs, distinct, vocab_size, device)
        if all(config.logprobs is None for config in distinct):
            num_logprobs: list[int | None] = [None] * len(configs)
            logprob_rows: list[int] = []
        else:
            num_logprobs = [config.logprobs for config in configs]
            logprob_rows = [row for row, k in enumerate(num_logprobs) if k is not None]
        if all_greedy:  # greedy rows hold every neutral value: no temperature, filter or seeded draw
            greedy, temperature, min_p, top_k, top_p = None, None, None, None, None
            seeded_rows: list[tuple[int, torch.Generator]] = []
        else:
            greedy_rows = [config.greedy for config in configs]
            greedy = upload(greedy_rows, torch.bool, device)
            pairs = list(zip(greedy_rows, configs, strict=True))
            temperature = _column([1.0 if g else c.temperature for g, c in pairs], 1.0, device)
            min_p = _column([0.0 if g else c.min_p for g, c in pairs], 0.0, device)
            top_k = _top_k(configs, greedy_rows, vocab_size, device)
            top_p = _row_values([1.0 if g else c.top_p for g, c in pairs], 1.0, device)
            seeded_rows = [
                (row, r.generator) for row, r in enumerate(requests) if r.generator and not greedy_rows[row]
            ]
        return cls(
            greedy=greedy,
            all_greedy=all_greedy,
            any_greedy=any(config.greedy for config in distinct),
            temperature=temperature,
            min_p=min_p,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition,
            seen_token_mask=seen,
            frequency_penalty=frequency,
            presence_penalty=presence,
            output_token_counts=counts,
            banned_rows=banned_rows,
            banned_token_ids=banned_token_ids,
            bias_rows=bias_rows,
            bias_token_ids=bias_token_ids,
            bias_values=bias_values,
            seeded_rows=seeded_rows,
            num_logprobs=num_logprobs,
            logprob_rows=upload(logprob_rows, torch.long, device) if logprob_rows else None,
            grammar_mask=GrammarMask.build(requests),
        )

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty is not None
            or self.output_token_counts is not None
            or self.banned_rows is not None
            or self.bias_rows is not None
        )


def _row_values(values: list[float], neutral: float, device: Device) -> torch.Tensor | None:
    """float[N], or None when every row holds the neutral value."""
    if all(value == neutral for value in values):
        return None
    return upload(values, torch.float32, device)


def _column(values: list[float], neutral: float, device: Device) -> torch.Tensor | None:
    """float[N, 1] (broadcasts over the vocab), or None when every row holds the neutral value."""
    row_values = _row_values(values, neutral, device)
    return None if row_values is None else row_values.unsqueeze(1)


def _top_k(
    configs: list[GenerationConfig], greedy: list[bool], vocab_size: int, device: Device
) -> torch.Tensor | None:
    """int64[N] (vocab_size where disabled), or None when no sampling row uses top-k."""
    values = [
        vocab_size if g or c.top_k == 0 else min(c.top_k, vocab_size)
        for g, c in zip(greedy, configs, strict=True)
    ]
    if all(value == vocab_size for value in values):
        return None
    return upload(values, torch.long, device)


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: Device) -> torch.Tensor:
    """float[N, V]: how often each token occurs in each row's list (built on device by scatter_add)."""
    width = max((len(tokens) for tokens in token_lists), default=0)
    # pad with vocab_size: counted into an extra column that is dropped
    padded = [tokens + [vocab_size] * (width - len(tokens)) for tokens in token_lists]
    ids = upload(padded, torch.long, device).reshape(len(token_lists), width)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def _output_penalties(
    configs: list[GenerationConfig],
    distinct: list[GenerationConfig],
    requests: Sequence[SamplingRow],
    vocab_size: int,
    device: Device,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(frequency[N, 1], presence[N, 1], output_token_counts[N, V]), or three None if all are 0."""
    if all(c.frequency_penalty == 0.0 and c.presence_penalty == 0.0 for c in distinct):
        return None, None, None
    frequency = upload([c.frequency_penalty for c in configs], torch.float32, device).unsqueeze(1)
    presence = upload([c.presence_penalty for c in configs], torch.float32, device).unsqueeze(1)
    counts = _token_counts([r.output_token_ids for r in requests], vocab_size, device)
    return frequency, presence, counts


def _repetition_penalty(
    configs: list[GenerationConfig],
    distinct: list[GenerationConfig],
    requests: Sequence[SamplingRow],
    vocab_size: int,
    device: Device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(penalty[N, 1], seen_token_mask[N, V]) over prompt + output tokens, as HF does; None if all 1."""
    if all(c.repetition_penalty == 1.0 for c in distinct):
        return None, None
    penalty = _column([c.repetition_penalty for c in configs], 1.0, device)
    assert penalty is not None, "a row's penalty is not 1"
    seen = _token_counts([r.token_ids for r in requests], vocab_size, device)
    return penalty, seen > 0


def _banned_tokens(
    requests: Sequence[SamplingRow],
    configs: list[GenerationConfig],
    eos_token_ids: tuple[int, ...],
    vocab_size: int,
    device: Device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(rows, token_ids) that may not be sampled now: EOS/stop ids before min_new_tokens, EOS if ignore_eos.

    The two id lists a config can ban are made once per distinct config; both tensors come in one upload.
    """
    lists: dict[int, tuple[list[int], list[int]]] = {}
    rows: list[int] = []
    token_ids: list[int] = []
    for row, (request, config) in enumerate(zip(requests, configs, strict=True)):
        if not config.ignore_eos and not config.min_new_tokens:
            continue
        banned_lists = lists.get(id(config))
        if banned_lists is None:
            banned_lists = lists[id(config)] = _banned_lists(config, eos_token_ids, vocab_size)
        always, early = banned_lists
        num_output_tokens = len(request.token_ids) - request.num_prompt_tokens + request.num_pending_tokens
        banned = early if num_output_tokens < config.min_new_tokens else always
        if len(banned) == 1:
            rows.append(row)
            token_ids.append(banned[0])
        elif banned:
            rows.extend([row] * len(banned))
            token_ids.extend(banned)
    if not rows:
        return None, None
    both = upload(rows + token_ids, torch.long, device)
    return both[: len(rows)], both[len(rows) :]


def _banned_lists(
    config: GenerationConfig, eos_token_ids: tuple[int, ...], vocab_size: int
) -> tuple[list[int], list[int]]:
    """(banned always, banned before min_new_tokens): sorted ids inside the vocabulary."""
    always = set(eos_token_ids) if config.ignore_eos else set()
    early = always | set(eos_token_ids) | set(config.stop_token_ids)
    return (
        sorted(token_id for token_id in always if 0 <= token_id < vocab_size),
        sorted(token_id for token_id in early if 0 <= token_id < vocab_size),
    )


def _logit_bias(
    configs: list[GenerationConfig], distinct: list[GenerationConfig], vocab_size: int, device: Device
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(rows, token_ids, biases) of every row's logit_bias, or three None when no row has one."""
    if not any(config.logit_bias for config in distinct):
        return None, None, None
    entries = [
        (row, token_id, bias)
        for row, config in enumerate(configs)
        for token_id, bias in (config.logit_bias or {}).items()
    ]
    for _, token_id, _ in entries:
        if token_id >= vocab_size:  # the engine validates requests; this guards our own invariant
            raise ValueError(f"logit_bias token id {token_id} is outside the vocabulary [0, {vocab_size})")
    rows, token_ids, biases = zip(*entries, strict=True)
    return (
        upload(list(rows), torch.long, device),
        upload(list(token_ids), torch.long, device),
        upload(list(biases), torch.float32, device),
    )


class Sampler:
    """Turns a batch of logits into one token per row.

    Order: grammar mask -> penalties -> (greedy rows: argmax) -> temperature -> min_p -> top_k -> top_p -> sample.
    Logprobs are the log-softmax of the *raw* logits (before penalties and temperature), as
    OpenAI and vLLM report them: they describe the model, not the sampling settings.
    """

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SampleResult:
        """One token per row, read back to the host now."""
        return self.sample_on_device(logits, batch).result()

    def sample_on_device(self, logits: torch.Tensor, batch: SamplingBatch) -> DeviceSample:
        """One token per row, left on the device (nothing here waits for the GPU)."""
        raw_logprobs = None
        if batch.logprob_rows is not None:
            raw_logprobs = logits.index_select(0, batch.logprob_rows).float().log_softmax(dim=-1)
        if batch.grammar_mask is not None:
            batch.grammar_mask.apply(logits)  # in place: the logits are this step's own tensor
        if batch.needs_penalties:
            logits = apply_penalties(logits.clone(), batch)
        token_ids = self._choose(logits, batch)
        logprobs = [] if raw_logprobs is None else _device_logprobs(raw_logprobs, token_ids, batch)
        return DeviceSample.copy_to_host(token_ids, logprobs, batch.num_logprobs)

    def _choose(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        if batch.all_greedy:
            return greedy_argmax(logits)
        greedy_ids = greedy_argmax(logits) if batch.any_greedy else None
        sampled_ids = sample_from_logits(logits, batch)
        if greedy_ids is None:
            return sampled_ids
        assert batch.greedy is not None, "some rows sample"
        return torch.where(batch.greedy, greedy_ids, sampled_ids)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (HF), frequency/presence (OpenAI) penalties, logit_bias, then banned tokens (in place)."""
    if batch.repetition_penalty is not None and batch.seen_token_mask is not None:
        penalty = batch.repetition_penalty
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(batch.seen_token_mask, penalized, logits)
    if batch.output_token_counts is not None:
        assert batch.frequency_penalty is not None and batch.presence_penalty is not None
        counts = batch.output_token_counts
        logits -= batch.frequency_penalty * counts + batch.presence_penalty * (counts > 0)
    if batch.bias_rows is not None:
        assert batch.bias_token_ids is not None and batch.bias_values is not None
        logits.index_put_(
            (batch.bias_rows, batch.bias_token_ids), batch.bias_values.to(logits.dtype), accumulate=True
        )
    if batch.banned_rows is not None:
        assert batch.banned_token_ids is not None
        # index_fill_ takes -inf as a kernel argument; `logits[rows, ids] = -inf` copies a host scalar to the
        # device first, and that copy waits for the whole stream (no overlap with the next step then)
        flat = batch.banned_rows * logits.shape[-1] + batch.banned_token_ids
        logits.view(-1).index_fill_(0, flat, float("-inf"))
    return logits


def sample_from_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, filters, then one draw per row (seeded rows from their own generator)."""
    if batch.temperature is not None:
        logits = logits / batch.temperature
    if batch.min_p is not None:
        logits = apply_min_p(logits, batch.min_p)
    if batch.top_k is not None or batch.top_p is not None:
        logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
    probs = logits.softmax(dim=-1)
    return greedy_argmax(probs.div_(_exponential_noise(probs, batch.seeded_rows)))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's (HF MinPLogitsWarper)."""
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Per-row top-k then top-p (HF TopK/TopPLogitsWarper semantics, ties at the k-th value kept); one sort."""
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=False)
    vocab_size = logits.shape[-1]
    if top_k is not None:
        kth_largest = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p).unsqueeze(1)
        remove[:, -1] = False
        sorted_logits.masked_fill_(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def _exponential_noise(probs: torch.Tensor, seeded_rows: list[tuple[int, torch.Generator]]) -> torch.Tensor:
    """q ~ Exp(1) per token; argmax(probs / q) is a draw from probs (the exponential race).

    A seeded row draws its whole row from its own generator, so its tokens do not depend on
    what else is in the batch.
    """
    noise = torch.empty_like(probs).exponential_()
    for row, generator in seeded_rows:
        noise[row].exponential_(generator=generator)
    # exponential_ may return exactly 0 in float32; 0/0 would give NaN for filtered tokens
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _device_logprobs(
    raw_logprobs: torch.Tensor, token_ids: torch.Tensor, batch: SamplingBatch
) -> list[torch.Tensor]:
    """[chosen token's logprob, top values, top ids] of the rows that asked, computed on the device."""
    assert batch.logprob_rows is not None
    chosen_ids = token_ids.index_select(0, batch.logprob_rows)
    chosen = raw_logprobs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1)
    max_k = max(k or 0 for k in batch.num_logprobs)
    top_values, top_ids = raw_logprobs.topk(max_k, dim=-1)
    return [chosen, top_values, top_ids]


def _logprobs(
    token_ids: list[int],
    chosen: list[float],
    top_values: list[list[float]],
    top_ids: list[list[int]],
    num_logprobs: list[int | None],
) -> list[TokenLogprob | None]:
    """TokenLogprob for rows that asked (sampled token + top-k alternatives), None for the rest."""
    rows = [row for row, k in enumerate(num_logprobs) if k is not None]
    results: list[TokenLogprob | None] = [None] * len(num_logprobs)
    for index, row in enumerate(rows):
        k = num_logprobs[row] or 0
        pairs = zip(top_ids[index][:k], top_values[index][:k], strict=True)
        results[row] = TokenLogprob(token_ids[row], chosen[index], tuple(pairs))
    return results
