"""Helpers for the compressor tests: run `kiri compress` in-process on real models built here."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from kiri_runtime import manifests
from kiri_runtime.compressing import cli as compress_cli

ZOO = Path(__file__).with_name("compress_zoo.py")


def compress(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="kiri")
    compress_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compress", *argv])
    return int(args.handler(args))


def save_npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def load(out: Path) -> manifests.Manifest:
    return manifests.load(out)
