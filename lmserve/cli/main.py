"""The `lmserve` command: dispatches to serve, chat, lite, bench, eval and check_env."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines `register(subparsers)`, adding its commands with `func=` set; it imports torch-heavy
# code only inside those functions, so building the parser (and `--help`) never loads torch.
COMMAND_MODULES = (
    "lmserve.cli.serve",
    "lmserve.cli.chat",
    "lmserve.cli.lite",
    "lmserve.cli.bench",
    "lmserve.cli.eval",
    "lmserve.cli.check_env",
)


class _Parser(argparse.ArgumentParser):
    """Accepts `--server_port` as well as `--server-port` (LMDeploy users type both)."""

    def _parse_optional(self, arg_string: str):  # type: ignore[no-untyped-def]
        if arg_string.startswith("--") and "_" in arg_string.split("=", 1)[0]:
            name, sep, value = arg_string.partition("=")
            arg_string = name.replace("_", "-") + sep + value
        return super()._parse_optional(arg_string)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmserve", description="Deploy and quantize large language models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"lmserve: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
