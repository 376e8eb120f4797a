"""`kiri train-edge` and `kiri aggregate`. Nothing heavy is imported until a handler runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

TOKEN_ENV = "KIRI_LEARNING_TOKEN"


def _part_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--factory", required=True, help="module factory: pkg.module:function or path/file.py:function"
    )
    p.add_argument("--factory-kwargs", default="{}", help="JSON object of keyword arguments for the factory")
    p.add_argument(
        "--weights",
        help="the current revision's full-precision weights: safetensors, or a torch state dict (.pt)",
    )
    p.add_argument("--part", choices=("whole", "layers", "lora"), default="whole", help="what is trained")
    p.add_argument(
        "--layers",
        default="",
        help="comma-separated names: parameter prefixes (layers) or Linear modules (lora)",
    )
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--clip-norm", type=float, required=True, help="L2 bound on one site's update")
    p.add_argument("--noise-multiplier", type=float, required=True, help="noise std is this times clipNorm")
    p.add_argument("-v", "--verbose", action="store_true")


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    t = subparsers.add_parser(
        "train-edge",
        help="train on a site's local data and upload a clipped, noised update to the aggregator",
        description="Federated learning at the edge (DP-FedAvg). Only the update leaves the site.",
    )
    _part_args(t)
    t.add_argument("--aggregator", required=True, help="aggregator base URL, e.g. http://aggregator:8470")
    t.add_argument("--site", required=True, help="this site's name (its token is checked against it)")
    t.add_argument("--token-file", help=f"file holding the site's bearer token (or set ${TOKEN_ENV})")
    t.add_argument("--data", required=True, help="local .npz with arrays x and y (siteDataPath)")
    t.add_argument(
        "--work-dir", default=".kiri/learning", help="where global models downloaded between rounds go"
    )
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--learning-rate", type=float, default=0.05)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--seed", type=int, default=0, help="seeds shuffling and initialisation")
    t.add_argument(
        "--noise-seed", type=int, help="seeds the DP noise: tests only, a known seed voids the privacy"
    )
    t.add_argument("--rounds", type=int, default=1, help="rounds to take part in before exiting")
    t.add_argument("--connect-timeout", type=float, default=60.0)
    t.set_defaults(handler=_train_edge)

    a = subparsers.add_parser(
        "aggregate",
        help="collect one or more federated rounds, account privacy, publish each new global model",
        description="Federated aggregation (FedAvg or trimmed mean) with an RDP privacy accountant.",
    )
    _part_args(a)
    a.add_argument("--eval", required=True, help="held-out .npz (x, y) the new model is evaluated on")
    a.add_argument(
        "--out",
        required=True,
        help="directory for rounds/<NNNN>/{round.json,weights.safetensors}; also the ledger",
    )
    a.add_argument(
        "--tokens",
        required=True,
        help="directory with one token file per site, or a file of site=token lines",
    )
    a.add_argument(
        "--sites", default="", help="comma-separated expected sites (empty: any site with a token)"
    )
    a.add_argument("--clients-per-round", type=int)
    a.add_argument("--min-clients", type=int, default=1)
    a.add_argument("--deadline-seconds", type=float, default=600.0)
    a.add_argument(
        "--grace-seconds", type=float, default=30.0, help="wait after minClients arrived for the rest"
    )
    a.add_argument("--aggregation", choices=("fedavg", "trimmed-mean"), default="fedavg")
    a.add_argument("--trim-fraction", type=float, default=0.1)
    a.add_argument("--server-learning-rate", type=float, default=1.0)
    a.add_argument("--dp-delta", type=float, default=1e-5)
    a.add_argument("--target-epsilon", type=float)
    a.add_argument("--rounds", type=int, default=1)
    a.add_argument("--host", default="0.0.0.0")
    a.add_argument("--port", type=int, default=8470, help="0 picks a free port (see --port-file)")
    a.add_argument("--port-file", help="write the bound port here once listening")
    a.add_argument(
        "--ledger",
        metavar="KIND:TARGET",
        help="where the privacy ledger lives, e.g. configmap:NAMESPACE/NAME (default: ledger.json in --out)",
    )
    a.add_argument("--ledger-owner", default="", help="name[:uid] of the object that owns the ledger")
    a.set_defaults(handler=_aggregate)


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from kiri_runtime import redaction

    redaction.install()  # httpx logs full URLs; presigned ones carry credentials
    for noisy in ("httpx", "httpcore", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _part(args: argparse.Namespace) -> Any:
    from kiri_runtime.learning.parts import TrainedPart

    names = tuple(n.strip() for n in args.layers.split(",") if n.strip())
    return TrainedPart(kind=args.part, names=names, rank=args.lora_rank)


def _kwargs(text: str) -> dict[str, Any]:
    from kiri_runtime.learning.errors import LearningError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise LearningError(f"--factory-kwargs: invalid JSON: {e}") from None
    if not isinstance(value, dict):
        raise LearningError("--factory-kwargs: expected a JSON object")
    return value


def _run(fn: Any, args: argparse.Namespace) -> int:
    from kiri_runtime.learning.errors import LearningError

    _setup(args)
    try:
        return int(fn(args))
    except LearningError as e:
        print(f"kiri {args.command}: error: {e}", file=sys.stderr)
        return 1


def _train_edge(args: argparse.Namespace) -> int:
    return _run(_train_edge_impl, args)


def _train_edge_impl(args: argparse.Namespace) -> int:
    from kiri_runtime.learning.errors import LearningError
    from kiri_runtime.learning.loading import local_path
    from kiri_runtime.learning.uploading import Trainer, TrainerConfig

    token = os.environ.get(TOKEN_ENV, "")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise LearningError(f"--token-file: {e}") from None
    if not token:
        raise LearningError(f"no token: pass --token-file or set ${TOKEN_ENV}")
    cfg = TrainerConfig(
        aggregator=args.aggregator,
        site=args.site,
        token=token,
        factory=args.factory,
        factory_kwargs=_kwargs(args.factory_kwargs),
        weights=local_path(args.weights) if args.weights else None,
        data=Path(args.data),
        work_dir=Path(args.work_dir),
        part=_part(args),
        clip_norm=args.clip_norm,
        noise_multiplier=args.noise_multiplier,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        seed=args.seed,
        noise_seed=args.noise_seed,
        rounds=args.rounds,
        connect_timeout=args.connect_timeout,
    )
    uploads = Trainer(cfg).run()
    print(json.dumps({"site": cfg.site, "uploads": [u.__dict__ for u in uploads]}))
    return 0


def _aggregate(args: argparse.Namespace) -> int:
    return _run(_aggregate_impl, args)


def _aggregate_impl(args: argparse.Namespace) -> int:
    import asyncio

    from kiri_runtime.learning.collecting import Aggregator, Settings, load_tokens
    from kiri_runtime.learning.errors import LearningError
    from kiri_runtime.learning.loading import (
        TorchGlobalModel,
        load_arrays,
        load_model,
        local_path,
        save_weights,
    )
    from kiri_runtime.learning.serving import serve

    settings = Settings(
        part=_part(args),
        clip_norm=args.clip_norm,
        noise_multiplier=args.noise_multiplier,
        dp_delta=args.dp_delta,
        target_epsilon=args.target_epsilon,
        sites=tuple(s.strip() for s in args.sites.split(",") if s.strip()),
        clients_per_round=args.clients_per_round,
        min_clients=args.min_clients,
        deadline_seconds=args.deadline_seconds,
        grace_seconds=args.grace_seconds,
        aggregation=args.aggregation,
        trim_fraction=args.trim_fraction,
        server_lr=args.server_learning_rate,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = local_path(args.weights) if args.weights else None
    module = load_model(args.factory, _kwargs(args.factory_kwargs), weights)
    if weights is None:
        # A factory alone is a seeded fresh model: pin it as a file so every site trains from the same bytes.
        weights = out / "initial-weights.safetensors"
        save_weights(module, weights)
    if args.rounds < 1:
        raise LearningError("--rounds must be >= 1")
    ledger = None
    if args.ledger:
        from kiri_runtime.learning.ledgers import open_ledger

        kind, _, target = args.ledger.partition(":")
        ledger = open_ledger(kind, target, {"owner": args.ledger_owner})
    aggregator = Aggregator(
        settings,
        TorchGlobalModel(module, load_arrays(Path(args.eval), "held-out set")),
        weights,
        out,
        load_tokens(Path(args.tokens)),
        ledger=ledger,
    )
    port_file = Path(args.port_file) if args.port_file else None
    return asyncio.run(serve(aggregator, args.host, args.port, args.rounds, port_file))
