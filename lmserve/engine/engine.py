"""LLMEngine: the engine core. add_request / step / abort; one step = schedule, launch, postprocess.

With overlap scheduling a step launches the model before it postprocesses the previous step's tokens,
so the host work of step N (read back, stop checks, text) runs while step N+1 computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmserve.attention.backend import AttentionBackend
from lmserve.config import EngineConfig
from lmserve.distributed.parallel_state import destroy_tensor_parallel, tp_group
from lmserve.distributed.step_channel import StepChannel
from lmserve.distributed.worker import WorkerSpec
from lmserve.engine import builder
from lmserve.engine.cpu_memory import available_memory_bytes
from lmserve.engine.cuda_graph import CUDAGraphRunner
from lmserve.engine.detokenizer import TextStream
from lmserve.engine.kv_cache import BlockManager
from lmserve.engine.limits import EngineLimits, validate_embedding_request, validate_request
from lmserve.engine.messages import EngineStats
from lmserve.engine.pooling import finish_pooling
from lmserve.engine.progress import loading_phase
from lmserve.engine.request import Request, RequestStatus
from lmserve.engine.runner import ModelRunner, PendingTokens
from lmserve.engine.sampler import DeviceSample, make_generator
from lmserve.engine.scheduler import SampledToken, ScheduledRequest, Scheduler
from lmserve.generation import FinishReason, GenerationConfig, RequestOutput, TokenLogprob
from lmserve.kernels import cpu_build
from lmserve.layers.cpu_gemm import pack_cpu_linears
from lmserve.lora.manager import adapter_slot, attach_adapters
from lmserve.models.config import ModelConfig
from lmserve.structured import make_backend
from lmserve.structured.cache import GrammarCache
from lmserve.structured.sequence import compiled_matcher

if TYPE_CHECKING:
    from lmserve.distributed.executor import Workers

logger = logging.getLogger(__name__)

GRAMMAR_IDLE_WAIT_S = 0.005
"""An engine with nothing but compiling grammars waits this long for one, instead of spinning."""


@dataclass
class LaunchedStep:
    """A step whose model run is queued on the device; its tokens are read back by `LLMEngine._finish`."""

    scheduled: list[ScheduledRequest]
    sampling: list[Request]
    """The requests it samples a token for, in the order of sample's rows (each holds a pending token)."""
    sample: DeviceSample | None

    def pending_tokens(self) -> PendingTokens | None:
        """Its tokens as the next step's decodes read them (on the device)."""
        if self.sample is None:
            return None
        return PendingTokens(self.sample.token_ids, {r: row for row, r in enumerate(self.sampling)})


# generation_config.json fields that become our sampling defaults
_GENERATION_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "do_sample")


