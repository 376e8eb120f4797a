"""Federated learning figures: upload bytes per site per round by trained part, accuracy per round, epsilon.

Runs the real trainer and aggregation code in one process (no HTTP: the bytes are the exact bodies
`kiri train-edge` would POST, from `deltas.encode`). The baseline is the whole-model update measured in the
same run; the other parts are reported as ratios against it.

    .venv/bin/python bench/learning/bench_learning.py [--rounds 5] [--sites 4] [--hidden 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from kiri_runtime.learning import accounting, aggregating, deltas, privatizing
from kiri_runtime.learning.parts import TrainedPart, dense_update
from kiri_runtime.learning.training import evaluate, train_local

FEATURES, CLASSES = 32, 10


def make_model(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, CLASSES),
    )


def make_data(
    sites: int, per_site: int, seed: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, size=(CLASSES, FEATURES)).astype(np.float32)

    def sample(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(CLASSES), counts)
        x = centers[y] + rng.normal(0, 1.0, size=(len(y), FEATURES))
        order = rng.permutation(len(y))
        return x.astype(np.float32)[order], y[order].astype(np.int64)

    site_data = []
    for _ in range(sites):
        mix = rng.dirichlet([0.5] * CLASSES)
        site_data.append(sample(np.round(mix * per_site).astype(int)))
    return site_data, sample(np.full(CLASSES, 50))


def run(part: TrainedPart, args: argparse.Namespace) -> dict[str, Any]:
    site_data, (hx, hy) = make_data(args.sites, args.per_site, args.seed)
    torch.manual_seed(args.seed)
    global_model = make_model(args.hidden)
    shapes = {n: tuple(p.shape) for n, p in global_model.named_parameters()}
    accuracy = [evaluate(global_model, hx, hy).accuracy]
    upload_bytes: list[int] = []
    started = time.perf_counter()
    for r in range(1, args.rounds + 1):
        updates, samples = [], []
        for i, (x, y) in enumerate(site_data):
            local = make_model(args.hidden)
            local.load_state_dict(global_model.state_dict())
            res = train_local(
                local, x, y, part, epochs=args.epochs, lr=args.lr, batch_size=32, seed=i, lora_seed=r
            )
            noised, _ = privatizing.privatize(
                res.update, args.clip, args.noise, np.random.default_rng(1000 * r + i)
            )
            body = deltas.encode(
                deltas.Delta(
                    r, f"site-{i}", res.samples, "0" * 64, part.describe(), args.clip, args.noise, noised
                )
            )
            upload_bytes.append(len(body))
            updates.append(deltas.decode(body).tensors)
            samples.append(res.samples)
        dense = dense_update(part, aggregating.fedavg(updates, samples), shapes, r)
        state = global_model.state_dict()
        for name, u in dense.items():
            state[name] = state[name] + torch.as_tensor(u)
        global_model.load_state_dict(state)
        accuracy.append(evaluate(global_model, hx, hy).accuracy)
    return {
        "part": part.describe(),
        "bytes_per_site_per_round": int(np.median(upload_bytes)),
        "accuracy": [round(float(a or 0), 4) for a in accuracy],
        "seconds": round(time.perf_counter() - started, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--per-site", type=int, default=200)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(1)
    parts = [TrainedPart("whole"), TrainedPart("layers", ("4",)), TrainedPart("lora", rank=4)]
    results = [run(part, args) for part in parts]
    base = results[0]["bytes_per_site_per_round"]
    params = sum(p.numel() for p in make_model(args.hidden).parameters())
    print(
        f"model: MLP {FEATURES}-{args.hidden}-{args.hidden}-{CLASSES}, {params} parameters; {args.sites} non-IID sites, "
        f"{args.rounds} rounds, clipNorm {args.clip}, noiseMultiplier {args.noise}"
    )
    print(f"{'trained part':<22}{'bytes/site/round':>18}{'vs whole':>10}  accuracy by round (0 = start)")
    for r in results:
        name = r["part"]["kind"] + (f" {r['part']['names']}" if r["part"]["kind"] == "layers" else "")
        name += f" r={r['part']['rank']}" if r["part"]["kind"] == "lora" else ""
        ratio = r["bytes_per_site_per_round"] / base
        print(f"{name:<22}{r['bytes_per_site_per_round']:>18}{ratio:>10.4f}  {r['accuracy']}")
    eps = {n: round(accounting.epsilon(z, n, args.delta), 3) for z in (args.noise,) for n in (1, 5, 10, 20)}
    eps_by_z = {z: round(accounting.epsilon(z, 10, args.delta), 3) for z in (0.5, 1.0, 2.0, 4.0)}
    print(f"epsilon (delta {args.delta:g}) at noiseMultiplier {args.noise} after N rounds: {eps}")
    print(f"epsilon after 10 rounds by noiseMultiplier: {eps_by_z}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"results": results, "epsilon": eps, "epsilon_by_noise": eps_by_z, "params": params},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
