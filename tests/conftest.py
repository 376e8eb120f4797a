"""What every test session shares: a short digest of its failures for CI.

CI's record of a run keeps only the head and the tail of its output, and the tail is the cluster's shutdown; the
pytest failure text sits in the elided middle. With `KIRI_FAILURE_DIGEST` set (`.ci/run` sets it), the session
writes each failed run (its first runs that reran included) as a few lines to that file, which `.ci/run` prints
last.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Enough to name the failure and its line; the full text stays in the output above.
MESSAGE_LINES = 4
LINE_CHARS = 240


def digest(reports: list[tuple[str, Any]]) -> list[str]:
    """One block per (outcome, report): `OUTCOME nodeid (phase)`, then the crash's place and its message's
    first lines, each trimmed."""
    out = []
    for outcome, report in reports:
        out.append(f"{outcome} {report.nodeid} ({report.when})")
        crash = getattr(report.longrepr, "reprcrash", None)
        if crash is None:  # a skip-like tuple or a plain string
            lines = str(report.longrepr or "").strip().splitlines()[-MESSAGE_LINES:]
        else:
            raised = f"{_short(crash.path)}:{crash.lineno}"
            # The test's own line, which is not where a helper's wait raised.
            entries = getattr(getattr(report.longrepr, "reprtraceback", None), "reprentries", [])
            own = [
                f"{loc.path}:{loc.lineno}"
                for loc in (getattr(e, "reprfileloc", None) for e in entries)
                if loc is not None and loc.path == report.location[0]
            ]
            where = own[-1] if own else raised
            out.append(f"    at {where}" + (f" (raised at {raised})" if where != raised else ""))
            lines = str(crash.message).splitlines()[:MESSAGE_LINES]
        out += [f"    {line[:LINE_CHARS]}" for line in lines]
    return out


def _short(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def pytest_terminal_summary(terminalreporter: Any) -> None:
    target = os.environ.get("KIRI_FAILURE_DIGEST")
    if not target:
        return
    stats = terminalreporter.stats
    # Reruns first: a test that failed twice has its first failure there, and it is usually the telling one.
    reports = [
        (outcome.upper(), r) for outcome in ("rerun", "failed", "error") for r in stats.get(outcome, [])
    ]
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in digest(reports)))
