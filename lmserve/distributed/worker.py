"""A tp worker (ranks 1..tp-1): builds its shard and KV cache as rank 0 does, then runs every step rank 0 sends."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from lmserve.config import EngineConfig
from lmserve.distributed.parallel_state import (
    destroy_tensor_parallel,
    init_tensor_parallel,
    share_cpu_cores,
    tp_group,
)
from lmserve.distributed.step_channel import StepChannel

logger = logging.getLogger(__name__)

PARENT_POLL_S = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker builds from (plain, picklable): the model as rank 0 got it, and where to meet."""

    model: str | None
    config: EngineConfig
    init_method: str
    random_config_json: str | None = None
    """Set for random-weight engines (benchmarks): the HF config.json the shapes come from."""
    parent_pid: int | None = None
    """mp workers leave when this process (the engine core) is gone; Ray owns its actors' lifetime."""
    log_level: str = "WARNING"


def run_worker(rank: int, spec: WorkerSpec, device_index: int | None = None) -> None:
    """Process (or Ray actor) entry point of tp rank `rank`; returns when rank 0 shuts the group down."""
    logging.basicConfig(
        level=spec.log_level, format=f"%(asctime)s %(levelname)s %(name)s[tp{rank}]: %(message)s"
    )
    if spec.parent_pid is not None:
        _exit_with_parent(spec.parent_pid)
    runner = build_worker(rank, spec, rank if device_index is None else device_index)
    channel = StepChannel(tp_group().control_group)
    try:
        while (chunks := channel.receive()) is not None:
            runner.run_chunks(chunks)
    finally:
        destroy_tensor_parallel()


def build_worker(rank: int, spec: WorkerSpec, device_index: int) -> Any:
    """The worker's ModelRunner over its shard, after joining the group (the same steps as rank 0's engine)."""
    from lmserve.engine import builder
    from lmserve.engine.engine import apply_torch_settings, build_runner, random_model_config

    config = spec.config
    if spec.random_config_json is not None:
        model_config = random_model_config(spec.random_config_json, config)
        source = None
    else:
        from lmserve.models.loader import model_config_to_build, resolve_model

        source = resolve_model(spec.model)
        model_config = model_config_to_build(source, config.model_format)
    resolved = builder.resolve_config(config, model_config, device_index)
    init_tensor_parallel(rank, config.tp, spec.init_method, resolved.device)
    share_cpu_cores(config, resolved.device)
    apply_torch_settings(config)
    if source is None:
        net = builder.random_model(model_config, resolved)
    else:
        net = builder.load_model(source, model_config, resolved)
    runner, _ = build_runner(config, model_config, net, resolved, eos_token_ids=())
    return runner


def _exit_with_parent(parent_pid: int) -> None:
    """A worker whose engine core is gone (kill -9 included) exits instead of waiting forever."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        logger.error("engine core (pid %d) is gone; tp worker exits", parent_pid)
        os._exit(1)

    threading.Thread(target=watch, name="lmserve-tp-parent-watch", daemon=True).start()
