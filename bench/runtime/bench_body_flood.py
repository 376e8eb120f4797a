"""A flood of large bodies against `kiri serve`, with and without the in-flight body budget.

    PYTHONPATH=operator:runtime .venv/bin/python bench/runtime/bench_body_flood.py [--clients 32] [--mib 8]

`--clients` concurrent clients each POST one `--mib` MiB binary-tensor body (the classifier of the runtime
tests, binary output), in 3 waves. Runs the same flood against a server with the default budget
(256 MiB) and against one with `--max-inflight-body-bytes 64 MiB`, one after the other, and reports the
answers by status and the server's peak RSS (VmHWM) over its warm RSS. 429s are expected: they are what
the budget answers instead of holding more memory.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "integration" / "runtime"), str(ROOT / "tests")]
from runtime_helpers import FEATURES, classifier_model  # noqa: E402


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def body(mib: int) -> tuple[bytes, dict[str, str]]:
    rows = (mib << 20) // (4 * FEATURES)
    x = np.random.default_rng(0).standard_normal((rows, FEATURES)).astype(np.float32)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [rows, FEATURES],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


async def flood(url: str, clients: int, payload: bytes, headers: dict[str, str]) -> collections.Counter[int]:
    codes: collections.Counter[int] = collections.Counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        for _ in range(3):
            replies = await asyncio.gather(
                *(
                    client.post(f"{url}/v2/models/clf/infer", content=payload, headers=headers)
                    for _ in range(clients)
                )
            )
            codes.update(r.status_code for r in replies)
    return codes


def run(model: Path, cache: Path, budget_mib: int | None, clients: int, mib: int) -> str:
    port = _port()
    cmd = [sys.executable, "-m", "kiri_operator.cli", "serve", "--model-uri", model.as_uri(), "--name", "clf",
           "--host", "127.0.0.1", "--port", str(port), "--threads", "1", "--cache-dir", str(cache),
           "--log-level", "WARNING"]  # fmt: skip
    if budget_mib is not None:
        cmd += ["--max-inflight-body-bytes", str(budget_mib << 20)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready")
            time.sleep(0.1)
        payload, headers = body(mib)
        asyncio.run(flood(url, 1, payload, headers))  # warm: one request of the size under test
        warm = _kib(proc.pid, "VmRSS")
        codes = asyncio.run(flood(url, clients, payload, headers))
        peak = _kib(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(30)
    label = f"{budget_mib} MiB" if budget_mib is not None else "256 MiB (default)"
    answers = ", ".join(f"{n} x {code}" for code, n in sorted(codes.items()))
    return f"| {label} | {answers} | {warm / 1024:.0f} MiB | {peak / 1024:.0f} MiB | +{(peak - warm) / 1024:.0f} MiB |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--mib", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, _, _ = classifier_model(Path(tmp) / "clf.onnx")
        print(f"{args.clients} clients x {args.mib} MiB binary bodies, 3 waves")
        print("| budget | answers | warm RSS | peak RSS | peak - warm |")
        print("|---|---|---:|---:|---:|")
        for budget in (None, 64):
            print(run(model, Path(tmp) / "cache", budget, args.clients, args.mib), flush=True)


if __name__ == "__main__":
    main()
