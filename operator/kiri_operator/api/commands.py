"""`kiri crd`: prints the ModelDeployment CRD generated from the models (the same text as crds/)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    sub = subparsers.add_parser(
        "crd",
        help="print the ModelDeployment CustomResourceDefinition",
        description="Print the ModelDeployment CRD, e.g. `kiri crd | kubectl apply --server-side -f -`.",
    )
    sub.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml", help="output format")
    sub.set_defaults(handler=_print_crd)


def _print_crd(args: argparse.Namespace) -> int:
    from kiri_operator.api import generating

    if args.output == "json":
        sys.stdout.write(json.dumps(generating.crd(), indent=2) + "\n")
    else:
        sys.stdout.write(generating.crd_yaml())
    return 0
