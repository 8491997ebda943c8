"""Sampler vs Hugging Face logits processors, OpenAI penalty formulas and softmax statistics."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmserve.engine.sampler import (
    Sampler,
    SamplingBatch,
    SamplingRequest,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    make_generator,
)
from lmserve.generation import GenerationConfig

VOCAB = 64
EOS = (3,)


def make_request(
    output: list[int] | None = None, prompt: list[int] | None = None, **config
) -> SamplingRequest:
    gen_config = GenerationConfig(**config)
    seed = gen_config.random_seed
    generator = make_generator(seed, "cpu") if seed is not None else None
    return SamplingRequest.from_lists(gen_config, prompt or [], output or [], generator)


def build(requests: list[SamplingRequest], vocab_size: int = VOCAB) -> SamplingBatch:
    return SamplingBatch.build(requests, EOS, vocab_size, "cpu")


def random_logits(rows: int, vocab_size: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab_size, generator=torch.Generator().manual_seed(seed)) * 3


def survivors(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]


def test_default_config_takes_fast_path() -> None:
    batch = build([make_request(), make_request(do_sample=True, temperature=1.0)])
    optional = [batch.temperature, batch.min_p, batch.top_k, batch.top_p, batch.repetition_penalty]
    optional += [batch.output_token_counts, batch.banned_rows, batch.logprob_rows]
    assert all(tensor is None for tensor in optional)
    assert not batch.needs_penalties


def test_repetition_penalty_matches_hf() -> None:
    penalties = [1.0, 1.3, 0.7, 2.0]
    prompts = [[1, 2, 5], [7, 7, 9], [0, 63], [10, 11, 12, 13]]
    outputs = [[4], [9, 20, 20], [], [5, 10]]
    requests = [
        make_request(o, p, repetition_penalty=r) for o, p, r in zip(outputs, prompts, penalties, strict=True)
    ]
    logits = random_logits(4)
    ours = apply_penalties(logits.clone(), build(requests))
    for row, penalty in enumerate(penalties):
        input_ids = torch.tensor([prompts[row] + outputs[row]])
        expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits[row : row + 1].clone())
        torch.testing.assert_close(ours[row], expected[0])


def test_frequency_and_presence_penalties_follow_openai_formula() -> None:
    outputs = [[4, 4, 4, 9], [], [1, 2, 2]]
    configs = [(0.5, 0.25), (1.0, 1.0), (-0.5, 1.5)]
    requests = [
        make_request(o, [4, 5, 6], frequency_penalty=f, presence_penalty=p)
        for o, (f, p) in zip(outputs, configs, strict=True)
    ]
    logits = random_logits(3)
    ours = apply_penalties(logits.clone(), build(requests))
    expected = logits.clone()
    for row, (frequency, presence) in enumerate(configs):
        for token in set(outputs[row]):  # prompt tokens do not count (OpenAI/vLLM)
            expected[row, token] -= frequency * outputs[row].count(token) + presence
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_matches_hf(min_p: float) -> None:
    logits = random_logits(5, seed=1)
    ours = apply_min_p(logits, torch.full((5, 1), min_p))
    expected = logits if min_p == 0.0 else MinPLogitsWarper(min_p)(None, logits.clone())
    assert survivors(ours) == survivors(expected)


@pytest.mark.parametrize("top_k", [1, 2, 10, VOCAB - 1])
def test_top_k_matches_hf(top_k: int) -> None:
    logits = random_logits(5, seed=2)
    ours = apply_top_k_top_p(logits, torch.full((5,), top_k), None)
    expected = TopKLogitsWarper(top_k)(None, logits.clone())
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_hf(top_p: float) -> None:
    logits = random_logits(5, seed=3)
    ours = apply_top_k_top_p(logits, None, torch.full((5,), top_p))
    expected = TopPLogitsWarper(top_p)(None, logits.clone())
    torch.testing.assert_close(ours, expected)


def test_per_row_filters_match_hf_chain() -> None:
    settings = [(0.0, 0, 1.0), (0.1, 5, 0.8), (0.0, 20, 0.5), (0.3, 0, 0.9), (0.02, 3, 1.0)]
    logits = random_logits(len(settings), seed=4)
    min_p = torch.tensor([[s[0]] for s in settings])
    top_k = torch.tensor([s[1] or VOCAB for s in settings])
    top_p = torch.tensor([s[2] for s in settings])
    ours = apply_top_k_top_p(apply_min_p(logits, min_p), top_k, top_p)
    for row, (row_min_p, row_top_k, row_top_p) in enumerate(settings):
        expected = logits[row : row + 1].clone()
        if row_min_p:
            expected = MinPLogitsWarper(row_min_p)(None, expected)
        if row_top_k:
            expected = TopKLogitsWarper(row_top_k)(None, expected)
        if row_top_p < 1.0:
            expected = TopPLogitsWarper(row_top_p)(None, expected)
        assert survivors(ours[row : row + 1]) == survivors(expected)


def test_greedy_rows_take_argmax_in_a_mixed_batch() -> None:
    requests = [
        make_request(),
        make_request(do_sample=True, temperature=1.5, top_p=0.9),
        make_request(do_sample=True, temperature=0.0),
        make_request(do_sample=True, top_k=1),
    ]
    logits = random_logits(4, seed=5)
    result = Sampler().sample(logits, build(requests))
    argmax = logits.argmax(dim=-1).tolist()
    assert [result.token_ids[i] for i in (0, 2, 3)] == [argmax[i] for i in (0, 2, 3)]


def test_greedy_sees_penalties() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 7], logits[0, 8] = 2.0, 1.5
    request = make_request([7], repetition_penalty=2.0)
    assert Sampler().sample(logits, build([request])).token_ids == [8]


def seeded_tokens(batch_requests: list[SamplingRequest], row: int, steps: int) -> list[int]:
    sampler = Sampler()
    tokens = []
    for step in range(steps):
        logits = random_logits(len(batch_requests), seed=100 + step)
        logits[row] = random_logits(1, seed=200 + step)[0]
        tokens.append(sampler.sample(logits, build(batch_requests)).token_ids[row])
    return tokens


def test_seeded_rows_are_reproducible_and_independent_of_the_batch() -> None:
    config = dict(do_sample=True, temperature=1.0, random_seed=1234)
    alone = seeded_tokens([make_request(**config)], 0, 20)
    again = seeded_tokens([make_request(**config)], 0, 20)
    others = [make_request(do_sample=True, top_k=5), make_request(do_sample=True, random_seed=7)]
    crowded = seeded_tokens([others[0], make_request(**config), others[1]], 1, 20)
    assert alone == again == crowded
    assert len(set(alone)) > 3  # really sampling, not a constant
    other_seed = seeded_tokens([make_request(do_sample=True, temperature=1.0, random_seed=99)], 0, 20)
    assert other_seed != alone


def draw_histogram(logits_row: torch.Tensor, num_draws: int, **config) -> torch.Tensor:
    request = make_request(do_sample=True, **config)
    logits = logits_row.expand(num_draws, -1).contiguous()
    torch.manual_seed(0)
    token_ids = Sampler().sample(logits, build([request] * num_draws, logits.shape[-1])).token_ids
    return torch.bincount(torch.tensor(token_ids), minlength=logits.shape[-1]).double()


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic over tokens with nonzero expected probability, and its degrees of freedom."""
    expected = probs.double() * observed.sum()
    support = expected > 0
    assert observed[~support].sum() == 0, "sampled a filtered token"
    statistic = ((observed[support] - expected[support]) ** 2 / expected[support]).sum().item()
    return statistic, int(support.sum()) - 1


