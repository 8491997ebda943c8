"""Starting tp ranks 1..tp-1 (multiprocessing on this node, or Ray actors in a placement group) and watching them.

Rank 0 lives in the engine (core) process. A worker that dies ends that process at once with exit code 1
and a log line naming the rank: its peers may be blocked in a collective that would never return, and a
server's front end reports a dead core (no hang).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import threading
from dataclasses import replace
from typing import Any

import torch

from lmserve.distributed.parallel_state import init_tensor_parallel, share_cpu_cores
from lmserve.distributed.worker import WorkerSpec, run_worker

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 30.0


class Workers:
    """The running workers of one engine; `stop` after rank 0 broadcast the shutdown."""

    def __init__(self) -> None:
        self.stopping = False
        # at interpreter exit multiprocessing terminates daemon workers (and Ray its actors): not a failure
        atexit.register(self._exiting)

    def _exiting(self) -> None:
        self.stopping = True

    def rank0_device(self, device: torch.device) -> torch.device:
        """The device rank 0 (this process) runs on: cuda:0 here, unless the executor placed a worker there."""
        return device

    def stop(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        """End the workers now (rank 0 failed before they could be shut down in order)."""
        raise NotImplementedError

    def died(self, who: str, why: str) -> None:
        """Called by the watcher when a worker ended on its own: fail the engine loudly, now."""
        if self.stopping:
            return
        logger.critical("tensor-parallel %s died (%s); the engine stops", who, why)
        os._exit(1)


class ProcessWorkers(Workers):
    """Ranks 1..tp-1 as spawned processes, one per GPU (cuda:rank)."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__()
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(target=run_worker, args=(rank, spec), name=f"lmserve-tp{rank}", daemon=True)
            for rank in range(1, spec.config.tp)
        ]
        for process in self.processes:
            process.start()
        threading.Thread(target=self._watch, name="lmserve-tp-watch", daemon=True).start()

    def _watch(self) -> None:
        sentinels = {process.sentinel: process for process in self.processes}
        ready = multiprocessing.connection.wait(list(sentinels))
        process = sentinels[ready[0]]  # type: ignore[index]
        process.join()
        self.died(f"worker {process.name} (pid {process.pid})", f"exit code {process.exitcode}")

    def stop(self) -> None:
        self.stopping = True
        for process in self.processes:
            process.join(JOIN_TIMEOUT_S)
            if process.is_alive():
                process.kill()

    def kill(self) -> None:
        self.stopping = True
        for process in self.processes:
            process.kill()
            process.join()


class RayWorkers(Workers):
    """Ranks 1..tp-1 as Ray actors in a placement group (one GPU or one CPU per bundle), any node."""

    def __init__(self, spec: WorkerSpec, use_gpus: bool) -> None:
        super().__init__()
        ray = import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"))  # None: start a local Ray, else join the cluster
        bundle = {"GPU": 1, "CPU": 1} if use_gpus else {"CPU": 1}
        self.group = placement_group([bundle] * (spec.config.tp - 1), strategy="PACK")
        ray.get(self.group.ready())
        actor = ray.remote(num_cpus=1, num_gpus=1 if use_gpus else 0)(RayRank)
        self.actors = [
            actor.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=i
                )
            ).remote()
            for i in range(spec.config.tp - 1)
        ]
        self.worker_gpus = self._gpus_on_this_node() if use_gpus else set()
        device_index = 0 if use_gpus else None  # Ray shows each actor only its own GPU
        self.runs = [a.run.remote(rank + 1, spec, device_index) for rank, a in enumerate(self.actors)]
        threading.Thread(target=self._watch, name="lmserve-tp-watch", daemon=True).start()

    def _gpus_on_this_node(self) -> set[int]:
        """The GPUs of this node that Ray gave to worker actors (rank 0 must not share one: NCCL refuses)."""
        ray = import_ray()
        here = ray.util.get_node_ip_address()
        placed = ray.get([actor.gpu_ids.remote() for actor in self.actors])
        return {int(gpu) for node, gpus in placed if node == here for gpu in gpus}

    def rank0_device(self, device: torch.device) -> torch.device:
        if device.type != "cuda":
            return device
        free = [i for i in range(torch.cuda.device_count()) if i not in self.worker_gpus]
        if not free:
            raise ValueError(
                "--distributed-executor-backend ray placed tp workers on every GPU of this node; "
                "rank 0 (the engine) needs one of its own"
            )
        return torch.device("cuda", free[0])

    def _watch(self) -> None:
        ray = import_ray()
        done, _ = ray.wait(self.runs, num_returns=1, timeout=None)
        rank = self.runs.index(done[0]) + 1
        try:
            ray.get(done[0])
            why = "returned"
        except Exception as error:  # the actor's exception, or RayActorError when its process died
            why = f"{type(error).__name__}: {error}"
        self.died(f"Ray worker rank {rank}", why)

    def stop(self) -> None:
        self.stopping = True
        ray = import_ray()
        from ray.util.placement_group import remove_placement_group

        ray.wait(self.runs, num_returns=len(self.runs), timeout=JOIN_TIMEOUT_S)
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.group)

    def kill(self) -> None:
        self.stopping = True
        ray = import_ray()
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.group)


class RayRank:
    """The Ray actor of one worker rank."""

    def run(self, rank: int, spec: WorkerSpec, device_index: int | None) -> None:
        run_worker(rank, spec, device_index)

    def gpu_ids(self) -> tuple[str, list[int]]:
        import ray

        return ray.util.get_node_ip_address(), [int(gpu) for gpu in ray.get_gpu_ids()]


def import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise ValueError(
            "--distributed-executor-backend ray needs Ray: pip install 'lmserve[ray]'"
        ) from error
    return ray


def start_workers(spec: WorkerSpec, device: torch.device) -> tuple[Workers, torch.device]:
    """Start ranks 1..tp-1 and join the group as rank 0 (spec.init_method is filled in here); returns the
    workers and rank 0's device."""
    config = spec.config
    host = "127.0.0.1"
    if config.distributed_executor_backend == "ray":
        host = import_ray().util.get_node_ip_address()
    spec = replace(spec, init_method=f"tcp://{host}:{free_port(host)}")
    workers: Workers
    if config.distributed_executor_backend == "ray":
        workers = RayWorkers(spec, use_gpus=device.type == "cuda")
    else:
        workers = ProcessWorkers(replace(spec, parent_pid=os.getpid()))
    device = workers.rank0_device(device)
    init_tensor_parallel(0, config.tp, spec.init_method, device)
    share_cpu_cores(config, device)
    return workers, device


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
