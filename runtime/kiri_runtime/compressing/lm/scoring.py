"""How close a variant comes to the full model, and how fast it decodes.

The **reference** is the source checkpoint under Hugging Face transformers: fp32, eager attention, no grad.
A variant directory runs under onnxruntime-genai, as it will on a node. Both are **teacher-forced** on every
eval sample: the sample's tokens go in, and position i's logits predict token i+1, so a sample of L tokens
gives L-1 predicted positions. Over all predicted positions of all samples (each position weighs the same):

* `kl_mean`: mean KL(full || variant) = sum_v p(v) (log p(v) - log q(v)) of the two next-token distributions, in nats;
* `top1_agreement`: share of positions where both models' most likely next token is the same;
* `perplexity_ratio`: variant perplexity / full perplexity on the samples' own next tokens, i.e.
  exp(mean NLL_variant - mean NLL_full);
* `greedy_match`: per sample, the **prefix** is its first max(1, L // 2) tokens (less if prefix + N would pass
  the context); both models continue it greedily for N tokens, end-of-sequence included (no early stop), and
  the sample scores the share of the N positions where the two tokens are equal. The mean over samples.

Decode speed: greedy generation under onnxruntime-genai with a fixed number of new tokens (end of sequence
suppressed). TTFT is the time from handing over the prompt to having the first generated token; decode
tokens/s counts the other new tokens over their wall time. The median of a few runs after one warm-up.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiri_runtime.compressing.errors import CompressionError

FloatArray = np.ndarray[Any, np.dtype[np.floating[Any]]]


class Reference:
    """The full model under HF transformers (fp32, eager attention), with logits cached per sample."""

    def __init__(self, hf_dir: Path, threads: int = 1) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(max(1, threads))
        try:
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(hf_dir), dtype=torch.float32, attn_implementation="eager"
            )
        except Exception as e:
            raise CompressionError(
                f"cannot load the full model from {hf_dir} with transformers: {e}"
            ) from None
        self._model = model.eval()
        self._logits: dict[tuple[int, ...], FloatArray] = {}
        self._greedy: dict[tuple[tuple[int, ...], int], list[int]] = {}

    @property
    def model(self) -> Any:
        """The torch model itself (budgeting.py rounds one projection at a time in it, then restores it)."""
        return self._model

    def logits(self, ids: Sequence[int]) -> FloatArray:
        """[len(ids), vocab] float32: position i's next-token logits."""
        key = tuple(ids)
        if key not in self._logits:
            import torch

            with torch.no_grad():
                out = self._model(torch.tensor([list(ids)], dtype=torch.long))
            self._logits[key] = out.logits[0].float().numpy()
        return self._logits[key]

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        """The first n greedy tokens after `ids` (end of sequence does not stop it)."""
        key = (tuple(ids), n)
        if key not in self._greedy:
            import torch

            out: list[int] = []
            with torch.no_grad():
                step = self._model(torch.tensor([list(ids)], dtype=torch.long), use_cache=True)
                for i in range(n):
                    tok = int(step.logits[0, -1].argmax())
                    out.append(tok)
                    if i + 1 < n:
                        step = self._model(
                            torch.tensor([[tok]], dtype=torch.long), use_cache=True, **_cache_of(step)
                        )
            self._greedy[key] = out
        return self._greedy[key]


def _cache_of(step: Any) -> dict[str, Any]:
    """The KV cache of a forward's output under the keyword the model takes (transformers 5: `cache`)."""
    if "cache" in step:
        return {"cache": step["cache"]}
    return {"past_key_values": step["past_key_values"]}


@dataclass(frozen=True)
class LmFidelity:
    kl_mean: float
    top1_agreement: float
    perplexity_ratio: float
    greedy_match: float | None
    positions: int
    samples: int = 0
    greedy_tokens: int = 0


@dataclass
class Tally:
    """Sums over predicted positions; `add` one sample's logits at a time, `result` at the end."""

    kl: float = 0.0
    agree: int = 0
    nll_full: float = 0.0
    nll_variant: float = 0.0
    positions: int = 0
    samples: int = 0

    def add(self, full: FloatArray, variant: FloatArray, ids: Sequence[int]) -> None:
        """`full`/`variant`: [len(ids), vocab] logits of one sample; rows 0..L-2 predict ids[1..L-1]."""
        n = len(ids) - 1
        if full.shape != variant.shape or full.shape[0] < n + 1:
            raise CompressionError(
                f"variant logits {variant.shape} do not match the full model's {full.shape}"
            )
        p = _log_softmax(full[:n])
        q = _log_softmax(variant[:n])
        targets = np.asarray(ids[1:], dtype=np.int64)
        rows = np.arange(n)
        with np.errstate(invalid="ignore", over="ignore"):
            self.kl += float((np.exp(p) * (p - q)).sum())
        self.agree += int((full[:n].argmax(axis=1) == variant[:n].argmax(axis=1)).sum())
        self.nll_full -= float(p[rows, targets].sum())
        self.nll_variant -= float(q[rows, targets].sum())
        self.positions += n
        self.samples += 1

    def result(self, greedy_match: float | None = None, greedy_tokens: int = 0) -> LmFidelity:
        if self.positions == 0:
            raise CompressionError("no predicted positions: every eval sample needs at least 2 tokens")
        kl = self.kl / self.positions
        ratio = math.exp(min((self.nll_variant - self.nll_full) / self.positions, 700.0))
        return LmFidelity(
            kl_mean=_finite(kl),
            top1_agreement=self.agree / self.positions,
            perplexity_ratio=_finite(ratio),
            greedy_match=greedy_match,
            positions=self.positions,
            samples=self.samples,
            greedy_tokens=greedy_tokens,
        )


