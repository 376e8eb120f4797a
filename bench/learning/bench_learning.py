"""The cost of SecAgg+ against plain FedAvg on Flower: bytes and time per round, same federation, same run.

A real federation on 127.0.0.1 (tests/integration/learning/flower_harness.py): one `flower-superlink` and one
`flower-supernode` per site over TLS with SuperNode authentication (as deployed), running Kiri's ServerApp and
ClientApp. Rounds alternate secure and plain (the sites allow plain rounds for this), so both modes meet the same
machine load; every figure comes from the round records the ServerApp writes (`traffic`: what crossed the
SuperLink as the server saw it, and the time spent waiting on the sites), and the submit-to-record wall time of
`flwr run`. The baseline is plain FedAvg.

    .venv/bin/python bench/learning/bench_learning.py [--sites 3] [--rounds 3] [--hidden 16,256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration" / "learning")]

import torch  # noqa: E402
from flower_harness import Federation, round_config  # noqa: E402

from kiri_runtime.learning import accounting  # noqa: E402
from kiri_runtime.learning.loading import save_weights  # noqa: E402
from learning_tiny_model import make_model, write_sites  # noqa: E402


def parameters(hidden: int) -> int:
    return sum(p.numel() for p in make_model(hidden).parameters())  # type: ignore[attr-defined]


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="kiri-bench-learning-"))
    sites = [f"site-{i}" for i in range(args.sites)]
    data, held_out = write_sites(root, args.sites, per_site=args.per_site)
    fed = Federation(root, dict(zip(sites, data, strict=True)), allow_plain=True).start()
    results: dict[str, Any] = {"sites": args.sites, "models": []}
    number = 0
    try:
        for hidden in args.hidden:
            torch.manual_seed(0)
            weights = root / f"initial-{hidden}.safetensors"
            save_weights(make_model(hidden), weights)  # type: ignore[arg-type]
            rows: dict[str, list[dict[str, float]]] = {"plain": [], "secure": []}
            first = hidden == args.hidden[0]
            for r in range(args.rounds * 2 + (1 if first else 0)):
                mode = ("secure", "plain")[(r + (0 if first else 1)) % 2]
                number += 1
                config = round_config(
                    root,
                    held_out,
                    weights,
                    sites,
                    number,
                    **{
                        "factory-kwargs": json.dumps({"hidden": hidden}),
                        "secure-aggregation": mode == "secure",
                        "noise-multiplier": args.noise,
                        "out": str(root / f"out-{hidden}"),
                    },
                )
                started = time.monotonic()
                record = fed.run_round(config)
                wall = time.monotonic() - started
                assert record.status == "accepted", record.reason
                if r == 0 and hidden == args.hidden[0]:
                    continue  # warm-up: the first round pays the processes' first imports
                t = record.traffic
                rows[mode].append(
                    {
                        "sent": t["sentBytes"],
                        "received": t["receivedBytes"],
                        "messages": t["messagesSent"] + t["messagesReceived"],
                        "server_seconds": t["seconds"],
                        "wall_seconds": wall,
                        "upload_per_site": statistics.median(p.upload_bytes for p in record.participants),
                    }
                )
            summary = {
                mode: {k: statistics.median(row[k] for row in got) for k in got[0]}
                for mode, got in rows.items()
            }
            results["models"].append({"hidden": hidden, "parameters": parameters(hidden), **summary})
    finally:
        fed.stop()
    results["epsilon"] = {n: round(accounting.epsilon(args.noise, n, 1e-5), 3) for n in (1, 5, 10, 20)}
    return results


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sites", type=int, default=3)
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds of each mode, interleaved, after one warm-up"
    )
    p.add_argument("--hidden", type=lambda s: [int(x) for x in s.split(",")], default=[16, 256])
    p.add_argument("--per-site", type=int, default=120)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--json")
    args = p.parse_args()
    out = run(args)
    print(f"{args.sites} sites, {args.rounds} rounds of each mode (medians), TLS, tiny MLP 8-h-3")
    head = (
        f"{'params':>8} {'mode':>7} {'server sent':>12} {'server recv':>12} {'upload/site':>12} {'msgs':>5}"
    )
    print(head + f" {'server s':>9} {'wall s':>7}   secure/plain: bytes, wall")
    for m in out["models"]:
        for mode in ("plain", "secure"):
            r = m[mode]
            ratio = ""
            if mode == "secure":
                base = m["plain"]
                total = (r["sent"] + r["received"]) / (base["sent"] + base["received"])
                ratio = f"   x{total:.2f}, x{r['wall_seconds'] / base['wall_seconds']:.2f}"
            print(
                f"{m['parameters']:>8} {mode:>7} {r['sent']:>12.0f} {r['received']:>12.0f} "
                f"{r['upload_per_site']:>12.0f} {r['messages']:>5.0f} {r['server_seconds']:>9.2f} "
                f"{r['wall_seconds']:>7.2f}{ratio}"
            )
    print(f"epsilon per site (noiseMultiplier {args.noise}, delta 1e-5) after N rounds: {out['epsilon']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
