"""Runtime-side subcommands: serve, compress, checkpoint, train-edge, aggregate, train-adapter, store.

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
    compress_cli.register_checkpoint(subparsers)
    from kiri_runtime.learning import cli as learning_cli

    learning_cli.register(subparsers)
    from kiri_runtime.learning import adapter_cli, flower_processes

    flower_processes.register(subparsers)

    adapter_cli.register(subparsers)
    store = subparsers.add_parser(
        "store",
        help="serve an artifact store over HTTP (write-once PUT, GET with Range)",
        description="The in-cluster artifact store the chart deploys: compression Jobs PUT variants and "
        "manifests, edge runtimes GET them. Paths are written once.",
    )
    store.add_argument("--root", required=True, help="directory holding the artifacts (a volume)")
    store.add_argument("--host", default="0.0.0.0")
    store.add_argument("--port", type=int, default=8080)
    store.add_argument(
        "--read-only",
        action="store_true",
        help="serve GET and HEAD only (a PUT is 405): a site's SuperNode serves its kept adapters this way",
    )
    store.add_argument("--log-level", default="INFO")
    store.set_defaults(handler=_store)


def _store(args: argparse.Namespace) -> int:
    import logging
    import sys
    from pathlib import Path

    from kiri_runtime import storing

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    storing.serve(Path(args.root), args.host, args.port, read_only=args.read_only)
    return 0