def chi_square_critical(degrees_of_freedom: int) -> float:
    """Wilson-Hilferty approximation of the 0.999 quantile of chi-square."""
    z = 3.09
    k = degrees_of_freedom
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


@pytest.mark.parametrize(
    "config",
    [
        dict(temperature=1.0),
        dict(temperature=0.6),
        dict(temperature=1.3, top_k=4),
        dict(top_p=0.8, min_p=0.05),
    ],
)
def test_sampling_distribution_matches_processed_softmax(config: dict) -> None:
    logits_row = torch.randn(12, generator=torch.Generator().manual_seed(6))
    observed = draw_histogram(logits_row, 40_000, **config)
    expected = TemperatureLogitsWarper(config.get("temperature", 0.8))(None, logits_row[None].clone())
    if config.get("min_p"):
        expected = MinPLogitsWarper(config["min_p"])(None, expected)
    if config.get("top_k"):
        expected = TopKLogitsWarper(config["top_k"])(None, expected)
    if config.get("top_p"):
        expected = TopPLogitsWarper(config["top_p"])(None, expected)
    statistic, degrees_of_freedom = chi_square(observed, expected.softmax(dim=-1)[0])
    assert statistic < chi_square_critical(degrees_of_freedom)


def test_chi_square_check_can_fail() -> None:
    logits_row = torch.randn(12, generator=torch.Generator().manual_seed(6))
    observed = draw_histogram(logits_row, 40_000, temperature=1.0)
    statistic, degrees_of_freedom = chi_square(observed, (logits_row / 0.8).softmax(dim=-1))
    assert statistic > chi_square_critical(degrees_of_freedom)


def eos_favoured_logits(rows: int) -> torch.Tensor:
    logits = torch.zeros(rows, VOCAB)
    logits[:, EOS[0]] = 10.0
    logits[:, 40] = 9.0
    logits[:, 41] = 8.0
    return logits


