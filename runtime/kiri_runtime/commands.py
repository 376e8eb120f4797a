"""Runtime-side subcommands: serve, compress, train-edge, aggregate.

Each handler imports its implementation lazily, so that `kiri --help` and the operator image do not
need onnxruntime or torch. A subcommand is registered with `sub = subparsers.add_parser(...)` and
`sub.set_defaults(handler=fn)` where fn(args) -> int.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    from kiri_runtime import serving_cli

    serving_cli.register(subparsers)
    from kiri_runtime.compressing import cli as compress_cli

    compress_cli.register(subparsers)
    from kiri_runtime.learning import cli as learning_cli

    learning_cli.register(subparsers)
