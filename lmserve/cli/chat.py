"""`lmserve chat [MODEL]`: a terminal chat with history and streamed replies (LMDeploy's REPL rules)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from lmserve.cli.engine_args import (
    add_engine_args,
    add_generation_args,
    engine_config_from_args,
    generation_overrides,
)

HELP = "Type a message and finish it with an empty line. `end` starts a new conversation, `exit` quits, Ctrl-C stops a reply."


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model in the terminal", description=HELP)
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model folder, .gguf file or cached hub id (default: embedded SmolLM2)",
    )
    parser.add_argument("--system", default=None, help="system prompt")
    add_engine_args(parser)
    add_generation_args(parser)
    parser.set_defaults(func=run)


def read_message() -> str | None:
    """Lines until an empty line; None at end of input."""
    lines: list[str] = []
    while True:
        if not lines:
            # input(prompt) writes the prompt to stderr when stdin is a tty: keep it on stdout with the replies
            sys.stdout.write("\n>>> ")
            sys.stdout.flush()
        try:
            line = input()
        except EOFError:
            return "\n".join(lines) if lines else None
        if not line.strip():
            if lines:
                return "\n".join(lines)
            continue
        lines.append(line)
        if line.strip() in ("end", "exit") and len(lines) == 1:
            return line.strip()


async def stream_reply(engine: Any, prompt_ids: list[int], gen_config: Any) -> str:
    reply = ""
    async for out in engine.generate(prompt_ids, gen_config):
        reply += out.text
        sys.stdout.write(out.text)
        sys.stdout.flush()
    return reply


def run(args: argparse.Namespace) -> int:
    from lmserve.engine.async_engine import AsyncEngine
    from lmserve.models.tokenizer import builtin_chat_templates

    engine = AsyncEngine.from_pretrained(args.model, engine_config_from_args(args), args.chat_template)
    if engine.tokenizer.chat_template is None:  # say so now, not after the first message is typed
        engine.shutdown()
        raise ValueError(
            f"{args.model} has no chat template (a base model, or a GGUF without one); pass --chat-template "
            f"NAME (built-in: {', '.join(builtin_chat_templates())}) or a Jinja file"
        )
    gen_config = engine.default_generation_config.with_updates(**generation_overrides(args))
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print(HELP)
    try:
        while (message := read_message()) is not None:
            if message == "exit":
                break
            if message == "end":
                history = []
                print("(new conversation)")
                continue
            history.append({"role": "user", "content": message})
            prompt_ids = engine.tokenizer.encode_chat(system + history)
            try:
                reply = asyncio.run(stream_reply(engine, prompt_ids, gen_config))
            except KeyboardInterrupt:
                reply = ""
                print("\n(stopped)")
            except ValueError as error:  # e.g. the conversation outgrew the session
                history.pop()
                print(f"\nerror: {error}\n(type `end` to start a new conversation)")
                continue
            history.append({"role": "assistant", "content": reply})
            print()
    finally:
        engine.shutdown()
    return 0
