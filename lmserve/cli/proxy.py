"""`lmserve serve proxy`: one OpenAI endpoint routing over many api_server nodes (LMDeploy's flags and port)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from lmserve.config import ROUTING_STRATEGIES, ProxyConfig

LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def add_proxy_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "proxy",
        help="route requests over many api_server nodes (port 8000)",
        description="One OpenAI-compatible endpoint in front of api_server nodes. Nodes join with "
        "`serve api_server --proxy-url URL`, with --nodes, or with POST /nodes/add.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--server-name", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--server-port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--routing-strategy",
        choices=ROUTING_STRATEGIES,
        default="min_expected_latency",
        help="how a request picks a node: fewest unfinished requests per unit of speed, at random "
        "weighted by speed, or lowest mean latency of the last requests",
    )
    parser.add_argument(
        "--api-keys", nargs="+", default=None, help="accept only these keys (Authorization: Bearer KEY)"
    )
    parser.add_argument("--nodes", nargs="+", default=(), metavar="URL", help="api_server URLs to start with")
    parser.add_argument(
        "--health-check-interval",
        type=float,
        default=5.0,
        help="seconds between health probes; a node that fails one gets no requests until it passes one",
    )
    parser.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, default="WARNING", help="log level"
    )
    parser.set_defaults(func=run_proxy)


def proxy_config_from_args(args: argparse.Namespace) -> ProxyConfig:
    return ProxyConfig(
        server_name=args.server_name,
        server_port=args.server_port,
        routing_strategy=args.routing_strategy,
        api_keys=tuple(args.api_keys or ()),
        nodes=tuple(args.nodes),
        health_check_interval=args.health_check_interval,
        log_level=args.log_level,
    )


def run_proxy(args: argparse.Namespace) -> int:
    import uvicorn

    from lmserve.serve.proxy.app import create_proxy_app

    config = proxy_config_from_args(args)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = "localhost" if config.server_name in ("0.0.0.0", "::") else config.server_name
    print(f"lmserve: proxy at http://{host}:{config.server_port}/v1 (OpenAI API)", flush=True)
    uvicorn.run(
        create_proxy_app(config),
        host=config.server_name,
        port=config.server_port,
        log_level=config.log_level.lower(),
    )
    return 0