class LLMEngine:
    """Owns scheduler, block manager and model runner; not thread-safe (AsyncEngine serializes calls).

    With `detokenize` (and a tokenizer) each output carries its text and stop strings end requests here;
    without it outputs carry token ids only and a front end makes the text (server, engine-core process).
    """

    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        tokenizer: Any,
        runner: ModelRunner,
        num_blocks: int,
        resolved: builder.ResolvedConfig,
        generation_defaults: dict[str, Any] | None = None,
        detokenize: bool = True,
        workers: Workers | None = None,
    ) -> None:
        self.config = config
        self.workers = workers
        """tp ranks 1..tp-1 (None at tp 1); `shutdown` stops them."""
        self.detokenize = detokenize and tokenizer is not None
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.runner = runner
        self.resolved = resolved
        self.session_len = resolved.session_len
        self.block_manager = BlockManager(
            num_blocks, config.cache_block_seq_len, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            resolved.max_batch_size,
            config.max_prefill_token_num,
            eos_token_ids_of(model_config, tokenizer),
            self.session_len,
        )
        self.requests: dict[str, Request] = {}
        self.compiling: list[Request] = []
        """Requests whose grammar compiles in the background; they are not in the scheduler yet."""
        self._grammar_cache: GrammarCache | None = None
        self.default_generation_config = _defaults_from(generation_defaults or {})
        self._ids = itertools.count()
        self.overlap = overlap_enabled(config, resolved.device)
        self._in_flight: LaunchedStep | None = None
        """The launched step whose tokens are not read back yet (overlap only)."""
        self.num_steps = 0
        self.num_preemptions = 0

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        config: EngineConfig | None = None,
        chat_template: str | None = None,
        detokenize: bool = True,
    ) -> LLMEngine:
        """Load a model (folder, .gguf, cached hub id; None = embedded SmolLM2) and size its KV cache."""
        from lmserve.models.loader import load_generation_defaults, model_config_to_build, resolve_model
        from lmserve.models.tokenizer import deferred_tokenizer, load_tokenizer

        config = config or EngineConfig()
        source = resolve_model(model)
        with loading_phase(
            f"read the config of {source.gguf_path if source.kind == 'gguf' else source.path}"
        ):
            model_config = model_config_to_build(source, config.model_format)
        resolved = builder.resolve_config(config, model_config)
        apply_torch_settings(config)
        if resolved.device.type == "cpu":
            cpu_build.start_building("cpu")  # unless the core did: overlaps the model set-up
        workers, resolved = _start_workers(WorkerSpec(model, config, ""), resolved)
        with _killing_workers_on_error(workers):
            with loading_phase(f"loaded the weights ({resolved.dtype} on {resolved.device})"):
                net = builder.load_model(source, model_config, resolved)
            # after the weights: a server's front end converts a GGUF's tokenizer meanwhile (models/tokenizer.py)
            # without `detokenize` (a server's core) the EOS ids alone, where the files give them: the tokenizer
            # itself waits for a first structured request (models/tokenizer.py, DeferredTokenizer)
            phase = "loaded the tokenizer" if detokenize else "read the EOS ids"
            with loading_phase(phase), packing_cpu_linears(net, resolved.device):
                tokenizer = (load_tokenizer if detokenize else deferred_tokenizer)(source, chat_template)
            defaults = load_generation_defaults(source)
            return cls.build(config, model_config, net, tokenizer, defaults, resolved, detokenize, workers)

    @classmethod
    def build(
        cls,
        config: EngineConfig,
        model_config: ModelConfig,
        net: Any,
        tokenizer: Any = None,
        generation_defaults: dict[str, Any] | None = None,
        resolved: builder.ResolvedConfig | None = None,
        detokenize: bool = True,
        workers: Workers | None = None,
    ) -> LLMEngine:
        """An engine around a constructed model: sizes and allocates the KV cache, sets up the runner.

        The model's attention backend (`net.attention_backend`) allocates the cache and plans every step.
        With `workers` (tp > 1) the net is rank 0's shard and every step is broadcast to the workers.
        """
        if config.tp > 1 and workers is None:
            raise ValueError(
                f"tp={config.tp}: build() runs the model it is given on one rank; "
                "from_pretrained or from_random_weights start the tp workers"
            )
        resolved = resolved or builder.resolve_config(config, model_config)
        channel = StepChannel(tp_group().control_group) if workers is not None else None
        eos_token_ids = eos_token_ids_of(model_config, tokenizer)
        runner, num_blocks = build_runner(config, model_config, net, resolved, eos_token_ids, channel)
        engine = cls(
            config,
            model_config,
            tokenizer,
            runner,
            num_blocks,
            resolved,
            generation_defaults,
            detokenize,
            workers,
        )
        logger.info(
            "engine ready: %s on %s (%s), %d KV blocks",
            model_config.architecture,
            resolved.device,
            resolved.dtype,
            num_blocks,
        )
        return engine

    @classmethod
    def from_random_weights(cls, config_json: str, config: EngineConfig | None = None) -> LLMEngine:
        """A model of the shape in an HF config.json with random weights (benchmarks; no tokenizer, no text).

        `config.model_format` awq or w8a8 gives random quantized linears of the same shape
        (AWQ group size 128), so quantized speed can be measured without a checkpoint.
        """
        config = config or EngineConfig()
        model_config = random_model_config(config_json, config)
        resolved = builder.resolve_config(config, model_config)
        apply_torch_settings(config)
        workers, resolved = _start_workers(
            WorkerSpec(None, config, "", random_config_json=config_json), resolved
        )
        with _killing_workers_on_error(workers):
            net = builder.random_model(model_config, resolved)
            return cls.build(config, model_config, net, resolved=resolved, workers=workers)

    def shutdown(self) -> None:
        """Stop the tp workers (idempotent; nothing to do at tp 1)."""
        workers, self.workers = self.workers, None
        if workers is None:
            return
        workers.stopping = True
        assert self.runner.step_channel is not None
        self.runner.step_channel.send_shutdown()
        workers.stop()
        destroy_tensor_parallel()

    # -- requests -------------------------------------------------------------------

    @property
    def limits(self) -> EngineLimits:
        bm = self.block_manager
        return EngineLimits(self.session_len, bm.num_blocks, bm.block_size, self.model_config.vocab_size)

    def validate_request(self, prompt_token_ids: list[int], gen_config: GenerationConfig) -> int:
        """Check a request can ever run; returns its resolved max new tokens. ValueError otherwise."""
        return validate_request(prompt_token_ids, gen_config, self.limits)

    def add_request(
        self,
        prompt_token_ids: list[int],
        gen_config: GenerationConfig | None = None,
        request_id: str | None = None,
    ) -> str:
        gen_config = gen_config or self.default_generation_config
        max_new = self.validate_request(prompt_token_ids, gen_config)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is already running")
        request = Request(request_id, list(prompt_token_ids), len(prompt_token_ids), gen_config, max_new)
        request.lora_slot = adapter_slot(self.runner.lora, gen_config.adapter_name)
        seed = gen_config.random_seed
        if seed is not None and not gen_config.greedy:
            request.generator = make_generator(seed, self.resolved.device)
        if self.detokenize:
            request.detokenizer = TextStream(self.tokenizer.hf, request.prompt_token_ids, gen_config)
        self.requests[request_id] = request
        if gen_config.response_format is not None:
            request.grammar_future = self.grammar_cache.compile(gen_config.response_format)
            self.compiling.append(request)
        else:
            self.scheduler.add(request)
        return request_id

    def add_embedding_request(self, prompt_token_ids: list[int], request_id: str | None = None) -> str:
        """Queue a prompt to embed: prefilled like any prompt, pooled (--pooling), no token sampled, no KV kept."""
        validate_embedding_request(prompt_token_ids, self.limits)
        request_id = request_id or f"embd-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is already running")
        prompt = list(prompt_token_ids)
        request = Request(request_id, prompt, len(prompt), GenerationConfig(), 0, pooling=self.config.pooling)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    @property
    def grammar_cache(self) -> GrammarCache:
        """Made on the first structured request (it needs the tokenizer: random-weight engines have none)."""
        if self._grammar_cache is None:
            if self.tokenizer is None:
                raise ValueError("response_format needs a tokenizer; this engine has none")
            eos = self.scheduler.eos_token_ids
            backend = make_backend(self.tokenizer.hf, self.model_config.vocab_size, tuple(sorted(eos)))
            self._grammar_cache = GrammarCache(backend)
        return self._grammar_cache

    def _admit_compiled(self) -> list[RequestOutput]:
        """Move requests whose grammar is ready into the scheduler; a grammar that failed ends its request.

        A request still compiling waits without holding up the others (they were scheduled already).
        """
        futures = [r.grammar_future for r in self.compiling if r.grammar_future is not None]
        if not self.scheduler.num_unfinished:
            wait(futures, GRAMMAR_IDLE_WAIT_S, FIRST_COMPLETED)
        ready = [r for r in self.compiling if r.grammar_future is None or r.grammar_future.done()]
        failed = []
        for request in ready:
            self.compiling.remove(request)
            error = self._start_grammar(request)
            if error is None:
                self.scheduler.add(request)
            else:
                failed.append(self._end_before_start(request, "error", error, bad_request=True))
        return failed

    def _start_grammar(self, request: Request) -> str | None:
        """Give the request its matcher; the reason when its grammar did not compile."""
        assert request.grammar_future is not None and request.gen_config.response_format is not None
        try:
            compiled = request.grammar_future.result()
        except ValueError as error:
            return f"response_format could not be compiled: {error}"
        start_after = request.gen_config.response_format.start_after_token_id
        request.grammar = compiled_matcher(self.grammar_cache.backend, compiled, start_after)
        request.grammar_future = None
        return None

    def _end_before_start(
        self, request: Request, reason: FinishReason, error: str | None, bad_request: bool = False
    ) -> RequestOutput:
        """End a request that never reached the scheduler (its grammar failed, or it was aborted)."""
        self.requests.pop(request.request_id, None)
        request.status, request.finish_reason = RequestStatus.FINISHED, reason
        out = self._output(request, "", [], None, finished=True)
        out.error, out.bad_request = error, bad_request
        return out

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request in self.compiling:
            self.compiling.remove(request)
            return self._end_before_start(request, "abort", None)
        self.scheduler.finish(request, "abort")
        return self._output(request, "", [], None, finished=True)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self.compiling) or self._in_flight is not None

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error (after an exception inside a step)."""
        outputs = []
        for request_id in list(self.requests):
            out = self.abort(request_id)
            if out is not None:
                out.finish_reason, out.error = "error", message
                outputs.append(out)
        self._in_flight = None  # its requests are ended: nothing of it is wanted
        return outputs

    # -- the step ---------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step; return the outputs of the step whose tokens were read back.

        Synchronous: that is this step. Overlapped: the previous one, postprocessed while this one runs
        (the first step returns no tokens, and a request's last one comes a step after it is sampled).
        """
        outputs = self._admit_compiled() if self.compiling else []
        previous, self._in_flight = self._in_flight, None
        if previous is not None and not self._can_overlap(previous):
            outputs += self._finish(previous)
            previous = None
        schedule = self.scheduler.schedule()
        self.num_preemptions += len(schedule.preempted)
        launched = None
        if not schedule.is_empty:
            launched = self._launch(schedule.scheduled, previous)
        if previous is not None:
            outputs += self._finish(previous)
        if launched is not None and self.overlap:
            self._in_flight = launched
        elif launched is not None:
            outputs += self._finish(launched)
        return outputs

    def _can_overlap(self, previous: LaunchedStep) -> bool:
        """Whether the next step may be scheduled before `previous`'s tokens are known on the host.

        Not when one of its live requests samples from its own tokens: a grammar (the next mask needs
        the token) or repetition / frequency / presence penalties (they count tokens on the host).
        """
        if not self.overlap:
            return False
        penalized: dict[int, bool] = {}  # by config: most batches share a few configs
        finished = RequestStatus.FINISHED
        for request in previous.sampling:
            if request.status is finished:
                continue
            if request.grammar is not None:
                return False
            config = request.gen_config
            known = penalized.get(id(config))
            if known is None:
                known = penalized[id(config)] = needs_known_tokens(request)
            if known:
                return False
        return True

    def _launch(self, scheduled: list[ScheduledRequest], previous: LaunchedStep | None) -> LaunchedStep:
        """Queue the model run of a scheduled batch (decodes of pending tokens read `previous`'s on the device)."""
        pending = previous.pending_tokens() if previous is not None else None
        sample = self.runner.execute(scheduled, pending)
        sampling = self.scheduler.commit(scheduled)
        self.num_steps += 1
        return LaunchedStep(scheduled, sampling, sample)

    def _finish(self, step: LaunchedStep) -> list[RequestOutput]:
        """Read a step's tokens back; the scheduler applies them (stop tokens, lengths), the engine adds text."""
        result = step.sample.result() if step.sample is not None else None
        sampled = self.scheduler.apply_tokens(step.sampling, result.token_ids if result else [])
        logprobs = result.logprobs if result else []
        kept = [
            (token, logprob) for token, logprob in zip(sampled, logprobs, strict=True) if token is not None
        ]
        if any(token.request.grammar is not None for token, _ in kept):
            self._advance_grammars([token for token, _ in kept])
        outputs = [self._emit(token, logprob) for token, logprob in kept]
        pooled = [
            s.request for s in step.scheduled if s.request.pooling is not None and s.request.is_finished
        ]
        return outputs + [self._emit_embedding(r) for r in pooled if self.requests.get(r.request_id) is r]

    def _emit_embedding(self, request: Request) -> RequestOutput:
        self.requests.pop(request.request_id, None)
        assert request.pooling is not None and request.pooled is not None, "a finished embedding was pooled"
        embedding = finish_pooling(request.pooling, request.pooled, request.num_prompt_tokens)
        request.pooled = None
        output = self._output(request, "", [], None, finished=True)
        output.embedding = embedding
        return output

    def _advance_grammars(self, sampled: list[SampledToken]) -> None:
        """Feed each constrained request its token; a grammar that is done ends its request ("stop")."""
        for token in sampled:
            grammar = token.request.grammar
            if grammar is not None and grammar.advance(token.token_id) and not token.request.is_finished:
                self.scheduler.finish(token.request, "stop")

    def _emit(self, sampled: SampledToken, logprob: TokenLogprob | None) -> RequestOutput:
        request, token_id = sampled
        text = "" if request.detokenizer is None else self._detokenize(request, token_id)
        finished = request.status is RequestStatus.FINISHED
        if finished:
            self.requests.pop(request.request_id, None)
        return RequestOutput(  # positionally, as _output: one per running request every step
            request.request_id,
            text,
            [token_id],
            [logprob] if logprob is not None else None,
            finished,
            request.finish_reason if finished else None,
            request.num_prompt_tokens,
            len(request.token_ids) - request.num_prompt_tokens,
            request.num_cached_tokens,
        )

    def _detokenize(self, request: Request, token_id: int) -> str:
        """The new token's text; a completed stop string finishes the request (and wins over "length")."""
        stream = request.detokenizer
        if stream is None:  # no text: a front end makes it, or a benchmark on random weights
            return ""
        delta = stream.push([token_id], request.finish_reason if request.is_finished else None)
        if stream.stopped:
            self.scheduler.finish(request, "stop")
        return delta.text

    def _output(
        self, request: Request, text: str, token_ids: list[int], logprobs: Any, finished: bool
    ) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            text=text,
            token_ids=token_ids,
            logprobs=logprobs,
            finished=finished,
            finish_reason=request.finish_reason if finished else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_generated_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
        )

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_total_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            kv_cache_usage=bm.usage,
            prefix_cache_queries=bm.num_prefix_queries,
            prefix_cache_hits=bm.num_prefix_hits,
            num_preemptions=self.num_preemptions,
            num_steps=self.num_steps,
        )