def _finite(x: float) -> float:
    """A broken variant's NaN/inf is as bad as it gets; JSON has no infinity, so cap at the largest float."""
    return x if math.isfinite(x) else sys.float_info.max


def _log_softmax(logits: FloatArray) -> FloatArray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    out: FloatArray = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return out


def greedy_prefix(n_ids: int, n_new: int, context: int) -> int:
    """How many of a sample's tokens the greedy-match continuation starts from (see the module docstring)."""
    return max(1, min(n_ids // 2, context - n_new))


def match_share(full: Sequence[int], variant: Sequence[int]) -> float:
    n = len(full)
    return sum(a == b for a, b in zip(full, variant, strict=True)) / n if n else 1.0


# --- the variant under onnxruntime-genai -------------------------------------------------------------------


def load_model(model_dir: Path, threads: int = 1) -> Any:
    import onnxruntime_genai as og

    try:
        cfg = og.Config(str(model_dir))
        cfg.overlay(
            json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": max(1, threads)}}}})
        )
        return og.Model(cfg)
    except Exception as e:
        raise CompressionError(f"onnxruntime-genai cannot load {model_dir.name}: {e}") from None


def context_length(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    return int(cfg["model"]["context_length"])


def _generator(model: Any, max_length: int, min_length: int = 0) -> Any:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, min_length=min_length, do_sample=False)
    return og.Generator(model, params)


@contextlib.contextmanager
def _genai(what: str) -> Iterator[None]:
    """onnxruntime-genai's failures (RuntimeError with a multi-line ORT message) as one CompressionError line."""
    try:
        yield
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompressionError(f"onnxruntime-genai failed {what}: {first[:300]}") from None


def variant_logits(model: Any, ids: Sequence[int]) -> FloatArray:
    """[len(ids), vocab]: one teacher-forced pass."""
    with _genai("scoring the eval data"):
        g = _generator(model, len(ids))
        g.append_tokens(list(ids))
        out: FloatArray = np.asarray(g.get_output("logits"), dtype=np.float32)[0]
    return out


def variant_greedy(model: Any, ids: Sequence[int], n: int) -> list[int]:
    out: list[int] = []
    with _genai("decoding greedily"):
        g = _generator(model, len(ids) + n)
        g.append_tokens(list(ids))
        for i in range(n):
            logits = np.asarray(g.get_logits())
            tok = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
            out.append(tok)
            if i + 1 < n:
                g.append_tokens([tok])
    return out


def fidelity(
    ref: Reference,
    model_dir: Path,
    samples: Sequence[Sequence[int]],
    greedy_tokens: int = 0,
    *,
    threads: int = 1,
    model: Any = None,
) -> LmFidelity:
    """The variant at `model_dir` against the reference on `samples` (token ids), teacher-forced."""
    model = model if model is not None else load_model(model_dir, threads)
    tally = Tally()
    for ids in samples:
        tally.add(ref.logits(ids), variant_logits(model, ids), ids)
    greedy = None
    if greedy_tokens > 0:
        ctx = context_length(model_dir)
        shares = []
        for ids in samples:
            prefix = list(ids[: greedy_prefix(len(ids), greedy_tokens, ctx)])
            shares.append(
                match_share(ref.greedy(prefix, greedy_tokens), variant_greedy(model, prefix, greedy_tokens))
            )
        greedy = float(np.mean(shares))
    return tally.result(greedy, greedy_tokens)


@dataclass(frozen=True)
class DecodeSpeed:
    decode_tokens_per_s: float
    ttft_ms: float
    new_tokens: int
    prompt_tokens: int = 0
    threads: int = 1


def decode_speed(
    model_dir: Path, prompt: Sequence[int], new_tokens: int = 64, *, threads: int = 1, rounds: int = 3
) -> DecodeSpeed:
    """Greedy decoding under onnxruntime-genai: TTFT and tokens/s after the first token (median of `rounds`)."""
    if new_tokens < 2:
        raise CompressionError("decode speed needs at least 2 new tokens")
    model = load_model(model_dir, threads)
    total = min(len(prompt) + new_tokens, context_length(model_dir))
    prompt = list(prompt[: total - new_tokens]) or [0]
    n_new = total - len(prompt)
    ttfts: list[float] = []
    rates: list[float] = []
    for r in range(rounds + 1):  # round 0 warms up
        with _genai("measuring decode speed"):
            t0, t1, t2, steps = _timed_decode(model, prompt, total, n_new)
        if r:
            ttfts.append((t1 - t0) * 1000)
            rates.append((steps - 1) / max(t2 - t1, 1e-9))
    return DecodeSpeed(
        decode_tokens_per_s=round(statistics.median(rates), 2),
        ttft_ms=round(statistics.median(ttfts), 3),
        new_tokens=n_new,
        prompt_tokens=len(prompt),
        threads=threads,
    )


def _timed_decode(model: Any, prompt: list[int], total: int, n_new: int) -> tuple[float, float, float, int]:
    g = _generator(model, total, total)
    t0 = time.perf_counter()
    g.append_tokens(prompt)
    g.generate_next_token()
    _ = g.get_next_tokens()
    t1 = time.perf_counter()
    steps = 1
    while not g.is_done() and steps < n_new:
        g.generate_next_token()
        _ = g.get_next_tokens()
        steps += 1
    return t0, t1, time.perf_counter(), steps
