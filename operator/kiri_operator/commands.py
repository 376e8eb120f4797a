"""Operator-side subcommands: operator, crd, get, status, promote, abort, rollback.

Each handler imports its implementation lazily. A subcommand is registered here with
`sub = subparsers.add_parser(...)` and `sub.set_defaults(handler=fn)` where fn(args) -> int.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    del subparsers  # Subcommands are added by the operator, API and CLI work.
