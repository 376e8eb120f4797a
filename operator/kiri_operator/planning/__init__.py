"""Planning: `plan(spec, observed) -> Plan`. Pure: no Kubernetes client, no kopf, no clock, no I/O.

This package's face; the work is in its modules, one per tier (`cloud`, `compression`, `edge`, `learning`),
`status` over them, and `planner`, which calls them in the order of their dependencies.
"""

from kiri_operator.planning.planner import plan
from kiri_operator.planning.settings import Settings
from kiri_operator.planning.status import invalid_spec_status, normalize_status

__all__ = ["Settings", "invalid_spec_status", "normalize_status", "plan"]
