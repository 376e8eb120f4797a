"""Fixtures of the runtime integration tests (helpers live in runtime_helpers.py, imported by name)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_helpers import ThreadedServer, classifier_model

from kiri_runtime.serving import ServeConfig


@pytest.fixture
def classifier(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    return classifier_model(tmp_path / "classifier.onnx")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ThreadedServer]]:
    """serve(model_path, name=..., **ServeConfig fields) -> a started server (ready unless told not to wait)."""
    servers: list[ThreadedServer] = []

    def start(model: Path | str, name: str = "clf", wait: bool = True, **overrides: Any) -> ThreadedServer:
        uri = model if isinstance(model, str) else model.as_uri()
        base = ServeConfig(
            model_uri=uri,
            name=name,
            host="127.0.0.1",
            port=0,
            cache_dir=tmp_path / f"cache{len(servers)}",
            threads=1,
            shutdown_grace_s=5.0,
        )
        server = ThreadedServer(replace(base, **overrides)).start()
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for s in servers:
        s.stop()
