"""Auto-tune of a language-model variant: climb a ladder of known fixes and keep the smallest that passes.

The variant's own options are tried first. When they miss the gates (and `tune` is not false), each rung of the
method's ladder is laid over them, in the order of the size it usually costs:

int4: plain (block 32, RTN) -> k-quant (no size cost) -> lm_head int8 -> lm_head and embeddings int8 (tied
models) -> first and last layers int8 -> block size 16 -> HQQ (float zero points) -> k-quant with lm_head and
first/last layers int8 -> all of them with HQQ at block 16. int8 (MatMul-only, block 32): plain -> k-quant ->
block size 16. fp16: as given.

With `maxBytes` (the artifact's byte budget, packed as it ships), a candidate larger than the budget does not pass
whatever its fidelity, and the budget's own candidate comes right after the variant's options: the mix of 4- and
8-bit projections that fits the budget with the least KL measured on the eval data (budgeting.py), so a budget
buys the fidelity it can before the ladder's fixed recipes are tried.

The search stops at the first candidate that passes, which the ladder's order makes the smallest one likely to
pass; with `tuneAll: true` every rung is built and the smallest passing candidate (by bytes) wins. A GGUF source
whose weights can be carried over (transcoding) puts that candidate before the ladder. Every candidate is
recorded (options, fidelity, size, passed, error) in the manifest's `search`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiri_runtime.compressing import searching
from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.lm import scoring
from kiri_runtime.manifests import Candidate, Gate, GateResult, LmFidelity, VariantSpec

# Options that steer measuring and tuning rather than the build.
TUNING_OPTIONS = ("greedyTokens", "tune", "tuneAll", "maxBytes")

LADDERS: dict[str, tuple[dict[str, Any], ...]] = {
    "int4": (
        {},
        {"algorithm": "k_quant"},
        {"int8LmHead": True},
        {"int8LmHead": True, "int8Embeddings": True},
        {"int8Layers": "first-last"},
        {"blockSize": 16},
        {"algorithm": "hqq"},
        {"algorithm": "k_quant", "int8LmHead": True, "int8Layers": "first-last"},
        {
            "algorithm": "hqq",
            "blockSize": 16,
            "int8LmHead": True,
            "int8Embeddings": True,
            "int8Layers": "first-last",
        },
    ),
    "int8": ({}, {"algorithm": "k_quant"}, {"blockSize": 16}),
    "fp16": ({},),
}
"""Each rung is laid over the variant's own options. Sizes on the tiny test model (hidden 128, vocab 512, untied;
lm/building.py): plain 597 kB, k_quant 605 kB, lm_head int8 630 kB, block 16 642 kB, HQQ 643 kB (fp32 1810 kB).
A rung that only adds int8Embeddings is skipped for models with untied embeddings (it changes nothing there)."""


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda v, t: v >= t,
    ">": lambda v, t: v > t,
    "<=": lambda v, t: v <= t,
    "<": lambda v, t: v < t,
}


def manifest_fidelity(f: scoring.LmFidelity) -> LmFidelity:
    return LmFidelity(**dataclasses.asdict(f))


def gate_value(gate: Gate, fid: LmFidelity) -> float | None:
    if gate.metric == "kl":
        return fid.kl_mean
    if gate.metric == "top1-agreement":
        return fid.top1_agreement
    if gate.metric == "perplexity":
        return fid.perplexity_ratio
    if gate.metric == "greedy-match":
        return fid.greedy_match
    return None  # a tensor metric: never passes (specs.resolve refuses it before any work)


def check_gates(gates: Sequence[Gate], fid: LmFidelity) -> list[GateResult]:
    out = []
    for g in gates:
        v = gate_value(g, fid)
        ok = v is not None and math.isfinite(v) and _OPS[g.op](v, g.threshold)
        out.append(GateResult(**g.model_dump(), value=v, passed=ok))
    return out


def margin(results: Sequence[GateResult]) -> float:
    """The worst gate's distance past its threshold (negative: short of it); ranks candidates that miss."""
    worst = math.inf
    for r in results:
        if r.value is None or not math.isfinite(r.value):
            return -math.inf
        worst = min(worst, r.value - r.threshold if r.op in (">=", ">") else r.threshold - r.value)
    return worst


