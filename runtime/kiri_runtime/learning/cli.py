"""`kiri learn-round`: submit one federated round to a SuperLink and wait for its record.

The round itself runs inside Flower: the SuperLink runs Kiri's ServerApp (`federating`), each site's SuperNode
runs Kiri's ClientApp (`site_app`). This command is the operator's round Job: it submits the run over TLS
(`launching.submit`), waits for it to end, and checks that the ServerApp wrote the round's record. Nothing heavy
is imported until the handler runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    r = subparsers.add_parser(
        "learn-round",
        help="run one federated round on a Flower SuperLink (SecAgg+, client-side clipping, central DP noise)",
        description="Submits Kiri's Flower App to the SuperLink with this round's settings and waits for the "
        "round record (rounds/<NNNN>/round.json under --out).",
    )
    r.add_argument(
        "--superlink",
        required=True,
        help="the SuperLink's Control API address, host:port (its --control-port)",
    )
    r.add_argument("--root-certificates", help="CA certificate (PEM) of the SuperLink's TLS certificate")
    r.add_argument(
        "--insecure", action="store_true", help="no TLS (tests only: the round's traffic is then readable)"
    )
    given = r.add_mutually_exclusive_group(required=True)
    given.add_argument("--run-config", help="TOML file of the round's settings (kebab-case keys)")
    given.add_argument("--run-config-json", help="the same settings as one JSON object (the operator's Job)")
    r.add_argument("--work-dir", default="/tmp/kiri-round", help="where the Flower App and config home go")
    r.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run to end")
    r.add_argument(
        "--any-record-succeeds",
        action="store_true",
        help="exit 0 whenever the run wrote its record, skipped and refused included (the operator's round "
        "Job: its next step publishes every record, and a refused round must reach the operator to stop the "
        "rounds; a failed Job would be retried instead)",
    )
    r.add_argument("-v", "--verbose", action="store_true")
    r.set_defaults(handler=_learn_round)


def _learn_round(args: argparse.Namespace) -> int:
    from kiri_runtime import redaction
    from kiri_runtime.learning.errors import LearningError

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    redaction.install()
    try:
        return _run(args)
    except LearningError as e:
        print(f"kiri learn-round: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    import tomllib

    from kiri_runtime.learning import launching, rounds
    from kiri_runtime.learning.errors import LearningError

    if not args.insecure and not args.root_certificates:
        raise LearningError("--root-certificates is required (or --insecure, for tests)")
    try:
        if args.run_config_json is not None:
            run_config = json.loads(args.run_config_json)
        else:
            run_config = tomllib.loads(Path(args.run_config).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise LearningError(f"--run-config: {e}") from None
    if not isinstance(run_config, dict):
        raise LearningError("--run-config-json: expected a JSON object")
    number = int(run_config.get("round") or 0)
    out = Path(str(run_config.get("out") or ""))
    if number < 1 or not str(out):
        raise LearningError("--run-config must set 'round' (>= 1) and 'out'")
    work = Path(args.work_dir)
    launching.submit(
        work,
        args.superlink,
        run_config,
        root_certificates=None if args.insecure else Path(args.root_certificates),
        timeout=args.timeout,
        log=work / "flwr-run.log",
    )
    path = rounds.round_dir(out, number) / rounds.RECORD_FILE
    if not path.exists():
        raise LearningError(f"the run ended without a record at {path}: see the SuperLink's log")
    record = rounds.load(path)
    print(json.dumps({"round": record.round, "status": record.status, "reason": record.reason}))
    return 0 if record.status == "accepted" or args.any_record_succeeds else 3
