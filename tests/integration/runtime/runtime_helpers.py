"""Helpers for the runtime integration tests: real ONNX models built with onnx.helper, and real Kiri
servers on 127.0.0.1 in a background thread.

A thread (not the test's event loop) hosts each server so that blocking clients (tritonclient, httpx sync)
and async ones both work against it.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from kiri_runtime.serving import ServeConfig, Server

FEATURES, CLASSES = 4, 3


def classifier_model(path: Path, seed: int = 0, scale: float = 1.0) -> tuple[Path, np.ndarray, np.ndarray]:
    """softmax(x @ W + b) with a dynamic batch; `scale` shrinks logits (small scale: low confidence)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((FEATURES, CLASSES)) * scale).astype(np.float32)
    b = (rng.standard_normal(CLASSES) * scale).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    _save(graph, path)
    return path, w, b


def multi_type_model(path: Path) -> Path:
    """Identity over INT64 and string tensors, plus a fixed-shape BOOL input: codec coverage."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["ids"], ["ids_out"]),
            helper.make_node("Identity", ["text"], ["text_out"]),
            helper.make_node("Not", ["flags"], ["flags_out"]),
        ],
        "multi",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("text", TensorProto.STRING, ["N"]),
            helper.make_tensor_value_info("flags", TensorProto.BOOL, [2]),
        ],
        [
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("text_out", TensorProto.STRING, ["N"]),
            helper.make_tensor_value_info("flags_out", TensorProto.BOOL, [2]),
        ],
    )
    return _save(graph, path)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference_probs(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    logits = x @ w + b
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class ThreadedServer:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.server: Server | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def boot() -> None:
            self.server = Server(self.config)
            await self.server.start()

        self.loop.run_until_complete(boot())
        self._started.set()
        self.loop.run_forever()

    def start(self) -> ThreadedServer:
        self._thread.start()
        assert self._started.wait(30), "server did not start"
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(f"{self.url}/v2/health/ready").status_code == 200:
                return
            time.sleep(0.05)
        raise AssertionError("server never became ready")

    def call(self, fn: Callable[[Server], Any]) -> Any:
        """Runs fn(server) on the server's loop; awaits it if it returns a coroutine."""

        async def run() -> Any:
            assert self.server is not None
            result = fn(self.server)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)


def metric_samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)
