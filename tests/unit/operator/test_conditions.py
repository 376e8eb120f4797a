"""Conditions as pure code."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kiri_operator import conditions as C
from kiri_operator.conditions import Condition

pytestmark = pytest.mark.timeout(10)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_transition_time_moves_only_when_status_flips():
    conds = C.set_condition([], Condition(C.READY, "False", "Reconciling", "a"), T0)
    assert conds[0].last_transition_time == T0
    conds = C.set_condition(conds, Condition(C.READY, "False", "Other", "b"), T0 + timedelta(minutes=1))
    assert conds[0].last_transition_time == T0 and conds[0].reason == "Other"
    conds = C.set_condition(conds, Condition(C.READY, "True", "Available"), T0 + timedelta(minutes=2))
    assert conds[0].last_transition_time == T0 + timedelta(minutes=2)


def test_conditions_round_trip_and_keep_a_stable_order():
    conds = C.set_condition([], Condition(C.DEGRADED, "True", "NoGPUNode", "x"), T0)
    conds = C.set_condition(conds, Condition(C.READY, "False", "NoGPUNode", "x"), T0)
    assert [c.type for c in conds] == [C.READY, C.DEGRADED]
    back = [Condition.from_dict(c.to_dict()) for c in conds]
    assert back == conds
    assert conds[1].is_bad and conds[0].is_bad
    assert not Condition(C.DEGRADED, "False", "AsExpected").is_bad


def test_changed_looks_at_status_and_reason_only():
    a = Condition(C.READY, "False", "X", "one")
    assert not C.changed(a, Condition(C.READY, "False", "X", "two"))
    assert C.changed(a, Condition(C.READY, "False", "Y", "one"))
    assert C.changed(None, a)
