"""Parsing of variant and gate specifications from the command line or JSON.

Three ways to say what to build, which may be mixed:

* `--variant int8-dynamic`: a method alone; the name defaults to the method.
* `--variant name=int8pc,method=int8-dynamic,perChannel=true`: key=value pairs; every key other than name and
  method is an option. Values are parsed as JSON when they can be (true, 3, 0.5, "x"), else kept as strings.
* `--variants-json FILE|JSON`: a list of `{name, method, options, gate}` objects, the shape of a
  ModelDeployment's spec.edge.variants[] (or an object holding such a list under "variants").

Gates: `--gate cosine.min>=0.99` applies to every variant without its own gate; `--gate int8:cosine.min>=0.99`
applies to the variant named int8 only. Causal language models (`--format hf|gguf`) have their own metrics
(`kl.mean<=0.1`, `top1-agreement.mean>=0.88`, `perplexity.ratio<=1.05`, `greedy-match.mean>=0.9`); a tensor
metric on a language model, or a language-model metric on a tensor model, is an error.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.manifests import (
    LM_METHODS,
    LM_METRICS,
    TENSOR_METRICS,
    Gate,
    Method,
    Metric,
    Stat,
    VariantSpec,
)

_GATE_RE = re.compile(
    r"^\s*(?:(?P<variant>[a-z0-9][-a-z0-9]*)\s*:)?\s*(?P<metric>[a-z0-9_-]+)(?:\.(?P<stat>[a-z0-9]+))?"
    r"\s*(?P<op>>=|<=|>|<)\s*(?P<threshold>[-+0-9.eE]+)\s*$"
)
_METRIC_ALIASES = {
    "top1": "top1-agreement",
    "top1agreement": "top1-agreement",
    "maxabserror": "max-abs-error",
    "greedymatch": "greedy-match",
    "greedy": "greedy-match",
    "ppl": "perplexity",
}
# The statistics a language-model metric has (the first is its default): one number over all positions.
LM_STATS: dict[str, tuple[str, ...]] = {
    "kl": ("mean",),
    "top1-agreement": ("mean",),
    "perplexity": ("ratio",),
    "greedy-match": ("mean",),
}
TENSOR_ONLY_METHODS = ("int8-dynamic", "int8-static", "distilled")
DEFAULT_GREEDY_TOKENS = 16


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
    stat = m["stat"] or {"max-abs-error": "max", "perplexity": "ratio"}.get(metric, "mean")
    if metric == "perplexity" and stat == "mean":
        stat = "ratio"  # the API's default stat; a perplexity gate is on the ratio
    if stat not in get_args(Stat):
        raise CompressionError(f"--gate {text!r}: unknown stat {stat!r}; use one of {get_args(Stat)}")
    if metric in LM_METRICS and stat not in LM_STATS[metric]:
        raise CompressionError(f"--gate {text!r}: {metric} has the stat {LM_STATS[metric][0]} only")
    try:
        threshold = float(m["threshold"])
    except ValueError:
        raise CompressionError(f"--gate {text!r}: threshold {m['threshold']!r} is not a number") from None
    gate = Gate.model_validate({"metric": metric, "stat": stat, "op": m["op"], "threshold": threshold})
    return m["variant"], gate


def check_gate_possible(gate: Gate, *, classifier: bool | None, lm: bool | None = False) -> None:
    """Refuse gates no model can meet, before spending minutes building variants.

    `lm`: True for a causal language model, False for a tensor model, None when not known yet.
    """
    t, op, what = gate.threshold, gate.op, gate.describe()
    if not math.isfinite(t):
        raise CompressionError(f"gate {what}: threshold must be a finite number")
    if lm is True and gate.metric in TENSOR_METRICS:
        raise CompressionError(
            f"gate {what} is a tensor-model metric; a language model is gated on kl, top1-agreement, "
            "perplexity or greedy-match (e.g. 'kl.mean<=0.1')"
        )
    if lm is False and gate.metric in LM_METRICS:
        raise CompressionError(
            f"gate {what} is a language-model metric; it needs --format hf or gguf (a causal LM)"
        )
    if lm is True and gate.stat not in LM_STATS[gate.metric]:
        raise CompressionError(f"gate {what}: {gate.metric} has the stat {LM_STATS[gate.metric][0]} only")
    lo_hi = {"kl": "kl is never negative", "perplexity": "a perplexity ratio is positive"}
    if gate.metric in lo_hi and ((op == "<" and t <= 0) or (op == "<=" and t < 0)):
        raise CompressionError(f"gate {what} is impossible: {lo_hi[gate.metric]}")
    if gate.metric == "greedy-match" and (
        (op == ">=" and t > 1) or (op == ">" and t >= 1) or (op == "<=" and t < 0) or (op == "<" and t <= 0)
    ):
        raise CompressionError(f"gate {what} is impossible: greedy-match lies in [0, 1]")
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
    if gate.metric == "top1-agreement" and classifier is False and not lm:
        raise CompressionError(f"gate {what} needs a classifier (an output of shape [batch, classes])")


def _lm_gate(kl: float, top1: float) -> list[Gate]:
    return [
        Gate(metric="kl", stat="mean", op="<=", threshold=kl),
        Gate(metric="top1-agreement", stat="mean", op=">=", threshold=top1),
    ]


# Causal language models: measured on the tiny test model and on a 135M chat model (docs/manifest.md).
LM_DEFAULT_GATES: dict[str, tuple[float, float]] = {
    "int8": (0.01, 0.97),
    "int4": (0.1, 0.88),
    "fp16": (0.001, 0.99),
}


def default_gates(method: str, *, classifier: bool, lm: bool = False) -> list[Gate]:
    """Used when neither the variant nor the command line gives a gate: no variant ships unverified."""
    if lm:
        return _lm_gate(*LM_DEFAULT_GATES[method])
    if method == "distilled":
        if classifier:
            return [Gate(metric="top1-agreement", stat="mean", op=">=", threshold=0.97)]
        return [Gate(metric="cosine", stat="mean", op=">=", threshold=0.95)]
    return [Gate(metric="cosine", stat="min", op=">=", threshold=0.99)]


def greedy_tokens(spec: VariantSpec) -> int:
    """N of greedy-match: the variant's `greedyTokens` option (default 16; 0 turns the measurement off)."""
    n = spec.options.get("greedyTokens")
    if n is None:
        return DEFAULT_GREEDY_TOKENS
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 4096:
        raise CompressionError(
            f"variant {spec.name}: greedyTokens must be an integer in [0, 4096], got {n!r}"
        )
    return n


