"""The edge's side of one collaborative request (collaborating.py): its context on the edge model, kept across
rounds (`EdgeSession`), a token choice (`pick`), and the answer's text as tokens arrive from either tier
(`Emitter`: the decode scheduler's stop rules)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kiri_runtime.collaborations import sampling_probs
from kiri_runtime.generating import Delta, _cut_at_stop, _held_back
from kiri_runtime.generative_model import GenerativeModel, SamplingParams


class EdgeSession:
    """One request's context on the edge model, kept across rounds: a Generator fed by `append_tokens` only."""

    def __init__(self, model: GenerativeModel, prompt: Sequence[int], max_length: int) -> None:
        og = model.og
        gp = og.GeneratorParams(model.model)
        gp.set_search_options(max_length=max_length, do_sample=False)
        self.generator = og.Generator(model.model, gp)
        self.length = 0
        self.logits = np.zeros(0, dtype=np.float32)
        self.append(prompt)

    def append(self, tokens: Sequence[int]) -> None:
        self.generator.append_tokens(np.asarray(tokens, dtype=np.int32))
        self.length += len(tokens)
        self.logits = np.asarray(self.generator.get_logits(), dtype=np.float32).reshape(-1)

    def rewind(self, keep: int) -> None:
        """Drop everything after `keep` tokens (the logits go stale: append before reading them)."""
        if keep < self.length:
            self.generator.rewind_to(keep)
            self.length = keep

    def replace_tail(self, keep: int, tokens: Sequence[int]) -> None:
        """Drop everything after `keep` tokens (rejected drafts), then append `tokens`."""
        if keep < self.length:
            self.generator.rewind_to(keep)
            self.length = keep
        self.append(tokens)


def pick(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator
) -> tuple[int, np.ndarray | None]:
    if params.greedy:
        return int(np.argmax(logits)), None
    p = sampling_probs(logits, params)
    return int(rng.choice(p.size, p=p)), p


class Emitter:
    """Turns tokens into the answer's text the way the decode scheduler does: eos and stop tokens end it, stop
    strings cut it (text that may start one is held back), max_tokens ends it."""

    def __init__(self, model: GenerativeModel, params: SamplingParams, prompt_tokens: int) -> None:
        self.model = model
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.stream = model.tokenizer.create_stream()
        self.pending = ""
        self.generated = 0
        self.done = False

    def feed(self, tokens: Sequence[int]) -> tuple[Delta, int]:
        """The delta for `tokens`, and how many of them the answer kept (it may end partway)."""
        delta = Delta()
        used = 0
        for token in tokens:
            if self.done:
                break
            used += 1
            self.generated += 1
            if token in self.model.eos_token_ids or token in self.params.stop_token_ids:
                delta.text += self.pending
                self.pending = ""
                self._finish(
                    delta, "stop", "eos_token" if token in self.model.eos_token_ids else "stop_token"
                )
                break
            delta.token_ids.append(token)
            self.pending += self.stream.decode(token)
            text, stopped = _cut_at_stop(self.pending, self.params.stop)
            if stopped:
                delta.text += text
                self.pending = ""
                self._finish(delta, "stop", "stop_sequence")
                break
            hold = _held_back(text, self.params.stop)
            delta.text += text[: len(text) - hold]
            self.pending = text[len(text) - hold :]
            if self.generated >= self.params.max_tokens:
                delta.text += self.pending
                self.pending = ""
                self._finish(delta, "length", "length")
        return delta, used

    def finish_now(self, delta: Delta) -> None:
        """The cloud said it is done (length or a stop string it matched): end here."""
        if not self.done:
            delta.text += self.pending
            self.pending = ""
            self._finish(delta, "length", "length")

    def _finish(self, delta: Delta, finish: str, why: str) -> None:
        self.done = True
        delta.finish_reason, delta.stop_reason = finish, why
        delta.prompt_tokens, delta.completion_tokens = self.prompt_tokens, self.generated
