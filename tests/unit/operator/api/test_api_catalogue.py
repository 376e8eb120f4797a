"""The bad-manifest catalogue against the pydantic models: each case the API server must reject is also
rejected offline, with an error that names the same field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kiri_operator.api import ModelDeployment
from manifest_catalogue import CATALOGUE, apply_case, field_path

pytestmark = pytest.mark.timeout(30)


def _names_field(error: dict[str, Any], field: list[str | int]) -> bool:
    loc = list(error["loc"])
    if loc[: len(field)] == field:
        return True  # the error points inside the field
    if loc != field[: len(loc)]:
        return False
    rest = [t for t in field[len(loc) :] if isinstance(t, str)]
    return all(t in error["msg"] for t in rest)


def test_base_is_valid() -> None:
    ModelDeployment.model_validate(CATALOGUE["base"])


def test_catalogue_is_large_and_ids_are_unique() -> None:
    ids = [case["id"] for case in CATALOGUE["cases"]]
    assert len(ids) >= 30
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CATALOGUE["cases"], ids=lambda c: c["id"])
def test_models_reject_case_naming_the_field(case: dict[str, Any]) -> None:
    manifest = apply_case(CATALOGUE["base"], case)
    with pytest.raises(ValidationError) as info:
        ModelDeployment.model_validate(manifest)
    field = field_path(case["field"])
    errors = info.value.errors()
    assert any(_names_field(e, field) for e in errors), (
        f"no error names {case['field']}: {[(e['loc'], e['msg']) for e in errors]}"
    )


@pytest.mark.parametrize("case", CATALOGUE["good_cases"], ids=lambda c: c["id"])
def test_models_accept_boundary_case(case: dict[str, Any]) -> None:
    ModelDeployment.model_validate(apply_case(CATALOGUE["base"], case))
