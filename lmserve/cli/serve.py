"""`lmserve serve api_server [MODEL]` (OpenAI-compatible server), `serve proxy` (router over servers) and
`lmserve serve api_client URL` (terminal chat)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from lmserve.cli.engine_args import add_adapter_args, add_engine_args, engine_config_from_args
from lmserve.cli.proxy import add_proxy_parser
from lmserve.config import ServeConfig
from lmserve.lora.adapter import parse_adapters
from lmserve.serve.reasoning import REASONING_PARSERS
from lmserve.serve.tool_parsers import TOOL_PARSERS

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
ENGINE_CORES = ("process", "thread")


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="serve a model over HTTP, or chat with a server")
    commands = serve.add_subparsers(dest="serve_command", metavar="COMMAND", parser_class=type(serve))
    _add_api_server(commands)
    add_proxy_parser(commands)
    _add_api_client(commands)
    serve.set_defaults(func=lambda args: serve.print_help() or 2)


def _add_api_server(commands: Any) -> None:
    parser = commands.add_parser(
        "api_server",
        help="OpenAI-compatible HTTP server (Swagger UI at /)",
        description="Serve MODEL over an OpenAI-compatible HTTP API (default port 23333).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model folder, .gguf file or cached hub id (default: embedded SmolLM2)",
    )
    group = parser.add_argument_group("server")
    group.add_argument(
        "--model-name", default=None, help="name clients use in `model` (default: the model path's basename)"
    )
    group.add_argument("--server-name", default="0.0.0.0", help="address to listen on")
    group.add_argument("--server-port", type=int, default=23333, help="port to listen on")
    group.add_argument(
        "--api-keys", nargs="+", default=None, help="accept only these keys (Authorization: Bearer KEY)"
    )
    group.add_argument("--allow-origins", nargs="+", default=["*"], help="CORS allowed origins")
    group.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    group.add_argument("--allow-methods", nargs="+", default=["*"], help="CORS allowed methods")
    group.add_argument("--allow-headers", nargs="+", default=["*"], help="CORS allowed headers")
    group.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="WARNING", help="log level")
    group.add_argument(
        "--max-log-len", type=int, default=None, help="longest prompt text to log (default: all)"
    )
    group.add_argument(
        "--disable-fastapi-docs", action="store_true", help="no Swagger UI at / and no /openapi.json"
    )
    group.add_argument(
        "--max-concurrent-requests", type=int, default=None, help="requests served at once; more wait in line"
    )
    group.add_argument(
        "--no-webui", dest="webui", action="store_false", help="do not serve the chat page at /chat"
    )
    group.add_argument("--disable-metrics", action="store_true", help="no Prometheus /metrics")
    group.add_argument(
        "--tool-call-parser",
        choices=sorted(TOOL_PARSERS),
        default=None,
        help="how tool calls are written (default: from the chat template)",
    )
    group.add_argument(
        "--reasoning-parser",
        choices=sorted(REASONING_PARSERS),
        default=None,
        help="split <think> reasoning into message.reasoning_content",
    )
    group.add_argument(
        "--engine-core",
        choices=ENGINE_CORES,
        default="process",
        help="where the engine core runs: a process of its own (the HTTP work never holds up the model), "
        "or a thread of the server",
    )
    group.add_argument(
        "--api-server-count",
        type=int,
        default=1,
        help="front-end processes sharing the port and one engine core (for more streams than one "
        "Python process can encode)",
    )
    group.add_argument(
        "--proxy-url", default=None, help="a `serve proxy` to join once listening (and leave on stop)"
    )
    group.add_argument(
        "--dp",
        type=int,
        default=1,
        help="replicas of the model on this host, replica i on GPU i (two CPU replicas on --device cpu), "
        "behind a proxy on --server-port; they listen on 127.0.0.1 at --server-port + 1 ..",
    )
    add_engine_args(parser)
    add_adapter_args(parser)
    parser.set_defaults(func=run_api_server)


def _add_api_client(commands: Any) -> None:
    parser = commands.add_parser(
        "api_client",
        help="interactive terminal chat with any OpenAI-compatible server",
        description="Chat with a running server. `end` starts a new conversation, `exit` quits.",
    )
    parser.add_argument("url", help="server URL, e.g. http://localhost:23333")
    parser.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key (default: $OPENAI_API_KEY)"
    )
    parser.add_argument("--model", default=None, help="model name (default: the server's first model)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    parser.add_argument("--max-tokens", type=int, default=None, help="most tokens per answer")
    parser.set_defaults(func=run_api_client)


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    if args.max_concurrent_requests is not None and args.max_concurrent_requests < 1:
        raise ValueError(f"max_concurrent_requests={args.max_concurrent_requests} must be >= 1")
    return ServeConfig(
        model_name=args.model_name or default_model_name(args.model),
        server_name=args.server_name,
        server_port=args.server_port,
        api_keys=tuple(args.api_keys or ()),
        allow_origins=tuple(args.allow_origins),
        allow_credentials=args.allow_credentials,
        allow_methods=tuple(args.allow_methods),
        allow_headers=tuple(args.allow_headers),
        log_level=args.log_level,
        max_log_len=args.max_log_len,
        disable_fastapi_docs=args.disable_fastapi_docs,
        max_concurrent_requests=args.max_concurrent_requests,
        webui=args.webui,
        disable_metrics=args.disable_metrics,
        proxy_url=args.proxy_url,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        adapters=tuple(parse_adapters(args.adapters) or ()),
    )


def default_model_name(model: str | None) -> str:
    if model is None:
        return DEFAULT_MODEL_NAME
    name = os.path.basename(os.path.normpath(model))
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def run_api_server(args: argparse.Namespace) -> int:
    """Validate flags first (cheap), then load the model, then serve until SIGTERM / Ctrl-C.

    Exits 1 when the engine core process (or a front-end process) dies, so a supervisor restarts the server.
    """
    from lmserve.cli.front_ends import serve, serve_many

    serve_config = serve_config_from_args(args)
    engine_config = engine_config_from_args(args)
    count = args.api_server_count
    if count < 1:
        raise ValueError(f"api_server_count={count} must be >= 1")
    if count > 1 and args.engine_core == "thread":
        raise ValueError(
            "--api-server-count above 1 needs --engine-core process: the front ends share one core"
        )
    _check_dp(args)
    logging.basicConfig(
        level=serve_config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.dp > 1:
        from lmserve.serve.proxy.replicas import serve_replicas

        # the proxy serves the API only: each replica's docs and chat page stay on its own port
        print(
            f"lmserve: serving {serve_config.model_name!r} at {_base_url(serve_config)}/v1 (OpenAI API) "
            f"over {args.dp} replicas",
            flush=True,
        )
        return serve_replicas(args, serve_config, engine_config)
    if count > 1:
        _print_urls(serve_config)
        return serve_many(args.model, engine_config, args.chat_template, serve_config, count)
    engine = start_engine(
        args.model, engine_config, args.chat_template, args.engine_core, serve_config.log_level
    )
    _print_urls(serve_config)
    return serve(engine, serve_config)


def _check_dp(args: argparse.Namespace) -> None:
    if args.dp < 1:
        raise ValueError(f"dp={args.dp} must be >= 1")
    if args.dp > 1 and args.proxy_url is not None:
        raise ValueError(
            "--dp above 1 serves its own proxy on --server-port; to put the replicas behind another "
            "proxy, start each with `serve api_server --proxy-url URL` instead"
        )


def start_engine(
    model: str | None, config: Any, chat_template: str | None, engine_core: str, log_level: str
) -> Any:
    """The engine the server streams from: a CoreClient (core in its own process) or an AsyncEngine."""
    if engine_core == "process":
        from lmserve.engine.core_client import CoreClient

        return CoreClient.start(model, config, chat_template, log_level, while_loading=_import_app)
    from lmserve.engine.async_engine import AsyncEngine

    return AsyncEngine.from_pretrained(model, config, chat_template)


def _import_app() -> None:
    """The web app's modules (FastAPI, pydantic models, uvicorn: ~1 s), imported while the core loads."""
    import uvicorn  # noqa: F401

    import lmserve.serve.app  # noqa: F401


def _base_url(config: ServeConfig) -> str:
    host = "localhost" if config.server_name in ("0.0.0.0", "::") else config.server_name
    return f"http://{host}:{config.server_port}"


def _print_urls(config: ServeConfig) -> None:
    base = _base_url(config)
    print(f"lmserve: serving {config.model_name!r} at {base}/v1 (OpenAI API)", flush=True)
    if not config.disable_fastapi_docs:
        print(f"lmserve: API docs at {base}/", flush=True)
    if config.webui:
        print(f"lmserve: chat page at {base}/chat", flush=True)


def run_api_client(args: argparse.Namespace) -> int:
    from lmserve.serve.client import ChatClient

    client = ChatClient(args.url, args.api_key, args.model, args.temperature, args.max_tokens)
    try:
        client.repl(sys.stdin, sys.stdout)
    finally:
        client.close()
    return 0
