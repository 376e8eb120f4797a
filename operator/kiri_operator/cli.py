"""The `kiri` command line.

Each area registers its own subcommands from a small module that imports nothing heavy at import
time, so `kiri operator` works in an image without torch or onnxruntime.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules exposing `register(subparsers)`. Order sets the order in `kiri --help`.
_SUBCOMMAND_MODULES = (
    "kiri_operator.commands",
    "kiri_operator.api.commands",
    "kiri_operator.rollout_commands",
    "kiri_operator.learning_commands",
    "kiri_runtime.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiri", description="Edge-cloud model rollout for Kubernetes.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _SUBCOMMAND_MODULES:
        module = importlib.import_module(module_name)
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from kiri_runtime import redaction

    # Every subcommand may log a URL (httpx logs each request's); none may log the credentials in one.
    redaction.install()
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    result = handler(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
