"""`kiri flower-superlink` and `kiri flower-supernode`: Flower's own SuperLink and SuperNode, with a longer window
for a task's process to start.

Why not the plain executables: Flower 1.42 runs every message a SuperNode receives (and every run on the
SuperLink) in a fresh process, which must report within `HEARTBEAT_DEFAULT_INTERVAL` (30 s) of the task being
claimed or its token expires and the task is retried. Measured on the shared 2-core box at load average 20,
`flwr-clientapp` alone took 7 s to print its help, and three SuperNodes starting their ClientApps at once never
made it: every task of a SecAgg+ round failed with "Runtime task-token authentication failed" and the round
closed with no result (tests/integration/learning). Small edge devices start Python as slowly. These commands
set that window (`KIRI_FLOWER_TASK_START_SECONDS`, default 180 s) before handing the arguments, unchanged, to
Flower's entry point; the heartbeats themselves are Flower's.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

TASK_START_ENV = "KIRI_FLOWER_TASK_START_SECONDS"
DEFAULT_TASK_START_SECONDS = 180


def widen_task_start_window(seconds: float) -> None:
    from flwr.supercore.corestate import in_memory_corestate, sql_corestate

    for module in (in_memory_corestate, sql_corestate):
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds  # type: ignore[attr-defined]


def _window() -> float:
    text = os.environ.get(TASK_START_ENV, "")
    try:
        return float(text) if text else float(DEFAULT_TASK_START_SECONDS)
    except ValueError:
        raise SystemExit(f"{TASK_START_ENV}={text!r}: expected seconds") from None


def _superlink(args: argparse.Namespace) -> int:
    widen_task_start_window(_window())
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *args.flower_args]
    flower_superlink()
    return 0


def _supernode(args: argparse.Namespace) -> int:
    widen_task_start_window(_window())
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args.flower_args]
    flower_supernode()
    return 0


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    for name, handler, what in (
        ("flower-superlink", _superlink, "Flower's SuperLink"),
        ("flower-supernode", _supernode, "Flower's SuperNode"),
    ):
        p = subparsers.add_parser(
            name,
            help=f"{what}, with a task-start window for slow machines (${TASK_START_ENV}); Flower's own flags",
            add_help=False,
        )
        p.set_defaults(handler=handler, passthrough=True, flower_args=[])
