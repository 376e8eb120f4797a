"""Request body decoding on the event loop, in a thread, and in the decode worker process (`intake`).

    PYTHONPATH=runtime .venv/bin/python bench/runtime/bench_body_decode.py [--mib 16] [--rounds 3]

(PYTHONPATH, not only the sys.path line below: the decode worker is a fresh interpreter.)

For a JSON body and a binary-tensor body of `--mib` MiB each, and a small JSON body at the offload
threshold (what the process hop costs where it starts), measures per mode: decode wall time, and the
longest gap of a 1 ms asyncio ticker while it ran (how long every other request on the server waits).
Modes alternate within each round; medians over rounds. Ratios are against on-loop in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "runtime"))
from kiri_runtime.intake import DEFAULT_DECODE_OFFLOAD_BYTES, Intake, IntakeConfig  # noqa: E402
from kiri_runtime.tensors import decode_request  # noqa: E402


def json_body(target: int) -> bytes:
    n = max(1, target // 21)  # ~21 bytes per FP32 value written by json.dumps
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    doc = {"inputs": [{"name": "x", "shape": [n], "datatype": "FP32", "data": x.tolist()}]}
    return json.dumps(doc).encode()


def binary_body(target: int) -> tuple[bytes, int]:
    n = target // 4
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    head = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [n], "datatype": "FP32", "parameters": {"binary_data_size": 4 * n}}
            ]
        }
    ).encode()
    return head + x.tobytes(), len(head)


async def measure(decode: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    start = time.perf_counter()
    await decode()
    wall = time.perf_counter() - start
    await asyncio.sleep(0.01)
    stop.set()
    await task
    return wall, max(gaps)


async def main(mib: int, rounds: int) -> None:
    intake = Intake(IntakeConfig(decode_offload_bytes=1))  # every body to the worker process
    small = json_body(DEFAULT_DECODE_OFFLOAD_BYTES)
    big_json = json_body(mib << 20)
    big_bin, head_len = binary_body(mib << 20)
    await intake.decode(small, None)  # start the worker (forkserver + numpy import) outside the timings
    cases: dict[str, dict[str, Callable[[], Awaitable[object]]]] = {
        f"JSON {len(big_json) / 2**20:.1f} MiB": {
            "on loop": lambda: _now(decode_request, big_json, None),
            "thread": lambda: asyncio.to_thread(decode_request, big_json, None),
            "worker process": lambda: intake.decode(big_json, None),
        },
        f"binary {len(big_bin) / 2**20:.1f} MiB": {
            "on loop": lambda: _now(decode_request, big_bin, head_len),
            "thread": lambda: asyncio.to_thread(decode_request, big_bin, head_len),
        },
        f"JSON {len(small) / 2**10:.0f} KiB (threshold)": {
            "on loop": lambda: _now(decode_request, small, None),
            "worker process": lambda: intake.decode(small, None),
        },
    }
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for case, modes in cases.items():
            for mode, fn in modes.items():
                results.setdefault((case, mode), []).append(await measure(fn))
    intake.close()
    print(f"| body | mode | decode (median of {rounds}) | longest loop stall | stall vs on loop |")
    print("|---|---|---:|---:|---:|")
    for case, modes in cases.items():
        base = statistics.median(g for _, g in results[(case, "on loop")])
        for mode in modes:
            wall = statistics.median(w for w, _ in results[(case, mode)])
            gap = statistics.median(g for _, g in results[(case, mode)])
            print(f"| {case} | {mode} | {wall * 1000:.1f} ms | {gap * 1000:.1f} ms | {gap / base:.2f}x |")


async def _now(fn: Callable[..., object], *args: object) -> object:
    return fn(*args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.mib, args.rounds))