def check_methods(variants: list[VariantSpec], *, lm: bool) -> None:
    """A language-model method on a tensor model, or a tensor method on a language model, is an error."""
    for v in variants:
        if lm and v.method in TENSOR_ONLY_METHODS:
            raise CompressionError(
                f"variant {v.name}: method {v.method} is for tensor models; a language model "
                f"(--format hf|gguf) takes {', '.join((*LM_METHODS, 'fp16'))}"
            )
        if not lm and v.method in LM_METHODS:
            raise CompressionError(
                f"variant {v.name}: method {v.method} is for causal language models (--format hf or gguf)"
            )


def resolve(
    variants: list[VariantSpec], gate_args: list[str], *, classifier: bool | None, lm: bool | None = False
) -> list[VariantSpec]:
    """Attach command-line gates to variants and check every gate is attainable.

    `lm`: True for a causal language model (default gates per method, LM metrics only), False for a tensor
    model, None when not yet known (syntax only).
    """
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CompressionError(f"duplicate variant names: {', '.join(dupes)}")
    if lm is not None:
        check_methods(variants, lm=lm)
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
        if not gates and lm:
            gates = default_gates(v.method, classifier=False, lm=True)
        elif not gates and classifier is not None:
            gates = default_gates(v.method, classifier=classifier)
        for g in gates:
            check_gate_possible(g, classifier=classifier, lm=lm)
        if lm and any(g.metric == "greedy-match" for g in gates) and greedy_tokens(v) == 0:
            raise CompressionError(f"variant {v.name}: a greedy-match gate needs greedyTokens > 0")
        out.append(v.model_copy(update={"gate": gates}))
    return out
