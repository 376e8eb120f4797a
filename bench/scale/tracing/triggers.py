"""Count what queued the reconciles of a traced bench_scale run (see sitecustomize.py here).

Usage: `triggers.py TRACE RESULT.json [TRACE RESULT.json ...]`, TRACE the KIRI_TRACE prefix of a run and
RESULT its `bench_scale.py --json` output (whose `rollout_window_epoch` cuts the trace to the rollout).
Prints, per run: reconciles by the cause that queued them and how many of those found nothing to do (no
write, no deferred status), what the queue did with each add, and the event-to-status latency computed
exactly from the trace (the operator's histogram has a 10-30 s bucket, too coarse for a p99 near 10 s).
"""

from __future__ import annotations

import collections
import glob
import json
import sys
from pathlib import Path
from typing import Any

UNWATCHED = ("resync", "relist", "timer", "dirty-readd", "startup")


def load(trace: str, result: Path) -> tuple[list[dict[str, Any]], tuple[float, float]]:
    records = [
        json.loads(line) for f in glob.glob(f"{trace}.*.jsonl") for line in Path(f).read_text().splitlines()
    ]
    records.sort(key=lambda r: r["t"])
    start, end = json.loads(result.read_text())["rollout_window_epoch"]
    return records, (start, end)


def short(cause: str) -> str:
    return ":".join(cause.split(":")[:3]).rstrip(":")


def idle(outcome: Any) -> bool:
    return isinstance(outcome, dict) and not (
        outcome.get("writes") or outcome.get("status_deferred") or outcome.get("error")
    )


def latencies(records: list[dict[str, Any]], window: tuple[float, float]) -> list[float]:
    """As handlers._handle measures it: from the first watch event that queued a key to the status patch
    of the reconcile it caused, carried over a deferred (progress-only) status."""
    timeline = []
    for r in records:
        if r["ev"] == "add":
            timeline.append((r["t"], 0, r))
        elif r["ev"] == "reconcile":
            timeline += [(r["t"] - r["dur"], 1, r), (r["t"], 2, r)]
    timeline.sort(key=lambda x: (x[0], x[1]))
    event_at: dict[tuple[str, ...], float] = {}
    running: dict[tuple[str, ...], float | None] = {}
    out = []
    for t, step, r in timeline:
        key = tuple(r["key"])
        if step == 0 and not r["cause"].startswith(UNWATCHED):
            event_at.setdefault(key, t)
        elif step == 1:
            running[key] = event_at.pop(key, None)
        elif step == 2:
            since, outcome = running.pop(key, None), r["outcome"] or {}
            if since is None:
                continue
            if outcome.get("status_written") and window[0] <= t <= window[1]:
                out.append(t - since)
            elif outcome.get("status_deferred"):
                event_at[key] = min(since, event_at.get(key, since))
    return sorted(out)


def report(trace: str, result: Path) -> None:
    records, window = load(trace, result)
    inside = [r for r in records if window[0] <= r["t"] <= window[1]]
    reconciles = [r for r in inside if r["ev"] == "reconcile"]
    by_cause = collections.Counter(short(r["cause"]) for r in reconciles)
    idle_by_cause = collections.Counter(short(r["cause"]) for r in reconciles if idle(r["outcome"]))
    print(f"== {trace}: rollout {window[1] - window[0]:.1f} s, {len(reconciles)} reconciles")
    print(f"   {'queued by':40} {'reconciles':>10} {'found nothing':>14}")
    for cause, n in by_cause.most_common():
        print(f"   {cause:40} {n:>10} {idle_by_cause[cause]:>14}")
    print(f"   {'all':40} {len(reconciles):>10} {sum(idle_by_cause.values()):>14}")
    outcomes = [r["outcome"] or {} for r in reconciles]
    written = sum(1 for o in outcomes if o.get("status_written"))
    deferred = sum(1 for o in outcomes if o.get("status_deferred"))
    errors = sum(1 for o in outcomes if o.get("error"))
    print(f"   status written {written}, deferred {deferred}, errors {errors}")
    adds = collections.Counter(r["state"] for r in inside if r["ev"] == "add")
    events = collections.Counter(short(r["cause"]).rsplit(":", 1)[0] for r in inside if r["ev"] == "add")
    print(f"   adds by what the queue did: {dict(adds)}")
    print(f"   adds by cause: {dict(events.most_common())}")
    lat = latencies(records, window)
    if lat:
        n = len(lat)
        p = {q: lat[min(n - 1, int(q * n))] for q in (0.5, 0.9, 0.99)}
        over = sum(1 for x in lat if x > 10)
        print(
            f"   event->status n={n} p50 {p[0.5]:.2f} p90 {p[0.9]:.2f} p99 {p[0.99]:.2f} s, over 10 s: {over}"
        )


def main(argv: list[str]) -> int:
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__)
        return 2
    for trace, result in zip(argv[::2], argv[1::2], strict=True):
        report(trace, Path(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
