"""The `kiri` command line, also a kubectl plugin: installed as `kubectl-kiri` on the PATH, the same
commands run as `kubectl kiri get|status|wait|promote|abort|rollback ...`.

Each area registers its own subcommands from a small module that imports nothing heavy at import
time, so `kiri operator` works in an image without torch or onnxruntime. `kiri completion bash|zsh|tcsh`
prints a shell completion script generated from this very parser (shtab).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

# Modules exposing `register(subparsers)`. Order sets the order in `kiri --help`.
_SUBCOMMAND_MODULES = (
    "kiri_operator.commands",
    "kiri_operator.api.commands",
    "kiri_operator.rollout_commands",
    "kiri_operator.learning_commands",
    "kiri_runtime.commands",
)


SHELLS = ("bash", "zsh", "tcsh")


def build_parser(prog: str = "kiri") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Edge-cloud model rollout for Kubernetes.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _SUBCOMMAND_MODULES:
        module = importlib.import_module(module_name)
        module.register(subparsers)
    completion = subparsers.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a completion script for SHELL, e.g. `source <(kiri completion bash)` or, for the "
        "kubectl plugin, `kiri completion bash --prog kubectl-kiri`.",
    )
    completion.add_argument("shell", choices=SHELLS)
    completion.add_argument(
        "--prog", default=prog, help="the command name to complete (default: %(default)s)"
    )
    completion.set_defaults(handler=lambda args: _completion(parser, args))
    return parser


def _completion(parser: argparse.ArgumentParser, args: Any) -> int:
    import shtab

    parser.prog = args.prog
    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return 0


def kubectl_main(argv: Sequence[str] | None = None) -> int:
    """`kubectl-kiri`: kubectl runs it for `kubectl kiri ...`; only the name in help and errors differs."""
    return main(argv, prog="kubectl kiri")


def main(argv: Sequence[str] | None = None, prog: str = "kiri") -> int:
    from kiri_runtime import redaction

    # Every subcommand may log a URL (httpx logs each request's); none may log the credentials in one.
    redaction.install()
    parser = build_parser(prog)
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.flower_args = extra  # `kiri flower-superlink|supernode`: Flower's own flags, in order
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    result = handler(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
