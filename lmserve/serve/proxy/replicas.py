"""`serve api_server --dp N`: N api_server replicas on this host (one GPU each) behind an in-process proxy."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from lmserve.config import EngineConfig, ProxyConfig, ServeConfig

logger = logging.getLogger("lmserve.serve")

REPLICA_HOST = "127.0.0.1"  # replicas are reached through the proxy only
REPLICA_HEALTH_INTERVAL_S = 1.0
WATCH_S = 0.2


def replica_gpus(engine_config: EngineConfig, dp: int) -> list[list[int]] | None:
    """The GPU ids of each replica (replica i on GPUs i*tp .. i*tp+tp-1); None when the replicas run on CPU."""
    if engine_config.device == "cpu":
        return None
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 and engine_config.device == "auto":
        return None
    tp = engine_config.tp
    if dp * tp > count:
        raise ValueError(f"--dp {dp} (x --tp {tp}) needs {dp * tp} GPUs; {count} CUDA GPU(s) present")
    return [list(range(index * tp, (index + 1) * tp)) for index in range(dp)]


def replica_ports(server_port: int, dp: int) -> list[int]:
    """server_port + 1 .. server_port + dp (as LMDeploy numbers its dp servers), each free on loopback."""
    ports = list(range(server_port + 1, server_port + dp + 1))
    if ports[-1] > 65535:
        raise ValueError(
            f"--dp {dp} needs ports {ports[0]}..{ports[-1]} above --server-port; the last is > 65535"
        )
    for port in ports:
        with socket.socket() as probe:
            try:
                probe.bind((REPLICA_HOST, port))
            except OSError as error:
                raise ValueError(
                    f"--dp {dp}: replica port {port} (--server-port + n) is in use: {error}"
                ) from error
    return ports


def serve_replicas(args: argparse.Namespace, serve_config: ServeConfig, engine_config: EngineConfig) -> int:
    """Start the replicas, serve the proxy on --server-port until SIGINT/SIGTERM (0) or until every replica
    has died (1). A replica that dies is logged and routed around; the others keep serving."""
    import uvicorn

    from lmserve.cli.front_ends import listening_socket, sigterm_exits_cleanly, stop_all
    from lmserve.serve.proxy.app import create_proxy_app

    dp = args.dp
    gpus = replica_gpus(engine_config, dp)
    ports = replica_ports(serve_config.server_port, dp)
    sock = listening_socket(serve_config.server_name, serve_config.server_port)  # a port in use fails first
    proxy_config = ProxyConfig(
        server_name=serve_config.server_name,
        server_port=serve_config.server_port,
        api_keys=serve_config.api_keys,
        nodes=tuple(f"http://{REPLICA_HOST}:{port}" for port in ports),
        health_check_interval=REPLICA_HEALTH_INTERVAL_S,
        log_level=serve_config.log_level,
    )
    server = uvicorn.Server(
        uvicorn.Config(create_proxy_app(proxy_config), log_level=serve_config.log_level.lower())
    )
    replicas = _start_replicas(args, ports, gpus)
    all_died = _watch_replicas(replicas, ports, lambda: setattr(server, "should_exit", True))
    try:
        with sigterm_exits_cleanly():
            server.run(sockets=[sock])
    finally:
        stop_all(replicas)
    return 1 if all_died.is_set() else 0


def _start_replicas(args: argparse.Namespace, ports: list[int], gpus: list[list[int]] | None) -> list[Any]:
    context = multiprocessing.get_context("spawn")
    replicas: list[Any] = []
    for index, port in enumerate(ports):
        replica_args = argparse.Namespace(**vars(args))
        replica_args.dp, replica_args.proxy_url = 1, None
        replica_args.server_name, replica_args.server_port = REPLICA_HOST, port
        devices = gpus[index] if gpus is not None else None
        replicas.append(
            context.Process(target=run_replica, args=(replica_args, devices), name=f"lmserve-replica-{index}")
        )
        replicas[-1].start()
    return replicas


def _watch_replicas(replicas: list[Any], ports: list[int], stop: Any) -> threading.Event:
    """A thread that reports each replica that exits, and calls stop() once none is left."""
    all_died = threading.Event()

    def loop() -> None:
        reported: set[int] = set()
        while len(reported) < len(replicas):
            for index, replica in enumerate(replicas):
                if index not in reported and not replica.is_alive():
                    reported.add(index)
                    logger.error(
                        "replica %d (port %d, pid %s) exited with code %s; %d of %d still serving",
                        index,
                        ports[index],
                        replica.pid,
                        replica.exitcode,
                        len(replicas) - len(reported),
                        len(replicas),
                    )
            time.sleep(WATCH_S)
        all_died.set()
        stop()

    threading.Thread(target=loop, name="lmserve-replica-watcher", daemon=True).start()
    return all_died


def run_replica(args: argparse.Namespace, gpu_ids: list[int] | None) -> None:
    """Process entry point of one replica: its GPUs only, then a plain api_server on its own port."""
    if gpu_ids is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in gpu_ids)
    _stop_with_parent()
    from lmserve.cli.serve import run_api_server

    try:
        sys.exit(run_api_server(args))
    except (ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"lmserve: error: replica on port {args.server_port}: {error}", file=sys.stderr)
        sys.exit(2)


def _stop_with_parent() -> None:
    """SIGTERM ourselves (a graceful stop) if the process that started us is gone: no orphan replicas."""
    parent = os.getppid()

    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=loop, name="lmserve-parent-watcher", daemon=True).start()
