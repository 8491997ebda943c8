"""lite auto_awq / smooth_quant / calibrate end to end on tiny random Llama-family models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmserve.cli.main import main
from lmserve.layers.quant_formats import awq_dequantize
from lmserve.models.loader import load_model_config, resolve_model
from lmserve.quant import quantize
from lmserve.quant.calibrate import STATS_FILE, load_float_model
from lmserve.quant.checkpoint import load_quantized_model
from lmserve.quant.quantize import (
    AWQOptions,
    CalibrationOptions,
    auto_awq,
    calibrate,
    smooth_quant,
    warn_small_calibration,
)

CALIB = CalibrationOptions(calib_samples=4, calib_seqlen=64)


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lmserve.quant.corpus import load_text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([load_text("kjv", "calib")[:50_000]], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>").save_pretrained(str(folder))


def _tiny_model(folder: Path, architecture: str = "LlamaForCausalLM", **overrides: object) -> Path:
    import transformers

    torch.manual_seed(0)
    kwargs: dict[str, object] = dict(
        vocab_size=320,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=0,
    )
    kwargs.update(overrides)
    config_class = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
    }[architecture]
    model = getattr(transformers, architecture)(config_class(**kwargs))
    model.save_pretrained(str(folder))
    _save_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _ids() -> torch.Tensor:
    return torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(5))


def _logits_from_dequantized(model_dir: Path, float_source: Path) -> torch.Tensor:
    """Independent path: the float HF model with plain Linear weights set to the unpacked checkpoint."""
    float_model = load_float_model(str(float_source)).model
    tensors = load_file(str(model_dir / "model.safetensors"))
    group_size = json.loads((model_dir / "config.json").read_text())["quantization_config"]["group_size"]
    with torch.no_grad():
        for name, param in float_model.named_parameters():
            base = name.removesuffix(".weight")
            if f"{base}.qweight" in tensors:
                weight = awq_dequantize(
                    tensors[f"{base}.qweight"],
                    tensors[f"{base}.qzeros"],
                    tensors[f"{base}.scales"].float(),
                    group_size,
                )
                param.copy_(weight.t())
            elif name in tensors:
                param.copy_(tensors[name].float())
        return float_model(_ids()).logits


@pytest.mark.parametrize("mode", ["rtn", "fixed", "search"])
def test_awq_save_reload_gives_identical_logits(tiny: Path, tmp_path: Path, mode: str) -> None:
    options = AWQOptions(w_group_size=32, search_scale=mode == "search", rtn=mode == "rtn")
    out = auto_awq(str(tiny), tmp_path / "awq", CALIB, options)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 32,
        "zero_point": True,
        "version": "gemm",
    }
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].shape == (128, 128 // 8)
    assert tensors["model.layers.0.mlp.down_proj.scales"].dtype == torch.float16
    assert (
        tensors["lm_head.weight"].dtype == torch.float16
        and "model.layers.0.self_attn.q_proj.weight" not in tensors
    )
    assert (out / "tokenizer.json").is_file()
    reloaded = load_quantized_model(out)
    with torch.no_grad():
        logits = reloaded(_ids()).logits
    torch.testing.assert_close(logits, _logits_from_dequantized(out, tiny), rtol=1e-5, atol=1e-5)
    reloaded_again = load_quantized_model(out)
    with torch.no_grad():
        assert torch.equal(reloaded_again(_ids()).logits, logits)


def test_awq_output_tracks_float_model(tiny: Path, tmp_path: Path) -> None:
    float_logits = load_float_model(str(tiny)).model(_ids()).logits
    out = auto_awq(str(tiny), tmp_path / "awq", CALIB, AWQOptions(w_group_size=32, search_scale=True))
    with torch.no_grad():
        quant_logits = load_quantized_model(out)(_ids()).logits
    similarity = F.cosine_similarity(quant_logits.flatten(), float_logits.flatten(), dim=0)
    assert similarity > 0.9


def test_smooth_quant_writes_compressed_tensors_and_stays_close(tiny: Path, tmp_path: Path) -> None:
    out = smooth_quant(str(tiny), tmp_path / "sq", CALIB, alpha=0.5)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    group = config["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"] == group[
        "input_activations"
    ] | {"strategy": "token", "dynamic": True}
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.1.mlp.up_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.1.mlp.up_proj.weight_scale"].shape == (256, 1)
    float_logits = load_float_model(str(tiny)).model(_ids()).logits
    with torch.no_grad():
        quant_logits = load_quantized_model(out)(_ids()).logits
    assert ((quant_logits - float_logits).norm() / float_logits.norm()) < 0.05
    assert (out / STATS_FILE).is_file()


def test_calibrate_stats_are_reused(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = calibrate(str(tiny), tmp_path / "work", CALIB)
    stats = torch.load(path, weights_only=True)
    assert set(stats) >= {"absmax", "absmean", "max", "min", "mean", "settings"}
    assert stats["absmax"]["model.layers.1.mlp.down_proj"].shape == (256,)

    def no_second_pass(*_args: object) -> None:
        raise AssertionError("statistics should have been reused")

    monkeypatch.setattr(quantize, "_collect", no_second_pass)
    smooth_quant(str(tiny), tmp_path / "work", CALIB)
    assert (tmp_path / "work" / "config.json").is_file() and path.is_file()


def _assert_nothing_written(parent: Path) -> None:
    assert list(parent.iterdir()) == [], "a failed run left files behind"


@pytest.mark.parametrize(
    ("options", "calib", "error", "match"),
    [
        (AWQOptions(w_bits=3), CALIB, ValueError, "w_bits=3"),
        (AWQOptions(w_group_size=48), CALIB, ValueError, "w_group_size=48 does not divide"),
        (
            AWQOptions(w_group_size=32),
            CalibrationOptions(calib_dataset="/no/such/file.txt"),
            FileNotFoundError,
            "file.txt",
        ),
    ],
)
def test_auto_awq_bad_input(
    tiny: Path, tmp_path: Path, options: AWQOptions, calib: CalibrationOptions, error: type, match: str
) -> None:
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(error, match=match):
        auto_awq(str(tiny), parent / "work", calib, options)
    _assert_nothing_written(parent)


def test_unsupported_architecture(tmp_path: Path) -> None:
    import transformers

    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    ).save_pretrained(str(folder))
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported"):
        auto_awq(str(folder), parent / "work", CALIB, AWQOptions(w_group_size=32))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported"):
        smooth_quant(str(folder), parent / "work", CALIB)
    _assert_nothing_written(parent)


def test_failure_midway_leaves_nothing(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(quantize, "save_tokenizer", broken)
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(RuntimeError, match="disk full"):
        auto_awq(str(tiny), parent / "work", CALIB, AWQOptions(w_group_size=32, rtn=True))
    _assert_nothing_written(parent)


def test_qwen2_with_biases(tmp_path: Path) -> None:
    folder = _tiny_model(tmp_path / "qwen2", "Qwen2ForCausalLM")
    out = auto_awq(str(folder), tmp_path / "awq", CALIB, AWQOptions(w_group_size=32, search_scale=True))
    tensors = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.bias" in tensors
    with torch.no_grad():
        logits = load_quantized_model(out)(_ids()).logits
    torch.testing.assert_close(logits, _logits_from_dequantized(out, folder), rtol=1e-5, atol=1e-5)


def test_cli_reports_bad_group_size(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["lite", "auto_awq", str(tiny), "--work-dir", str(tmp_path / "w"), "--w-group-size", "100"])
    assert code == 2 and "w_group_size=100 does not divide" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_cli_round_trip_and_eval(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "w"
    args = ["--work-dir", str(work), "--w-group-size", "32", "--calib-samples", "2", "--calib-seqlen", "32"]
    assert main(["lite", "auto_awq", str(tiny), *args, "--eval-tokens", "300"]) == 0
    captured = capsys.readouterr()
    assert (
        "2 x 32 = 64 calibration tokens are fewer than the widest layer input (256 features)" in captured.err
    )
    quality = captured.out.splitlines()[-1]  # held-out perplexity (...): X before, Y after (+Z %)
    before, after = (float(quality.split()[i]) for i in (-6, -4))
    for folder, expected in ((tiny, before), (work, after)):  # `eval ppl` on the same 300 tokens agrees
        assert main(["eval", "ppl", str(folder), "--num-tokens", "300"]) == 0
        assert float(capsys.readouterr().out.split()[1]) == pytest.approx(expected, abs=1e-4)
    assert main(["eval", "ppl", str(work), "--num-tokens", "300", "--window", "64", "--stride", "64"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "window 64, stride 64" in out


def test_eval_ppl_through_the_engine_matches_transformers(tiny: Path, capsys: pytest.CaptureFixture) -> None:
    """`eval ppl --quant-policy 0` (lmserve's engine, paged KV) gives transformers' perplexity; int8 KV moves it a little."""
    from lmserve.quant.evaluate import evaluate_perplexity

    hf = evaluate_perplexity(str(tiny), "kjv", 600, 128, 96)
    plain = evaluate_perplexity(str(tiny), "kjv", 600, 128, 96, quant_policy=0)
    assert plain.num_scored_tokens == hf.num_scored_tokens == 599
    assert plain.perplexity == pytest.approx(hf.perplexity, rel=1e-5)
    args = ["eval", "ppl", str(tiny), "--quant-policy", "8", "--num-tokens", "600", "--window", "128"]
    assert main([*args, "--stride", "96"]) == 0
    int8 = float(capsys.readouterr().out.split()[1])
    assert int8 != pytest.approx(plain.perplexity, rel=1e-7)
    assert int8 == pytest.approx(plain.perplexity, rel=1e-2)


def test_a_calibration_smaller_than_the_widest_input_warns(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tiny's widest linear input is down_proj's 256: fewer calibration tokens leave its Hessian rank-deficient."""
    config = load_model_config(resolve_model(str(tiny)))
    assert not warn_small_calibration(config, CalibrationOptions(calib_samples=4, calib_seqlen=64))
    assert capsys.readouterr().err == ""
    assert warn_small_calibration(config, CalibrationOptions(calib_samples=2, calib_seqlen=127))
    assert "2 x 127 = 254 calibration tokens" in capsys.readouterr().err
