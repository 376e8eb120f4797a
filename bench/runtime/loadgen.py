"""Shared pieces of the runtime benchmarks: tiny models, a closed-loop load generator, process helpers.

Runs in the project venv and in the peer venv (it needs only numpy, onnx or onnxruntime, and aiohttp).
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import os
import socket
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mlp_model(path: Path, widths: list[int], seed: int = 0) -> Path:
    """Dense ReLU MLP with a dynamic batch dimension, softmax at the end (a classifier)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        inits.append(numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}"))
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"b{i}"], [f"h{i}"]))
        prev = f"h{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Softmax", [prev], ["probs"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", widths[0]])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", widths[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def scale_model(path: Path, width: int) -> Path:
    """y = 2x over a wide vector: all cost is moving the tensor, which is what the codec bench wants."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def json_body(x: np.ndarray, name: str = "x") -> tuple[bytes, dict[str, str]]:
    body = {
        "inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def binary_body(x: np.ndarray, name: str = "x", binary_out: bool = True) -> tuple[bytes, dict[str, str]]:
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": name,
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ]
    }
    if binary_out:
        header["parameters"] = {"binary_data_output": True}
    head = json.dumps(header).encode()
    return head + raw, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }


def wait_http(url: str, timeout: float = 120.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} never answered 200")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latencies(
    port: int, path: str, body: bytes, headers: dict[str, str], n: int, warmup: int = 50
) -> list[float]:
    """Sequential requests on one keep-alive connection (stdlib client: the least client overhead)."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    out = []
    for i in range(warmup + n):
        start = time.perf_counter()
        conn.request("POST", path, body=body, headers=headers)
        reply = conn.getresponse()
        data = reply.read()
        elapsed = time.perf_counter() - start
        if reply.status != 200:
            raise RuntimeError(f"{reply.status}: {data[:200]!r}")
        if i >= warmup:
            out.append(elapsed)
    conn.close()
    return out


async def _closed_loop(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, duration: float
) -> dict[str, float]:
    """`concurrency` keep-alive connections, each sending the next request when the last one is answered.

    A bare asyncio HTTP/1.1 client with the request bytes built once: an aiohttp client saturated one core
    at ~2000 rps here, so it, not the server, set the small-model figures.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    done: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                writer.write(request)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                if status_line.split()[1] != b"200":
                    errors += 1
                    continue
                done.append(time.perf_counter() - start)
        finally:
            writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    return {
        "rps": len(done) / elapsed,
        "p50_ms": statistics.median(done) * 1e3 if done else float("nan"),
        "p99_ms": percentile(done, 0.99) * 1e3 if done else float("nan"),
        "errors": errors,
    }


def closed_loop(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, duration: float
) -> dict[str, float]:
    return asyncio.run(_closed_loop(url, body, headers, concurrency, duration))


def env_with(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}