def needs_known_tokens(request: Request) -> bool:
    """Whether sampling the request's next token reads its earlier tokens on the host (no overlap then)."""
    config = request.gen_config
    penalized = config.repetition_penalty != 1.0 or config.frequency_penalty or config.presence_penalty
    return request.grammar is not None or bool(penalized)


def overlap_enabled(config: EngineConfig, device: torch.device | None = None) -> bool:
    """--overlap-schedule; unset: on for one CUDA device (measured faster on the H200: 214 vs 207 tok/s at
    batch 1, the 256x512/256 job 6.4 vs 6.8 s), off on the CPU (its ops run synchronously: nothing to hide)
    and at tp > 1 (the tp workers take every step's token ids from the host)."""
    if config.overlap_schedule is None:
        return config.tp == 1 and device is not None and device.type == "cuda"
    if config.overlap_schedule and config.tp > 1:
        raise ValueError(f"overlap_schedule needs tp=1 (tp={config.tp}): the tp workers take host token ids")
    return config.overlap_schedule


def eos_token_ids_of(model_config: ModelConfig, tokenizer: Any) -> tuple[int, ...]:
    """The ids that end generation: the model config's EOS ids and the tokenizer's."""
    return tuple(sorted(set(model_config.eos_token_ids).union(tokenizer.eos_token_ids if tokenizer else ())))