def build_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options the builder sees: without the tuning ones and without nulls (unset, as the API sends)."""
    return {k: v for k, v in options.items() if k not in TUNING_OPTIONS and v is not None}


def rungs(
    spec: VariantSpec,
    first: Sequence[dict[str, Any]] = (),
    *,
    tied_embeddings: bool = True,
    budgeted: Later | None = None,
) -> list[Rung]:
    """The candidates' options in the order they are tried, duplicates dropped.

    `first`: candidates that come before the variant's own options (a GGUF's transcoding); `budgeted`: the
    budget's mix (maxBytes), tried right after the variant's own options, worked out only if the search gets
    there (it costs a sensitivity pass and a few builds; None from it: no mix fits, the rung is skipped).
    """
    base = build_options(spec.options)
    tune = spec.options.get("tune", True) is not False
    ladder = LADDERS.get(spec.method, ({},)) if tune else ({},)
    laid = [{**base, **r} for r in ladder]
    if not tied_embeddings and "int8Embeddings" not in base:
        laid = [{k: v for k, v in opts.items() if k != "int8Embeddings"} for opts in laid]
    out: list[Rung] = []
    for opts in [*first, *laid]:
        if opts not in out:
            out.append(opts)
    if budgeted is not None:
        out.insert(out.index(laid[0]) + 1, budgeted)
    return out


Attempt = Callable[[dict[str, Any]], "Outcome"]
Later = Callable[[], "dict[str, Any] | None"]
Rung = dict[str, Any] | Later


@dataclass
class Outcome:
    """What building and scoring one candidate gave: a directory (None: the build failed) and its facts."""

    path: Path | None
    fidelity: scoring.LmFidelity | None = None
    size_bytes: int | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Tried:
    candidate: Candidate
    outcome: Outcome
    gates: list[GateResult]


@dataclass
class Result:
    """The chosen candidate (the smallest that passed, else the best-scoring one), and all that were tried."""

    chosen: Tried
    path: Path | None
    tried: list[Tried]

    @property
    def accepted(self) -> bool:
        return self.path is not None

    def search(self) -> list[Candidate]:
        return [t.candidate for t in self.tried]


def search(
    spec: VariantSpec,
    candidates: Sequence[Rung],
    attempt: Attempt,
    *,
    log: Callable[[str], None] = lambda _: None,
) -> Result:
    """Try `candidates` in order until one passes (every one with `tuneAll`); keep the smallest that passed.
    A callable candidate is asked for its options when reached (skipped when it gives None or a repeat)."""
    tune_all = spec.options.get("tuneAll") is True
    max_bytes = spec.options.get("maxBytes")
    tried: list[Tried] = []
    for rung in candidates:
        opts = rung() if callable(rung) else rung
        if opts is None or any(t.candidate.options == opts for t in tried):
            continue
        try:
            out = attempt(opts)
        except CompressionError as e:
            out = Outcome(path=None, error=str(e))
        fid = manifest_fidelity(out.fidelity) if out.fidelity is not None else None
        gates = check_gates(spec.gate, fid) if fid is not None else []
        passed = out.path is not None and fid is not None and all(g.passed for g in gates)
        if max_bytes is not None and out.size_bytes is not None and out.size_bytes > max_bytes:
            passed = False
            out.error = out.error or over_budget(out.size_bytes, max_bytes)
        cand = Candidate(
            options=opts, generative=fid, size_bytes=out.size_bytes, passed=passed, error=out.error
        )
        tried.append(Tried(cand, out, gates))
        log(f"  {spec.name} {searching.short(opts)}: {describe(fid, out)}, {'PASS' if passed else 'miss'}")
        if passed and not tune_all:
            break
    if not tried:
        raise CompressionError(f"variant {spec.name}: no candidates to try")
    chosen, path = searching.pick(
        [(t, t.outcome.path) for t in tried],
        passed=lambda t: t.candidate.passed,
        key=lambda t: float(t.candidate.size_bytes if t.candidate.size_bytes is not None else math.inf),
        score=lambda t: margin(t.gates) if t.candidate.generative is not None else -math.inf,
    )
    return Result(chosen=chosen, path=path, tried=tried)


def over_budget(size: int, max_bytes: int) -> str:
    return f"{size} bytes, over maxBytes {max_bytes}"


def describe(fid: LmFidelity | None, out: Outcome) -> str:
    if fid is None:
        return f"failed: {out.error}"
    greedy = f", greedy {fid.greedy_match:.3f}" if fid.greedy_match is not None else ""
    return (
        f"kl {fid.kl_mean:.5f}, top1 {fid.top1_agreement:.4f}, ppl x{fid.perplexity_ratio:.4f}{greedy}, "
        f"{out.size_bytes} bytes"
    )


def reason(result: Result) -> str:
    """The manifest's reason: what passed (and how it was found), or the best seen and why it missed."""
    chosen = result.chosen
    described = ", ".join(
        f"{g.describe()} ({g.value:.5g})" if g.value is not None else g.describe() for g in chosen.gates
    )
    if result.accepted:
        n = len(result.tried)
        how = (
            "as given"
            if chosen is result.tried[0]
            else f"after auto-tune ({n} candidates, smallest passing chosen)"
        )
        return f"passed {described} {how}"
    if chosen.candidate.generative is None:
        return f"rejected: no candidate could be built ({chosen.candidate.error})"
    missed = ", ".join(
        [g.describe() for g in chosen.gates if not g.passed]
        + ([chosen.candidate.error] if chosen.candidate.error else [])
    )
    return (
        f"rejected: no candidate passed ({len(result.tried)} tried); best seen {described} "
        f"with options {searching.short(chosen.candidate.options)}; missed {missed}"
    )