def test_min_new_tokens_masks_eos_and_stop_tokens() -> None:
    requests = [
        make_request([5], min_new_tokens=2, stop_token_ids=[40]),
        make_request([5, 6], min_new_tokens=2, stop_token_ids=[40]),
        make_request([5, 6], min_new_tokens=2, ignore_eos=True, stop_token_ids=[40]),
        make_request([5], min_new_tokens=2, do_sample=True, stop_token_ids=[40], random_seed=0),
    ]
    token_ids = Sampler().sample(eos_favoured_logits(4), build(requests)).token_ids
    assert token_ids[:3] == [41, EOS[0], 40]
    assert token_ids[3] not in (EOS[0], 40)


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    requests = [
        make_request(logprobs=3, do_sample=True, temperature=1.7, repetition_penalty=1.5, prompt=[1, 2]),
        make_request(),
        make_request(logprobs=0),
        make_request(logprobs=5, frequency_penalty=1.0, output=[9, 9]),
    ]
    logits = random_logits(4, seed=8)
    result = Sampler().sample(logits, build(requests))
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert result.logprobs[1] is None
    for row, k in ((0, 3), (2, 0), (3, 5)):
        logprob = result.logprobs[row]
        assert logprob is not None and logprob.token_id == result.token_ids[row]
        assert logprob.logprob == pytest.approx(reference[row, logprob.token_id].item(), abs=1e-5)
        top_values, top_ids = reference[row].topk(k)
        assert [token for token, _ in logprob.top] == top_ids.tolist()
        assert [value for _, value in logprob.top] == pytest.approx(top_values.tolist(), abs=1e-5)


def test_logit_bias_matches_hf_sequence_bias_per_row() -> None:
    from transformers.generation.logits_process import SequenceBiasLogitsProcessor

    biases = [{5: 2.5, 9: -100.0}, {}, {5: -1.0, 63: 7.0}]
    requests = [make_request(logit_bias=bias or None) for bias in biases]
    logits = random_logits(3)
    ours = apply_penalties(logits.clone(), build(requests))
    for row, bias in enumerate(biases):
        expected = logits[row : row + 1]
        if bias:
            hf = SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})
            expected = hf(torch.zeros(1, 1, dtype=torch.long), expected.clone())
        torch.testing.assert_close(ours[row : row + 1], expected)


def test_logit_bias_steers_greedy_and_sampled_rows_but_not_logprobs() -> None:
    requests = [
        make_request(logit_bias={17: 100.0}, logprobs=1),
        make_request(do_sample=True, temperature=1.0, random_seed=3, logit_bias={42: 100.0}),
    ]
    logits = random_logits(2)
    result = Sampler().sample(logits.clone(), build(requests))
    assert result.token_ids == [17, 42]
    raw = logits[0].log_softmax(-1)
    first = result.logprobs[0]
    assert first is not None and math.isclose(first.logprob, float(raw[17]), rel_tol=1e-5)


def test_logit_bias_never_unbans_min_new_tokens() -> None:
    request = make_request(logit_bias={EOS[0]: 100.0}, min_new_tokens=2)
    out = apply_penalties(random_logits(1), build([request]))
    assert out[0, EOS[0]] == float("-inf")


@pytest.mark.parametrize("bias", [{1: 100.5}, {-1: 1.0}, {2: float("nan")}])
def test_logit_bias_out_of_range_is_an_error_naming_the_field(bias: dict[int, float]) -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        GenerationConfig(logit_bias=bias)


def test_logit_bias_token_outside_vocab_is_refused() -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        build([make_request(logit_bias={VOCAB: 1.0})])


# ops that wait for the device on CUDA: a step that calls one cannot overlap with the next
_SYNCING_OPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.equal")


class _SyncingOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that would make the host wait for the GPU (seen here on the CPU, where they are cheap)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if name.startswith(_SYNCING_OPS):
            self.seen.append(name)
        # `t[idx] = scalar` on CUDA copies a host 0-dim value to the device: a synchronous copy
        if name.startswith("aten.index_put") and isinstance(args[2], torch.Tensor) and args[2].dim() == 0:
            self.seen.append(f"{name} with a host scalar")
        return func(*args, **(kwargs or {}))


def test_sampling_on_the_device_calls_nothing_that_waits_for_it() -> None:
    requests = [
        make_request([5], min_new_tokens=2, stop_token_ids=[40], logprobs=2),
        make_request(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, random_seed=3),
        make_request([1], logit_bias={7: 2.0}, ignore_eos=True),
        make_request(),
    ]
    batch = build(requests)
    with _SyncingOps() as ops:
        sample = Sampler().sample_on_device(random_logits(4, seed=2), batch)
    assert ops.seen == []
    assert len(sample.result().token_ids) == 4
