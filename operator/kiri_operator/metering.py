"""Meters each ModelDeployment's status into Prometheus series, for the chart's alerts and dashboard.

The status is the operator's record of what it decided, so the series are derived from it rather than
counted at each decision site: one call after a reconcile keeps them right, including after a restart.

Series (all in `kiri_operator.metrics.REGISTRY`, labels `namespace`, `modeldeployment`):
- `kiri_modeldeployment_phase{phase}`: 1 for the current phase, 0 for the others (alert: stuck rollout);
- `kiri_variants{variant, state}`: 1 per variant of the update revision in its state (alert: rejected);
- `kiri_rollout_stage`: index of the wave in progress;
- `kiri_rollbacks_total{reason}`: rollbacks seen in `status.history` (alert: rollback).

Pure: no Kubernetes I/O, no kopf; it reads plain status dicts (camelCase, as the API server returns them).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import Any, Final

from prometheus_client import Counter, Gauge, ProcessCollector

from kiri_operator.api.statuses import PHASES
from kiri_operator.metrics import REGISTRY

ROLLED_BACK: Final = "RolledBack"

PHASE: Final = Gauge(
    "kiri_modeldeployment_phase",
    "1 for the ModelDeployment's current phase, 0 for the other phases.",
    ["namespace", "modeldeployment", "phase"],
    registry=REGISTRY,
)
VARIANTS: Final = Gauge(
    "kiri_variants",
    "1 per variant of the update revision, labelled with its state (Verified, Rejected, ...).",
    ["namespace", "modeldeployment", "variant", "state"],
    registry=REGISTRY,
)
STAGE: Final = Gauge(
    "kiri_rollout_stage",
    "Index into spec.rollout.stages of the wave in progress (or last completed).",
    ["namespace", "modeldeployment"],
    registry=REGISTRY,
)
ROLLBACKS: Final = Counter(
    "kiri_rollbacks",
    "Rollbacks to the last good revision, by reason, as recorded in status.history.",
    ["namespace", "modeldeployment", "reason"],
    registry=REGISTRY,
)

# The operator's memory and CPU (process_*) on the same endpoint, for the dashboard's process panels.
with contextlib.suppress(ValueError):  # another module registered it first
    ProcessCollector(registry=REGISTRY)

_lock = threading.Lock()
# Rollback history entries already counted, per ModelDeployment. A ModelDeployment seen for the first time
# (operator start) has its existing history recorded without counting: a restart must not re-fire alerts.
_seen: dict[tuple[str, str], set[tuple[str, str]]] = {}
_variant_keys: dict[tuple[str, str], set[tuple[str, str]]] = {}


def _history_key(entry: Mapping[str, Any]) -> tuple[str, str]:
    return str(entry.get("revision", "")), str(entry.get("time", ""))


def meter(namespace: str, name: str, status: Mapping[str, Any] | None) -> None:
    """Set the series of one ModelDeployment from its status (as stored: camelCase keys)."""
    status = status or {}
    key = (namespace, name)
    phase = status.get("phase") or "Pending"
    with _lock:
        for p in PHASES:
            PHASE.labels(namespace, name, p).set(1 if p == phase else 0)

        variants = {
            (str(v.get("name")), str(v.get("state") or "Pending"))
            for v in status.get("variants") or []
            if v.get("name")
        }
        for stale in _variant_keys.get(key, set()) - variants:
            VARIANTS.remove(namespace, name, *stale)
        for variant, state in variants:
            VARIANTS.labels(namespace, name, variant, state).set(1)
        _variant_keys[key] = variants

        STAGE.labels(namespace, name).set(int((status.get("edge") or {}).get("stageIndex") or 0))

        rollbacks = [h for h in status.get("history") or [] if h.get("outcome") == ROLLED_BACK]
        first_look = key not in _seen
        seen = _seen.setdefault(key, set())
        for entry in rollbacks:
            hk = _history_key(entry)
            if hk in seen:
                continue
            seen.add(hk)
            if not first_look:
                ROLLBACKS.labels(namespace, name, str(entry.get("reason") or "Unknown")).inc()


def forget(namespace: str, name: str) -> None:
    """Drop every series of a deleted ModelDeployment."""
    key = (namespace, name)
    with _lock:
        for p in PHASES:
            _remove(PHASE, namespace, name, p)
        for variant, state in _variant_keys.pop(key, set()):
            _remove(VARIANTS, namespace, name, variant, state)
        _remove(STAGE, namespace, name)
        for metric in list(ROLLBACKS.collect()):
            for sample in metric.samples:
                labels = sample.labels
                if labels.get("namespace") == namespace and labels.get("modeldeployment") == name:
                    _remove(ROLLBACKS, namespace, name, labels["reason"])
        _seen.pop(key, None)


def _remove(metric: Gauge | Counter, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
