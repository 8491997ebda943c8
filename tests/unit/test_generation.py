"""GenerationConfig: the n-choice fan-out shared by pipeline() and the server."""

from __future__ import annotations

from lmserve.generation import GenerationConfig


def test_fan_out_gives_n_single_configs_with_consecutive_seeds() -> None:
    configs = GenerationConfig(n=3, random_seed=10, do_sample=True).fan_out()
    assert [c.n for c in configs] == [1, 1, 1]
    assert [c.random_seed for c in configs] == [10, 11, 12]
    assert all(c.do_sample for c in configs)


def test_fan_out_keeps_unseeded_choices_unseeded_and_n1_unchanged() -> None:
    assert [c.random_seed for c in GenerationConfig(n=2).fan_out()] == [None, None]
    single = GenerationConfig(max_new_tokens=7)
    assert single.fan_out() == [single]