def random_model_config(config_json: str, config: EngineConfig) -> ModelConfig:
    """The ModelConfig of a random-weight engine: config.json's shapes, quantized as --model-format asks."""
    import json

    with open(config_json) as f:
        hf_config = json.load(f)
    quantization = builder.random_quantization_config(config.model_format)
    if quantization is not None:
        hf_config["quantization_config"] = quantization
    return ModelConfig.from_hf_config(hf_config)


@contextlib.contextmanager
def packing_cpu_linears(net: Any, device: torch.device) -> Iterator[None]:
    """oneDNN's packing of the CPU linears (~0.3 s, in torch ops that release the GIL) in a thread for the
    block's time: beside the tokenizer's load, or beside the wait for the front end converting it. After an
    error here, build_runner's own call packs what is left and raises it."""
    if device.type != "cpu":
        yield
        return

    def pack() -> None:
        with contextlib.suppress(Exception):
            pack_cpu_linears(net, available_memory_bytes())

    packer = threading.Thread(target=pack, name="lmserve-onednn-pack")
    packer.start()
    try:
        yield
    finally:
        packer.join()


def build_runner(
    config: EngineConfig,
    model_config: ModelConfig,
    net: Any,
    resolved: builder.ResolvedConfig,
    eos_token_ids: tuple[int, ...],
    step_channel: StepChannel | None = None,
) -> tuple[ModelRunner, int]:
    """(runner, number of KV blocks) over the model (one tp rank's shard): the cache sized and allocated,
    CUDA graphs captured. Every tp rank calls it in the same order (sizing and capture are collective)."""
    backend = net.attention_backend
    if resolved.device.type == "cpu":  # before the KV cache is sized from the memory left
        with loading_phase("packed the CPU linears for oneDNN"):
            pack_cpu_linears(net, available_memory_bytes())
    num_blocks = builder.num_kv_blocks(config, resolved, model_config)
    block_size = config.cache_block_seq_len
    with loading_phase(f"allocated the KV cache ({num_blocks * block_size} tokens)"):
        kv_caches = builder.allocate_kv_cache(backend, num_blocks, block_size, model_config, resolved)
    lora = None
    if config.adapters:
        with loading_phase(f"loaded {len(config.adapters)} LoRA adapter(s)"):
            lora = attach_adapters(net, model_config, config.adapters, resolved.device, resolved.dtype)
    # decode graphs would need the adapter slots in static buffers: with adapters, steps run eagerly
    graph_runner = None if lora else _make_graph_runner(net, backend, kv_caches, config, resolved)
    runner = ModelRunner(
        net,
        model_config,
        backend,
        kv_caches,
        block_size,
        resolved.device,
        eos_token_ids,
        graph_runner,
        step_channel,
        lora,
    )
    return runner, num_blocks


