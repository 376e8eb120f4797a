"""Try candidates of one variant, keep the fastest that passes its gates: the search every variant runs.

A quantized variant tries option sets (`quantizing.tuned_variant`); a distilled one tries its student with and
without int8 (`distilling.distilled_variant`). Each candidate is judged the same way (fidelity against the fp32
reference outputs, the gates, latency against fp32, size), the choice is the same (the fastest that passes;
when none does, the best-scoring one is reported and nothing ships), and so is the manifest entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from kiri_runtime.compressing import evaluating, exporting
from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.evaluating import EvalSet
from kiri_runtime.manifests import Candidate, Fidelity, Latency, Variant, VariantSpec

if TYPE_CHECKING:
    from kiri_runtime.compressing.exporting import TorchModel


@dataclass
class Context:
    """What building and judging the variants of one run needs: the verified fp32 model and its outputs."""

    work: Path
    fp32: Path
    int8_src: Path  # the fp32 model with Gemm rewritten as MatMul, what the int8 builds start from
    evalset: EvalSet
    reference: list[np.ndarray[Any, Any]]
    classifier: bool
    log: Callable[[str], None]
    torch_model: TorchModel | None
    output_names: list[str]
    threads: int = 1
    latency_rounds: int = 60
    seed: int = 0
    atol: float = 1e-4
    rtol: float = 1e-3
    counter: int = 0

    def scratch(self, stem: str) -> Path:
        self.counter += 1
        return self.work / f"{stem}-{self.counter}.onnx"


def size(path: Path) -> int:
    return path.stat().st_size


def measure(ctx: Context, path: Path, rounds: int) -> Latency:
    base, var = evaluating.latencies([ctx.fp32, path], ctx.evalset, threads=ctx.threads, rounds=rounds)
    return Latency(p50_ms=round(var, 4), ratio_vs_fp32=round(var / base, 4))


def short(options: dict[str, Any]) -> str:
    shown = {
        k: (f"[{len(v)} nodes]" if k == "excludeNodes" and len(v) > 3 else v) for k, v in options.items()
    }
    return str(shown)


def score(spec: VariantSpec, cand: Candidate) -> float:
    """How far past its gates a candidate is (negative: short of them); what ranks candidates that miss."""
    if cand.fidelity is None:
        return -math.inf
    return evaluating.margin(evaluating.check_gates(spec.gate, cand.fidelity))


def fidelity(ctx: Context, path: Path, evalset: EvalSet, reference: list[np.ndarray[Any, Any]]) -> Fidelity:
    """How close the model at `path` comes to the fp32 `reference` outputs on `evalset`."""
    got = evaluating.run(evaluating.session(path, threads=ctx.threads), evalset)
    return evaluating.fidelity(reference, got, classifier=ctx.classifier)


C = TypeVar("C")
P = TypeVar("P")


def pick(
    tried: Sequence[tuple[C, P | None]],
    *,
    passed: Callable[[C], bool],
    key: Callable[[C], float],
    score: Callable[[C], float],
) -> tuple[C, P | None]:
    """The choice every search makes: among the candidates that passed (and built a file), the one with the
    lowest `key` (the fastest for tensor models, the smallest for language models; the first of equals); when
    none passed, the best-`score` one with no file, so nothing ships."""
    passing = [(c, p) for c, p in tried if passed(c) and p is not None]
    if passing:
        return min(passing, key=lambda cp: key(cp[0]))
    return max(tried, key=lambda cp: score(cp[0]))[0], None


class Search:
    """The candidates one variant tried, in order, each with the file it built (None: the build failed)."""

    def __init__(self, ctx: Context, spec: VariantSpec) -> None:
        self.ctx = ctx
        self.spec = spec
        self.tried: list[tuple[Candidate, Path | None]] = []

    def judge(self, options: dict[str, Any], path: Path, fid: Fidelity) -> tuple[Candidate, Latency]:
        """Gates, latency and size of the built model at `path`, kept as a candidate of this search."""
        passed = all(r.passed for r in evaluating.check_gates(self.spec.gate, fid))
        lat = measure(self.ctx, path, max(20, self.ctx.latency_rounds // 2))
        cand = Candidate(options=options, fidelity=fid, latency=lat, size_bytes=size(path), passed=passed)
        self.tried.append((cand, path))
        return cand, lat

    def known(self, options: dict[str, Any]) -> Candidate | None:
        return next((c for c, _ in self.tried if c.options == options), None)

    def attempt(self, options: dict[str, Any], build: Callable[[Path], None]) -> Candidate:
        """Build into a scratch file and judge it on the eval set; a build that fails is a failed candidate."""
        ctx, spec = self.ctx, self.spec
        path = ctx.scratch(spec.name)
        try:
            build(path)
            fid = fidelity(ctx, path, ctx.evalset, ctx.reference)
        except CompressionError as e:
            ctx.log(f"  {spec.name} {options}: failed: {e}")
            cand = Candidate(options=options, passed=False, error=str(e))
            self.tried.append((cand, None))
            return cand
        cand, lat = self.judge(options, path, fid)
        ctx.log(
            f"  {spec.name} {short(options)}: cosine min {fid.cosine.min:.5f} mean {fid.cosine.mean:.5f}, "
            f"latency x{lat.ratio_vs_fp32:.2f} vs fp32, {'PASS' if cand.passed else 'miss'}"
        )
        return cand

    def passed(self) -> bool:
        return any(c.passed for c, _ in self.tried)

    def best(self) -> Candidate:
        """The best-scoring candidate (the first of equals): where tuning goes on from when none passed."""
        return max((c for c, _ in self.tried), key=lambda c: score(self.spec, c))

    def finish(self, extra: dict[str, Any]) -> tuple[Variant, Path | None]:
        """The manifest entry and, when a candidate passed, the file to ship: the fastest that passed.

        Every other candidate's file is deleted.
        """
        chosen, path = pick(
            self.tried,
            passed=lambda c: c.passed,
            key=lambda c: c.latency.ratio_vs_fp32 if c.latency else math.inf,
            score=lambda c: score(self.spec, c),
        )
        for _, p in self.tried:
            if p is not None and p != path:
                p.unlink(missing_ok=True)
        return self._variant(chosen, path, extra), path

    def _variant(self, chosen: Candidate, path: Path | None, extra: dict[str, Any]) -> Variant:
        ctx, spec = self.ctx, self.spec
        tried = [c for c, _ in self.tried]
        gates = evaluating.check_gates(spec.gate, chosen.fidelity) if chosen.fidelity else []
        described = ", ".join(
            f"{g.describe()} ({g.value:.5g})" if g.value is not None else g.describe() for g in gates
        )
        if path is not None:
            latency = measure(ctx, path, ctx.latency_rounds)
            how = (
                "as given"
                if chosen is tried[0]
                else f"after auto-tune ({len(tried)} candidates, fastest passing chosen)"
            )
            return Variant(
                name=spec.name,
                method=spec.method,
                options=chosen.options,
                uri=f"{spec.name}.onnx",
                sha256=exporting.sha256_file(path),
                size_bytes=size(path),
                size_ratio_vs_fp32=round(size(path) / size(ctx.fp32), 4),
                fidelity=chosen.fidelity,
                latency=latency,
                gate=gates,
                accepted=True,
                reason=f"passed {described} {how}",
                search=tried,
                extra=extra,
            )
        if chosen.fidelity is None:
            reason = f"rejected: no candidate could be built ({chosen.error})"
        else:
            reason = (
                f"rejected: no candidate passed; best seen {described} with options {short(chosen.options)}"
            )
        return Variant(
            name=spec.name,
            method=spec.method,
            options=chosen.options,
            size_bytes=chosen.size_bytes,
            fidelity=chosen.fidelity,
            latency=chosen.latency,
            gate=gates,
            accepted=False,
            reason=reason,
            search=tried,
            extra=extra,
        )
