"""Continuous batching on CPU: one ONNX Runtime session of an onnxruntime-genai decoder, whose KV caches live in a
table of row slots that requests join and leave between decode steps.

Why not onnxruntime-genai's own batching (0.18, measured in docs/benchmarks.md): a `Generator` batches only
prompts appended together, cannot take a row later, and pads prompts of different lengths on the left, which
gave wrong logits on the padded rows (CPU GroupQueryAttention). Its `Engine` batches across requests, but its
continuous ("dynamic") batching needs a model built with PagedAttention, which the model builder allows only
for CUDA (fp16/bf16) and WebGPU; on a CPU model the `Engine` falls back to its static scheduler, which starts a
batch only when the previous one has finished (a request waits for the longest answer in the running batch).

What this does instead, on the same ONNX graph: GroupQueryAttention keeps each row's past in a shared
buffer [rows, kv_heads, length, head_size] and takes every row's own length from the attention mask
(`seqlens_k` = the row's ones minus one), writing the new token at that row's position and rotating it by that
position. So rows of any lengths decode in one forward pass when their masks are *right*-padded: row b has
ones for its own tokens and zeros after. Requests join by a prefill of their prompts (right-padded the same
way, which gives each row exactly what a batch of one gives) straight into the next free slots of the shared
buffers; a request leaves by the last row moving into its slot (its valid prefix copied), so the live rows are
always slots 0..n-1 and a step runs over exactly them.
Greedy tokens equal onnxruntime-genai's own greedy loop (tests/integration/runtime/test_runtime_generate.py).

The model must be a decoder with GroupQueryAttention and past/present buffers shared
(`past_present_share_buffer`), inputs `input_ids`, `attention_mask` and the past key/value names, on the CPU
provider: what onnxruntime-genai's model builder writes for `-e cpu`. `unsupported` says why another is not.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

GENAI_CONFIG = "genai_config.json"
_DTYPES = {1: np.float32, 10: np.float16}  # ONNX element types of the KV cache
_LENGTH_STEP = 64  # the buffers' length grows in these steps


def unsupported(model_dir: Path) -> str | None:
    """Why the model cannot be decoded here (then onnxruntime-genai's own loop serves it), or None."""
    try:
        genai = json.loads((model_dir / GENAI_CONFIG).read_text(encoding="utf-8"))
        model, search = genai["model"], genai.get("search", {})
        decoder = model["decoder"]
        inputs = decoder["inputs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {GENAI_CONFIG}: {e}"
    if model.get("vision") or model.get("speech") or model.get("embedding") or model.get("encoder"):
        return "not a plain decoder"
    if set(inputs) - {"input_ids", "attention_mask", "past_key_names", "past_value_names"}:
        return f"decoder inputs {sorted(inputs)} (only input_ids, attention_mask and the past KV are handled)"
    if not search.get("past_present_share_buffer", False):
        return "past and present KV buffers are not shared"
    if decoder.get("session_options", {}).get("provider_options"):
        return "an execution provider other than the CPU is configured"
    if "pipeline" in decoder or not decoder.get("filename"):
        return "a pipelined decoder"
    try:
        with (
            open(model_dir / decoder["filename"], "rb") as f,
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m,
        ):
            # An op type is a plain string in the serialized graph: no need for the onnx package (not a runtime
            # dependency) to find the attention operator.
            has_gqa = m.find(b"GroupQueryAttention") >= 0
    except (OSError, ValueError) as e:
        return f"unreadable decoder graph: {e}"
    if not has_gqa:
        return "no GroupQueryAttention (rows of different lengths need its per-row sequence lengths)"
    return None


class SlotDecoder:
    """Rows 0..`rows`-1 of the KV buffers are live; `prefill` adds rows, `step` decodes all, `release` drops one.

    Not thread-safe: one decode thread owns it."""

    def __init__(self, model_dir: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        genai = json.loads((model_dir / GENAI_CONFIG).read_text(encoding="utf-8"))["model"]
        decoder = genai["decoder"]
        self.layers = int(decoder["num_hidden_layers"])
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_size = int(decoder["head_size"])
        self.vocab_size = int(genai["vocab_size"])
        self.context_length = int(genai["context_length"])
        names = decoder["inputs"]
        outs = decoder["outputs"]
        self._past = [
            (names["past_key_names"] % i, names["past_value_names"] % i) for i in range(self.layers)
        ]
        self._present = [
            (outs["present_key_names"] % i, outs["present_value_names"] % i) for i in range(self.layers)
        ]
        self._input_ids, self._mask, self._logits = (
            names["input_ids"],
            names["attention_mask"],
            outs["logits"],
        )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(model_dir / decoder["filename"]), options, providers=["CPUExecutionProvider"]
        )
        kinds = {i.name: i.type for i in self.session.get_inputs()}
        past_type = kinds[self._past[0][0]]
        self.dtype: Any = np.float16 if "float16" in past_type else np.float32
        self._ids_dtype: Any = np.int32 if "int32" in kinds[self._input_ids] else np.int64
        self._mask_dtype: Any = np.int32 if "int32" in kinds[self._mask] else np.int64
        self.rows = 0
        self.lengths: list[int] = []  # tokens in each live row's cache
        self._keys: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._row_capacity = 0
        self._length_capacity = 0
        self._binding: Any = None
        self._binding_key: tuple[int, int] = (0, 0)
        self._step_logits = np.zeros((0, 1, self.vocab_size), np.float32)

    def reserve(self, rows: int, length: int) -> None:
        """Buffers for at least `rows` rows of `length` positions (grown, live rows copied; never shrunk)."""
        length = min(self.context_length, -(-length // _LENGTH_STEP) * _LENGTH_STEP)
        if rows <= self._row_capacity and length <= self._length_capacity:
            return
        if rows > self._row_capacity:
            rows = max(rows, 2 * self._row_capacity)  # doubling: a ramp to n rows copies log2(n) times
        rows = max(rows, self._row_capacity)
        length = max(length, self._length_capacity)
        shape = (rows, self.kv_heads, length, self.head_size)
        keys = [np.zeros(shape, self.dtype) for _ in range(self.layers)]
        values = [np.zeros(shape, self.dtype) for _ in range(self.layers)]
        for new, old in zip(keys + values, self._keys + self._values, strict=False):
            new[: self.rows, :, : old.shape[2]] = old[: self.rows]
        self._keys, self._values = keys, values
        self._row_capacity, self._length_capacity = rows, length
        self._step_logits = np.zeros((rows, 1, self.vocab_size), np.float32)
        self._binding = None

    def prefill(self, prompts: Sequence[Sequence[int]], lengths: Sequence[int]) -> np.ndarray:
        """Add a row per prompt (slots `rows`, `rows`+1, ...), room for `lengths[i]` positions each, in one
        forward pass; the logits after each prompt's last token, [len(prompts), vocab].

        Prompts of different lengths are right-padded (mask zeros after each prompt): GroupQueryAttention
        then computes each row as if alone (its logits and KV equal a batch of one, bitwise on the CPU), unlike
        onnxruntime-genai's left padding. The pad positions' KV is written but lies beyond the row's length,
        so it is never read and is overwritten by the row's next tokens."""
        if not prompts or not all(prompts):
            raise ValueError("an empty prompt")
        k, start = len(prompts), self.rows
        width = max(len(p) for p in prompts)
        self.reserve(start + k, max(max(lengths), width + 1))
        ids = np.zeros((k, width), dtype=self._ids_dtype)
        mask = np.zeros((k, width), dtype=self._mask_dtype)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
            mask[i, : len(p)] = 1
        binding = self.session.io_binding()
        binding.bind_cpu_input(self._input_ids, ids)
        binding.bind_cpu_input(self._mask, mask)
        binding.bind_output(self._logits, "cpu")
        self._bind_cache(binding, start, start + k)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        self.rows += k
        self.lengths.extend(len(p) for p in prompts)
        last = np.asarray([len(p) - 1 for p in prompts])
        return np.asarray(logits[np.arange(k), last], dtype=np.float32)

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        """One token for every live row (row i's input is tokens[i]); the logits, [rows, vocab]."""
        n = self.rows
        if len(tokens) != n:
            raise ValueError(f"{len(tokens)} tokens for {n} rows")
        need = max(self.lengths) + 1
        if need > self._length_capacity:
            self.reserve(n, need)
        mask = np.zeros((n, need), dtype=self._mask_dtype)
        for i, length in enumerate(self.lengths):
            mask[i, : length + 1] = 1
        if self._binding is None or self._binding_key != (n, self._length_capacity):
            binding = self.session.io_binding()
            self._bind_cache(binding, 0, n)
            logits = self._step_logits[:n]
            binding.bind_output(self._logits, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
            self._binding, self._binding_key = binding, (n, self._length_capacity)
        binding = self._binding
        binding.bind_cpu_input(self._input_ids, np.asarray(tokens, dtype=self._ids_dtype).reshape(n, 1))
        binding.bind_cpu_input(self._mask, mask)
        self.session.run_with_iobinding(binding)
        for i in range(n):
            self.lengths[i] += 1
        return self._step_logits[:n, 0]

    def release(self, slot: int) -> int | None:
        """Drop row `slot`: the last row moves into it. Returns the moved row's old slot, or None."""
        last = self.rows - 1
        if not 0 <= slot <= last:
            raise IndexError(f"no live row {slot}")
        moved = None
        if slot != last:
            n = self.lengths[last]
            for buffers in (self._keys, self._values):
                for b in buffers:
                    b[slot, :, :n] = b[last, :, :n]
            self.lengths[slot] = n
            moved = last
        self.lengths.pop()
        self.rows = last
        return moved

    def clear(self) -> None:
        self.rows = 0
        self.lengths.clear()

    def _bind_cache(self, binding: Any, start: int, stop: int) -> None:
        """Rows start..stop-1 of every layer's buffers as both past (in) and present (out): shared, no copy."""
        for (past_k, past_v), (present_k, present_v), k, v in zip(
            self._past, self._present, self._keys, self._values, strict=True
        ):
            for name_in, name_out, buffer in ((past_k, present_k, k), (past_v, present_v, v)):
                view = buffer[start:stop]
                shape, ptr = list(view.shape), view.ctypes.data
                binding.bind_input(name_in, "cpu", 0, self.dtype, shape, ptr)
                binding.bind_output(name_out, "cpu", 0, self.dtype, shape, ptr)


def prefill_groups(lengths: Sequence[int], waste: float = 0.5) -> list[list[int]]:
    """Indices of prompts (by `lengths`) grouped for batched prefills: shortest first, a group closed before
    its padding would exceed `waste` of its real tokens (one long prompt does not pad fifteen short ones)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        n = lengths[i]
        group = groups[-1] if groups else None
        if group is not None and n * (len(group) + 1) <= (1 + waste) * (real + n):
            group.append(i)
            real += n
        else:
            groups.append([i])
            real = n
    return groups


def sample(logits: np.ndarray, temperature: float, top_p: float, top_k: int, rng: np.random.Generator) -> int:
    """One token drawn from `logits` (one row): temperature, then top-k (0: none), then top-p (nucleus)."""
    scaled = logits.astype(np.float64) / max(temperature, 1e-6)
    if 0 < top_k < scaled.size:
        candidates = np.argpartition(-scaled, top_k - 1)[:top_k]
    else:
        candidates = np.arange(scaled.size)
    values = scaled[candidates]
    order = np.argsort(-values, kind="stable")
    candidates, values = candidates[order], values[order]
    probs = np.exp(values - values[0])
    probs /= probs.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
        candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
    return int(candidates[rng.choice(len(candidates), p=probs)])
