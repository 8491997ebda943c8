"""The tensor-parallel group of this process: rank, world size, and the collectives the model layers call."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmserve.config import EngineConfig

COLLECTIVE_TIMEOUT_S = 300.0
"""A collective waiting this long means a peer is gone or stuck: it raises instead of hanging the engine."""
IDLE_TIMEOUT = datetime.timedelta(days=365)
"""Workers wait on the control group between requests, possibly for days: it has no practical timeout."""


@dataclass(frozen=True)
class TensorParallelGroup:
    """This process's place among the tp ranks; world_size 1 means no torch.distributed at all."""

    rank: int = 0
    world_size: int = 1
    device_group: Any = None
    """Process group of the activations' collectives (NCCL on CUDA, gloo on CPU)."""
    control_group: Any = None
    """gloo group of rank 0's per-step broadcast (host tensors, no timeout)."""


_group = TensorParallelGroup()


def tp_group() -> TensorParallelGroup:
    return _group


def tp_rank() -> int:
    return _group.rank


def tp_size() -> int:
    return _group.world_size


def check_collective_dtype(device: torch.device, dtype: torch.dtype, tp: int) -> None:
    """gloo (the CPU backend) all-reduces float32 only: refuse bfloat16/float16 with tp > 1 on the CPU."""
    if tp > 1 and device.type == "cpu" and dtype != torch.float32:
        raise ValueError(
            f"--tp {tp} on the CPU runs over gloo, which has no {str(dtype).removeprefix('torch.')} "
            "all-reduce; pass --dtype float32"
        )


def share_cpu_cores(config: EngineConfig, device: torch.device) -> None:
    """CPU ranks of the mp executor share this machine's cores: each runs cores // tp torch threads, unless
    --num-cpu-threads says otherwise. OpenMP threads of several processes spinning on the same cores slow
    every rank many times over (tp=3 on 2 cores: 3.3 s a decode step of SmolLM2 instead of 0.3 s)."""
    if device.type != "cpu" or config.tp == 1 or config.distributed_executor_backend != "mp":
        return
    if not config.num_cpu_threads:
        torch.set_num_threads(max(1, torch.get_num_threads() // config.tp))


def init_tensor_parallel(
    rank: int,
    world_size: int,
    init_method: str,
    device: torch.device,
    timeout_s: float = COLLECTIVE_TIMEOUT_S,
) -> TensorParallelGroup:
    """Join the tp group (every rank calls it with the same init_method, e.g. tcp://127.0.0.1:PORT)."""
    global _group
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout
    )
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    _group = TensorParallelGroup(rank, world_size, dist.group.WORLD, control)
    return _group


def destroy_tensor_parallel() -> None:
    """Leave the group (idempotent); the process is a single rank again."""
    global _group
    if dist.is_initialized():
        dist.destroy_process_group()
    _group = TensorParallelGroup()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over the ranks, in place (CUDA-graph capturable on NCCL); x itself when tp == 1."""
    if _group.world_size > 1:
        dist.all_reduce(x, group=_group.device_group)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The ranks' x concatenated along dim, on every rank."""
    if _group.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_group.world_size)]
    dist.all_gather(parts, x.contiguous(), group=_group.device_group)
    return torch.cat(parts, dim=dim)


def gather_to_first(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The ranks' x concatenated along dim on rank 0 (which samples); other ranks get their own x back."""
    if _group.world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_group.world_size)] if _group.rank == 0 else None
    dist.gather(x, parts, dst=0, group=_group.device_group)
    return torch.cat(parts, dim=dim) if parts is not None else x


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's value (the KV cache size all ranks can hold)."""
    if _group.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=_group.control_group)
    return int(tensor.item())
