"""What GitOps tools read from a ModelDeployment: kstatus (Flux, kpt; cli-utils' own code, as the tiny
command hack/tools/kstatus that hack/build-binaries.sh builds) and Argo CD's health check (the Lua that
deploy/argocd ships, run by a real Lua through lupa). Shared by the e2e rollout tests, which check real
objects, and tests/integration/gitops, which checks the objects they recorded."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
ARGOCD_CHECK = REPO_ROOT / "deploy" / "argocd" / "kiri.dev" / "ModelDeployment"
HEALTH_LUA = ARGOCD_CHECK / "health.lua"
TESTDATA = ARGOCD_CHECK / "testdata"
# Set to a directory to write the objects the e2e tests check there (how ARGOCD_CHECK/testdata was made).
RECORD_ENV = "KIRI_RECORD_HEALTH_TESTDATA"


def kstatus_binary() -> Path:
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "build-binaries.sh"), "--print-bin-dirs"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    for line in out.split():
        if (Path(line) / "kstatus").is_file():
            return Path(line) / "kstatus"
    raise RuntimeError("kstatus is not built; run `bash hack/build-binaries.sh kstatus`")


def kstatus(obj: dict[str, Any], binary: Path | None = None) -> dict[str, Any]:
    """cli-utils' `status.Compute` of `obj`: {"status": "Current|InProgress|Failed|...", "message": ...}."""
    proc = subprocess.run(
        [str(binary or kstatus_binary())],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return dict(json.loads(proc.stdout))


def argocd_health(obj: dict[str, Any], script: Path = HEALTH_LUA) -> dict[str, str]:
    """Argo CD's view: the health check run on `obj` as Argo CD runs it (a global `obj`, a returned table),
    by Lua 5.1, the language gopher-lua (Argo CD's Lua) implements."""
    from lupa import lua51

    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = _to_lua(lua, obj)
    result = lua.execute(script.read_text())
    return {"status": str(result["status"]), "message": str(result["message"] or "")}


def _to_lua(lua: Any, value: Any) -> Any:
    # Argo CD hands Lua the object as nested tables, lists as 1-based arrays.
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def recorded(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as testdata keeps it: no managedFields, uid, resourceVersion or kubectl's last applied
    configuration (noise in a diff)."""
    out = json.loads(json.dumps(obj))
    meta = out.get("metadata") or {}
    for key in ("managedFields", "uid", "resourceVersion"):
        meta.pop(key, None)
    (meta.get("annotations") or {}).pop("kubectl.kubernetes.io/last-applied-configuration", None)
    return dict(out)


HEADER_RECORDED = (
    "# Recorded from the API server by tests/e2e/test_rollout.py (KIRI_RECORD_HEALTH_TESTDATA).\n"
)
# Objects no e2e step shows reliably, made from a recorded one by one documented change.
DERIVED: dict[str, tuple[str, str]] = {
    "just-applied": ("healthy", "as created, before the operator wrote any status (no status, generation 1)"),
    "generation-not-observed": (
        "healthy",
        "the spec changed (generation + 1); the operator has not seen it yet",
    ),
    "older-operator-rolled-back": (
        "rolled-back",
        "as an operator older than Reconciling and Stalled wrote it",
    ),
    "older-operator-healthy": ("healthy", "as an operator older than Reconciling and Stalled wrote it"),
}


def _derive(name: str, obj: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(obj))
    if name == "just-applied":
        out.pop("status")
        out["metadata"]["generation"] = 1
    elif name == "generation-not-observed":
        out["metadata"]["generation"] = out["status"]["observedGeneration"] + 1
    else:
        old = [c for c in out["status"]["conditions"] if c["type"] not in ("Reconciling", "Stalled")]
        out["status"]["conditions"] = old
    return dict(out)


def write_testdata(recorded_dir: Path, testdata: Path = TESTDATA) -> list[str]:
    """ARGOCD_CHECK/testdata from a directory the e2e tests recorded into, plus the DERIVED objects."""
    testdata.mkdir(parents=True, exist_ok=True)
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(recorded_dir.glob("*.yaml")):
        objects[path.stem] = recorded(yaml.safe_load(path.read_text()))
        body = yaml.safe_dump(objects[path.stem], sort_keys=False)
        (testdata / path.name).write_text(HEADER_RECORDED + body)
    for name, (base, note) in DERIVED.items():
        body = yaml.safe_dump(_derive(name, objects[base]), sort_keys=False)
        (testdata / f"{name}.yaml").write_text(f"# Derived from {base}.yaml: {note}.\n" + body)
    return sorted([*objects, *DERIVED])


def record(obj: dict[str, Any], name: str) -> None:
    """With KIRI_RECORD_HEALTH_TESTDATA=DIR, write `obj` to DIR/NAME.yaml."""
    where = os.environ.get(RECORD_ENV)
    if not where:
        return
    Path(where).mkdir(parents=True, exist_ok=True)
    (Path(where) / f"{name}.yaml").write_text(yaml.safe_dump(recorded(obj), sort_keys=False))


if __name__ == "__main__":
    import sys

    # python tests/gitops_health.py DIR: DIR holds what `KIRI_RECORD_HEALTH_TESTDATA=DIR pytest
    # tests/e2e/test_rollout.py` recorded.
    print("\n".join(write_testdata(Path(sys.argv[1]))))
