"""Test helpers for tensor parallelism: tiny checkpoints on disk, and ranks run as spawned processes on loopback."""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmserve.layers.quant_formats import awq_quantization_config
from tests.serve.conftest import children_of, free_port

RANK_TIMEOUT_S = 240.0


def run_ranks(target: Callable[..., None], world_size: int, *args: Any) -> None:
    """Run target(rank, world_size, init_method, *args) in world_size spawned processes; fail if any fails."""
    init_method = f"tcp://127.0.0.1:{free_port()}"
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=target, args=(rank, world_size, init_method, *args))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(RANK_TIMEOUT_S)
    for process in processes:
        if process.is_alive():
            process.kill()
    codes = [process.exitcode for process in processes]
    assert codes == [0] * world_size, f"rank exit codes {codes}"


def save_folder(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """An HF model folder: config.json and one safetensors file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({name: t.detach().clone() for name, t in tensors.items()}, str(folder / "model.safetensors"))
    return folder


AWQ_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_awq_tensors(hf_model: Any, group_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The HF model's state dict with every projection replaced by random AutoAWQ GEMM tensors."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_model.state_dict().items():
        module, _, param = name.rpartition(".")
        if module.rsplit(".", 1)[-1] not in AWQ_PROJECTIONS:
            out[name] = tensor
        elif param == "weight":
            num_out, num_in = tensor.shape
            num_groups = num_in // group_size
            out[f"{module}.qweight"] = _random_int32((num_in, num_out // 8), generator)
            out[f"{module}.qzeros"] = _random_int32((num_groups, num_out // 8), generator)
            scales = torch.rand(num_groups, num_out, generator=generator) * 0.01 + 0.001
            out[f"{module}.scales"] = scales.half()
        else:
            out[name] = tensor  # biases stay float
    return out


def random_w8a8_tensors(hf_model: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """The HF model's state dict with every projection replaced by random compressed-tensors int8 tensors."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_model.state_dict().items():
        module, _, param = name.rpartition(".")
        if module.rsplit(".", 1)[-1] not in AWQ_PROJECTIONS or param != "weight":
            out[name] = tensor
            continue
        out[name] = torch.randint(-127, 128, tensor.shape, generator=generator).to(torch.int8)
        out[f"{module}.weight_scale"] = torch.rand(tensor.shape[0], 1, generator=generator) * 0.002 + 0.0005
    return out


def _random_int32(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int64, generator=generator).to(torch.int32)


def awq_config(hf_config: dict[str, Any], group_size: int) -> dict[str, Any]:
    return {**hf_config, "quantization_config": awq_quantization_config(4, group_size)}


def spawned_children_of(pid: int) -> list[int]:
    """Children of pid started by multiprocessing's spawn (engine core, tp workers)."""
    return [c for c in children_of(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
