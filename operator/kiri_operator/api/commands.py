"""`kiri crd` prints the ModelDeployment CRD generated from the models (the same text as crds/);
`kiri validate` checks ModelDeployment manifests offline with the same rules the API server enforces."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    crd = subparsers.add_parser(
        "crd",
        help="print the ModelDeployment CustomResourceDefinition",
        description="Print the ModelDeployment CRD, e.g. `kiri crd | kubectl apply --server-side -f -`.",
    )
    crd.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml", help="output format")
    crd.set_defaults(handler=_print_crd)

    validate = subparsers.add_parser(
        "validate",
        help="check ModelDeployment manifests without a cluster",
        description="Validate ModelDeployment manifests (multi-document YAML; '-' reads stdin) against the "
        "API models, which mirror the CRD's OpenAPI and CEL rules. Other kinds are skipped.",
    )
    validate.add_argument("files", nargs="+", help="manifest files, or - for stdin")
    validate.set_defaults(handler=_validate)


def _print_crd(args: argparse.Namespace) -> int:
    from kiri_operator.api import generating

    if args.output == "json":
        sys.stdout.write(json.dumps(generating.crd(), indent=2) + "\n")
    else:
        sys.stdout.write(generating.crd_yaml())
    return 0


def _validate(args: argparse.Namespace) -> int:
    import yaml
    from pydantic import ValidationError

    from kiri_operator.api import API_VERSION, KIND, ModelDeployment

    failures = 0
    checked = 0
    for name in args.files:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text()
            documents = list(yaml.safe_load_all(text))
        except (OSError, yaml.YAMLError) as exc:
            print(f"{name}: cannot read: {exc}", file=sys.stderr)
            failures += 1
            continue
        for index, doc in enumerate(documents):
            if not isinstance(doc, dict) or doc.get("kind") != KIND or doc.get("apiVersion") != API_VERSION:
                continue
            checked += 1
            label = f"{name}: {KIND} {(doc.get('metadata') or {}).get('name', f'#{index}')}"
            try:
                ModelDeployment.model_validate(doc)
            except ValidationError as exc:
                failures += 1
                for error in exc.errors():
                    path = _field_path(error["loc"])
                    print(f"{label}: {path}: {error['msg']}", file=sys.stderr)
                continue
            print(f"{label}: valid")
    if checked == 0 and failures == 0:
        print(f"no {API_VERSION} {KIND} found", file=sys.stderr)
        return 1
    return 1 if failures else 0


def _field_path(loc: tuple[int | str, ...]) -> str:
    """`('spec', 'edge', 'variants', 0, 'name')` as the API server writes it: `spec.edge.variants[0].name`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "<root>"
