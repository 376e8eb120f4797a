"""Which HTTP stack under the Kiri dataplane: aiohttp or starlette+uvicorn (the decision in
docs/architecture.md, "Runtime HTTP stack"). Ratios are against aiohttp measured in this same run.

    .venv/bin/python bench/runtime/bench_http_stack.py [--peer-venv /tmp/peer-venv] [--quick]

The servers run under the peer venv's Python (it has starlette, uvicorn with httptools and uvloop, and
aiohttp), with this repo's runtime/ on PYTHONPATH; the load generator runs here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import (
    binary_body,
    closed_loop,
    env_with,
    free_port,
    json_body,
    latencies,
    mlp_model,
    percentile,
    stop,
    wait_http,
)

ROOT = Path(__file__).resolve().parents[2]
STACKS = ("aiohttp", "aiohttp-uvloop", "starlette-uvicorn")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer-venv", type=Path, default=Path("/tmp/peer-venv"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    python = args.peer_venv / "bin" / "python"
    if not python.exists():
        print(
            f"{python} is absent: python -m venv {args.peer_venv} && {args.peer_venv}/bin/pip install "
            "mlserver onnxruntime httpx httptools"
        )
        return 1
    seconds, n = (1.5, 300) if args.quick else (3.0, 1000)
    tmp = Path(tempfile.mkdtemp(prefix="kiri-stack-"))
    model = mlp_model(tmp / "small.onnx", [64, 128, 10])
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    bodies = {"json": json_body(x), "binary": binary_body(x)}
    results: dict[str, dict[str, float]] = {}
    procs, ports = [], {}
    try:
        for stack in STACKS:
            port = free_port()
            cmd = [str(python), str(ROOT / "bench/runtime/stack_server.py"), "--stack", stack, "--model", str(model),
                   "--port", str(port)]  # fmt: skip
            proc = subprocess.Popen(cmd, env=env_with(PYTHONPATH=str(ROOT / "runtime")))
            procs.append(proc)
            wait_http(f"http://127.0.0.1:{port}/v2/health/ready", proc=proc)
            ports[stack] = port
        # All stacks stay up and take turns, in a rotating order, so load drift on the shared machine
        # hits each alike; every figure is the median of the rounds.
        samples: dict[str, dict[str, list[float]]] = {s: {} for s in STACKS}
        rounds = 2 if args.quick else 3
        for r in range(rounds):
            order = STACKS[r % len(STACKS) :] + STACKS[: r % len(STACKS)]
            for stack in order:
                port = ports[stack]
                url = f"http://127.0.0.1:{port}/v2/models/m/infer"
                body, headers = bodies["json"]
                lat = latencies(port, "/v2/models/m/infer", body, headers, n)
                samples[stack].setdefault("c1_p50_ms", []).append(statistics.median(lat) * 1e3)
                samples[stack].setdefault("c1_p99_ms", []).append(percentile(lat, 0.99) * 1e3)
                for kind, (body, headers) in bodies.items():
                    closed_loop(url, body, headers, 8, 0.3)
                    rps = closed_loop(url, body, headers, 16, seconds)["rps"]
                    samples[stack].setdefault(f"c16_{kind}_rps", []).append(rps)
        for stack in STACKS:
            results[stack] = {k: statistics.median(v) for k, v in samples[stack].items()}
    finally:
        for proc in procs:
            stop(proc)
    base = results["aiohttp"]
    for row in results.values():
        row["c16_json_vs_aiohttp"] = row["c16_json_rps"] / base["c16_json_rps"]
        row["c16_binary_vs_aiohttp"] = row["c16_binary_rps"] / base["c16_binary_rps"]
        row["c1_p50_vs_aiohttp"] = row["c1_p50_ms"] / base["c1_p50_ms"]
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
