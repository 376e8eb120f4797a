"""The privacy ledger: every update a site released, written before the round that took it is accepted.

The round records say which sites took part, but a record is written only when a round ends well: an
aggregation that crashed, or an aggregator killed mid-round, left the uploads' privacy spent and counted
nowhere, so a retried round spent it again. The ledger is written the moment a round closes, before
anything can fail, and the budget counts it. Where it lives is the caller's choice: `FileLedger` next to
the rounds (a single machine), or one the operator registers in `FACTORIES` that keeps it in the API (a
ConfigMap the ModelDeployment owns), so no per-node file is the only copy.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from kiri_runtime.learning.errors import LearningError

LEDGER_KEY = "ledger.json"


class Ledger(Protocol):
    def spent(self) -> dict[str, int]:
        """Updates each site has released, over every round and every retry of one."""
        ...

    def spend(self, number: int, sites: Sequence[str], epsilon: Mapping[str, float]) -> None:
        """Record that `sites` released an update to round `number` (and their epsilon after it), durably,
        or raise."""
        ...


def parse(text: str | None) -> list[dict[str, Any]]:
    """The spends in a ledger document; a missing one is empty, a garbled one an error (never zero)."""
    if not text:
        return []
    try:
        doc = json.loads(text)
        spends = doc["spends"]
        assert isinstance(spends, list) and all(isinstance(s.get("sites"), list) for s in spends)
    except (ValueError, KeyError, TypeError, AssertionError, AttributeError):
        raise LearningError("the privacy ledger is unreadable: refusing to guess what was spent") from None
    return spends


def counts(spends: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for entry in spends:
        for site in entry["sites"]:
            out[str(site)] = out.get(str(site), 0) + 1
    return out


def render(spends: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps({"spends": list(spends)}, sort_keys=True)


def entry(number: int, sites: Sequence[str], epsilon: Mapping[str, float]) -> dict[str, Any]:
    return {
        "round": number,
        "sites": sorted(sites),
        "epsilon": {k: round(v, 6) for k, v in sorted(epsilon.items()) if k in sites},
        "time": datetime.now(UTC).replace(microsecond=0).isoformat(),
    }


class FileLedger:
    """The ledger as one JSON file, replaced atomically and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _spends(self) -> list[dict[str, Any]]:
        return parse(self.path.read_text(encoding="utf-8") if self.path.exists() else None)

    def spent(self) -> dict[str, int]:
        return counts(self._spends())

    def spend(self, number: int, sites: Sequence[str], epsilon: Mapping[str, float]) -> None:
        spends = [*self._spends(), entry(number, sites, epsilon)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render(spends))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# name -> factory(target, options): ledgers kept elsewhere, registered by whoever can reach there (the
# operator's commands register "configmap", which keeps it in the API).
FACTORIES: dict[str, Callable[[str, Mapping[str, str]], Ledger]] = {}


def open_ledger(kind: str, target: str, options: Mapping[str, str]) -> Ledger:
    factory = FACTORIES.get(kind)
    if factory is None:
        raise LearningError(
            f"no {kind!r} ledger in this build (known: {', '.join(sorted(FACTORIES)) or 'none'})"
        )
    return factory(target, options)