def _start_workers(
    spec: WorkerSpec, resolved: builder.ResolvedConfig
) -> tuple[Workers | None, builder.ResolvedConfig]:
    """tp > 1: start ranks 1..tp-1 and join the group as rank 0 (before loading, so all ranks load at once);
    the resolved config comes back with rank 0's device (Ray may have given cuda:0 to a worker)."""
    if spec.config.tp == 1:
        return None, resolved
    from lmserve.distributed.executor import start_workers

    workers, device = start_workers(spec, resolved.device)
    return workers, dataclasses.replace(resolved, device=device)


@contextlib.contextmanager
def _killing_workers_on_error(workers: Workers | None) -> Iterator[None]:
    """Rank 0 failing while it loads: end the workers (they would wait for it forever), then re-raise."""
    try:
        yield
    except BaseException:
        if workers is not None:
            workers.kill()
            destroy_tensor_parallel()
        raise


def apply_torch_settings(config: EngineConfig) -> None:
    """Process-wide torch settings the config asks for: CPU threads, and the seed of the global random stream."""
    if config.num_cpu_threads:
        torch.set_num_threads(config.num_cpu_threads)
    torch.manual_seed(config.seed)  # unseeded sampled requests draw from this stream (vLLM's --seed)


def _defaults_from(generation_defaults: dict[str, Any]) -> GenerationConfig:
    """Sampling defaults: the model's generation_config.json over ours (LMDeploy's `--generation-config auto`)."""
    fields = {
        k: generation_defaults[k]
        for k in _GENERATION_DEFAULT_FIELDS
        if generation_defaults.get(k) is not None
    }
    if "temperature" in fields and "do_sample" not in fields:
        fields["do_sample"] = fields["temperature"] > 0
    try:
        return GenerationConfig(**fields)
    except (TypeError, ValueError) as error:
        logger.warning("ignoring the model's generation_config.json defaults: %s", error)
        return GenerationConfig()


def _make_graph_runner(
    model: Any,
    backend: AttentionBackend,
    kv_caches: list[Any],
    config: EngineConfig,
    resolved: builder.ResolvedConfig,
) -> CUDAGraphRunner | None:
    if resolved.device.type != "cuda" or config.eager_mode or not backend.supports_cuda_graphs:
        return None
    return CUDAGraphRunner(
        model, backend, kv_caches, resolved.max_batch_size, config.cache_block_seq_len, resolved.session_len
    )
