"""Parsing of variant and gate specifications from the command line or JSON.

Three ways to say what to build, which may be mixed:

* `--variant int8-dynamic`: a method alone; the name defaults to the method.
* `--variant name=int8pc,method=int8-dynamic,perChannel=true`: key=value pairs; every key other than name and
  method is an option. Values are parsed as JSON when they can be (true, 3, 0.5, "x"), else kept as strings.
* `--variants-json FILE|JSON`: a list of `{name, method, options, gate}` objects, the shape of a
  ModelDeployment's spec.edge.variants[] (or an object holding such a list under "variants").

Gates: `--gate cosine.min>=0.99` applies to every variant without its own gate; `--gate int8:cosine.min>=0.99`
applies to the variant named int8 only.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.manifests import Gate, Method, Metric, Stat, VariantSpec

_GATE_RE = re.compile(
    r"^\s*(?:(?P<variant>[a-z0-9][-a-z0-9]*)\s*:)?\s*(?P<metric>[a-z0-9_-]+)(?:\.(?P<stat>[a-z0-9]+))?"
    r"\s*(?P<op>>=|<=|>|<)\s*(?P<threshold>[-+0-9.eE]+)\s*$"
)
_METRIC_ALIASES = {
    "top1": "top1-agreement",
    "top1agreement": "top1-agreement",
    "maxabserror": "max-abs-error",
}


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_variant(text: str) -> VariantSpec:
    text = text.strip()
    if "=" not in text:
        return _validate({"name": text, "method": text}, text)
    fields: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CompressionError(
                f"--variant {text!r}: expected key=value pairs separated by commas, got {part!r}"
            )
        if key in ("name", "method"):
            fields[key] = raw.strip()
        else:
            options[key] = _value(raw.strip())
    if "method" not in fields:
        raise CompressionError(f"--variant {text!r}: method= is required ({', '.join(get_args(Method))})")
    fields.setdefault("name", fields["method"])
    fields["options"] = options
    return _validate(fields, text)


def _validate(data: dict[str, Any], origin: str) -> VariantSpec:
    try:
        return VariantSpec.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise CompressionError(f"variant {origin!r} is invalid: {problems}") from None


def parse_variants_json(text_or_path: str) -> list[VariantSpec]:
    text = text_or_path.strip()
    if not text.startswith(("[", "{")):
        path = Path(text_or_path)
        if not path.is_file():
            raise CompressionError(f"--variants-json: {text_or_path!r} is neither JSON nor a readable file")
        text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CompressionError(f"--variants-json: invalid JSON: {e}") from None
    if isinstance(data, dict):
        data = data.get(
            "variants", data.get("edge", {}).get("variants") if isinstance(data.get("edge"), dict) else None
        )
    if not isinstance(data, list):
        raise CompressionError(
            "--variants-json: expected a list of variants or an object with a 'variants' list"
        )
    return [_validate(item if isinstance(item, dict) else {"bad": item}, json.dumps(item)) for item in data]


def parse_gate(text: str) -> tuple[str | None, Gate]:
    """Parse `[variant:]metric[.stat]OPthreshold` into (variant name or None, Gate)."""
    m = _GATE_RE.match(text)
    if not m:
        raise CompressionError(
            f"--gate {text!r}: expected [variant:]metric[.stat]OPthreshold, e.g. 'cosine.min>=0.99' "
            f"or 'int8:top1-agreement>=0.97'"
        )
    metric = _METRIC_ALIASES.get(m["metric"].replace("_", ""), m["metric"])
    if metric not in get_args(Metric):
        raise CompressionError(f"--gate {text!r}: unknown metric {metric!r}; use one of {get_args(Metric)}")
    stat = m["stat"] or ("max" if metric == "max-abs-error" else "mean")
    if stat not in get_args(Stat):
        raise CompressionError(f"--gate {text!r}: unknown stat {stat!r}; use one of {get_args(Stat)}")
    try:
        threshold = float(m["threshold"])
    except ValueError:
        raise CompressionError(f"--gate {text!r}: threshold {m['threshold']!r} is not a number") from None
    gate = Gate.model_validate({"metric": metric, "stat": stat, "op": m["op"], "threshold": threshold})
    return m["variant"], gate


def check_gate_possible(gate: Gate, *, classifier: bool | None) -> None:
    """Refuse gates no model can meet, before spending minutes building variants."""
    t, op, what = gate.threshold, gate.op, gate.describe()
    if not math.isfinite(t):
        raise CompressionError(f"gate {what}: threshold must be a finite number")
    if gate.metric in ("cosine", "top1-agreement"):
        lo = -1.0 if gate.metric == "cosine" else 0.0
        if (
            (op == ">=" and t > 1)
            or (op == ">" and t >= 1)
            or (op == "<=" and t < lo)
            or (op == "<" and t <= lo)
        ):
            raise CompressionError(f"gate {what} is impossible: {gate.metric} lies in [{lo:g}, 1]")
    if gate.metric == "max-abs-error" and ((op == "<" and t <= 0) or (op == "<=" and t < 0)):
        raise CompressionError(f"gate {what} is impossible: max-abs-error is never negative")
    if gate.metric == "top1-agreement" and classifier is False:
        raise CompressionError(f"gate {what} needs a classifier (an output of shape [batch, classes])")


def default_gates(method: str, *, classifier: bool) -> list[Gate]:
    """Used when neither the variant nor the command line gives a gate: no variant ships unverified."""
    if method == "distilled":
        if classifier:
            return [Gate(metric="top1-agreement", stat="mean", op=">=", threshold=0.97)]
        return [Gate(metric="cosine", stat="mean", op=">=", threshold=0.95)]
    return [Gate(metric="cosine", stat="min", op=">=", threshold=0.99)]


def resolve(
    variants: list[VariantSpec], gate_args: list[str], *, classifier: bool | None
) -> list[VariantSpec]:
    """Attach command-line gates to variants and check every gate is attainable."""
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CompressionError(f"duplicate variant names: {', '.join(dupes)}")
    global_gates: list[Gate] = []
    per_variant: dict[str, list[Gate]] = {}
    for text in gate_args:
        target, gate = parse_gate(text)
        if target is None:
            global_gates.append(gate)
        elif target not in names:
            raise CompressionError(f"--gate {text!r} names variant {target!r}, which is not in {names}")
        else:
            per_variant.setdefault(target, []).append(gate)
    out: list[VariantSpec] = []
    for v in variants:
        gates = list(v.gate) + per_variant.get(v.name, [])
        if not gates:
            gates = list(global_gates)
        if not gates and classifier is not None:
            gates = default_gates(v.method, classifier=classifier)
        for g in gates:
            check_gate_possible(g, classifier=classifier)
        out.append(v.model_copy(update={"gate": gates}))
    return out
