"""A federated round of a language model's LoRA adapter, for Kiri's ServerApp and ClientApp (`part = "adapter"`).

The global state is a peft adapter directory (`adapters.py`). Round 1 starts from `adapters.initial_adapter`
(A drawn from the round's `a-seed`, B zero: the base model's own output); each accepted round writes
`rounds/<NNNN>/adapter/` with the averaged factors. What is averaged, through Flower (SecAgg+, the DP wrapper):

* FFA-LoRA (`ffa = true`, the default): only every lora_B; A stays as drawn, equal on every site, so averaging B
  averages the sites' dense updates B·A exactly (Sun et al., ICLR 2024).
* FedAvg (`ffa = false`): every factor, A and B (the average of products is then not the product of averages).

With `serve-layout` (the served model's `lora.json`, as JSON: the operator reads it from the compression
manifest), an accepted round also writes `rounds/<NNNN>/adapter.onnx_adapter`, the adapter as the edge's
onnxruntime-genai loads it; an adapter that does not fit the served model is a skipped round, with the reason.

`perSite` (`keep_on_site`): the site trains on nine in ten of its documents, keeps its adapter in its keep
directory (`round-<NNNN>/`, and with `serve-layout` `round-<NNNN>.onnx_adapter`, which the SuperNode pod's
read-only store serves to the site's own edge pods), scores the tenth against the base, and answers with the
adapter's digest and those perplexities only; the next round starts from the site's last kept adapter.

Sites get the whole current adapter with the round (its bytes, checked against its sha256), train it on their
JSON Lines text with `adapters.train_adapter(init=..., freeze_a=ffa)`, and answer with the averaged factors only.
The upload is bounded by `adapters.MAX_FRACTION` of the base model's weight bytes.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiri_runtime.learning import adapters, rounds
from kiri_runtime.learning.errors import LearningError
from kiri_runtime.learning.settings import KEY_BASE, KEY_BASE_SHA

KEY_ADAPTER_CONFIG = "kiri.adapter-config"
KEY_A_SEED = "kiri.a-seed"
ADAPTER_DIR = "adapter"
SERVED_FILE = "adapter.onnx_adapter"


@dataclass(frozen=True)
class AdapterSettings:
    base_model: str  # the Hugging Face checkpoint directory both sides hold
    targets: tuple[str, ...]
    rank: int
    steps: int
    seq_len: int
    ffa: bool
    a_seed: int
    serve_layout: str = ""  # the served model's lora.json (JSON); empty: no .onnx_adapter is written

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> AdapterSettings:
        targets = tuple(
            t.strip() for t in str(config.get("adapter-targets", "q_proj,v_proj")).split(",") if t.strip()
        )
        out = cls(
            base_model=str(config.get("base-model", "")),
            targets=targets,
            rank=int(config.get("lora-rank", 4)),
            steps=int(config.get("adapter-steps", 50)),
            seq_len=int(config.get("adapter-seq-len", 64)),
            ffa=bool(config.get("ffa", True)),
            a_seed=int(config.get("a-seed", 0)),
            serve_layout=str(config.get("serve-layout", "")),
        )
        if not out.base_model:
            raise LearningError(
                "run config 'base-model' is required for part = adapter (a Hugging Face checkpoint)"
            )
        return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class AdapterSubject:
    """The server's side: the current global adapter, what a round sends, and what its aggregate becomes."""

    def __init__(self, a: AdapterSettings, weights: str, out: Path, eval_path: Path) -> None:
        self.a = a
        self.eval = eval_path
        self.base = Path(a.base_model)
        if weights:
            self.dir = Path(weights)
        else:
            self.dir = out / "initial-adapter"
            if not (self.dir / adapters.ADAPTER_WEIGHTS).exists():
                adapters.initial_adapter(self.base, self.dir, rank=a.rank, targets=a.targets, a_seed=a.a_seed)
        self.arrays = adapters.read_weights(self.dir)
        self.names = adapters.b_names(self.arrays) if a.ffa else sorted(self.arrays)
        self.base_sha256 = _sha256(self.dir / adapters.ADAPTER_WEIGHTS)

    def initial(self) -> list[np.ndarray]:
        return [self.arrays[n] for n in self.names]

    def fit_config(self) -> dict[str, Any]:
        return {
            KEY_BASE: (self.dir / adapters.ADAPTER_WEIGHTS).read_bytes(),
            KEY_BASE_SHA: self.base_sha256,
            KEY_ADAPTER_CONFIG: (self.dir / adapters.ADAPTER_CONFIG).read_text(),
            KEY_A_SEED: self.a.a_seed,
        }

    def evaluate(self, adapter_dir: Path | None = None) -> rounds.Evaluation:
        p = adapters.perplexity(self.base, self.eval, adapter_dir or self.dir, seq_len=self.a.seq_len)
        return rounds.Evaluation(loss=p.nll, accuracy=None, samples=p.tokens)

    def publish(
        self, aggregate: list[np.ndarray], round_dir: Path
    ) -> tuple[rounds.Evaluation, rounds.Evaluation, rounds.Artifact, rounds.Artifact | None] | str:
        """The new global adapter in `round_dir/adapter`, its held-out loss before and after, and with a
        `serve-layout` the `.onnx_adapter` the edge loads; or why not."""
        if any(not np.isfinite(a).all() for a in aggregate):
            return "the aggregated adapter has non-finite values: lower learning-rate"
        weights = dict(self.arrays)
        weights.update(
            {n: np.asarray(a, dtype=np.float32) for n, a in zip(self.names, aggregate, strict=True)}
        )
        target = round_dir / ADAPTER_DIR
        adapters.write_adapter(target, weights, like=self.dir)
        served = None
        if self.a.serve_layout:
            try:
                served = self.export(target, round_dir / SERVED_FILE)
            except LearningError as e:
                return f"the adapter does not fit the served model: {e}"
        before = self.evaluate()
        after = self.evaluate(target)
        path = target / adapters.ADAPTER_WEIGHTS
        return (
            before,
            after,
            rounds.Artifact(path=str(target), sha256=_sha256(path), bytes=path.stat().st_size),
            served,
        )

    def export(self, adapter_dir: Path, out_file: Path) -> rounds.Artifact:
        return export_served(self.a.serve_layout, adapter_dir, out_file)


def export_served(serve_layout: str, adapter_dir: Path, out_file: Path) -> rounds.Artifact:
    """The peft adapter as the edge's onnxruntime-genai loads it, for the served model's layout (lora.json)."""
    from kiri_runtime.learning.onnx_adapters import export_onnx_adapter
    from kiri_runtime.lora_layouts import LayoutError, LoraLayout

    try:
        layout = LoraLayout.from_json(json.loads(serve_layout))
    except (LayoutError, ValueError) as e:
        raise LearningError(f"run config 'serve-layout': {e}") from None
    size = export_onnx_adapter(adapter_dir, layout, out_file)
    return rounds.Artifact(path=str(out_file), sha256=_sha256(out_file), bytes=size)


HELD_OUT_EVERY = 10  # perSite: one document in ten is the site's own held-out text


def split_site_text(data: Path, work_dir: Path) -> tuple[Path, Path]:
    """(train, held-out) JSON Lines from the site's file: every tenth non-empty line held out (at least one)."""
    lines = [line for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < 2:
        raise LearningError(f"site data {data} needs at least two documents (one is held out)")
    if len(lines) < HELD_OUT_EVERY:
        train, held = lines[:-1], lines[-1:]
    else:
        train = [line for i, line in enumerate(lines) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
        held = [line for i, line in enumerate(lines) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    work_dir.mkdir(parents=True, exist_ok=True)
    train_path, held_path = work_dir / "site-train.jsonl", work_dir / "site-held-out.jsonl"
    train_path.write_text("".join(f"{line}\n" for line in train), encoding="utf-8")
    held_path.write_text("".join(f"{line}\n" for line in held), encoding="utf-8")
    return train_path, held_path


def last_kept(keep_dir: Path) -> Path | None:
    """The site's newest kept adapter directory (`round-<NNNN>`), if any."""
    kept = sorted(p for p in keep_dir.glob("round-[0-9][0-9][0-9][0-9]") if p.is_dir())
    return kept[-1] if kept else None


def keep_on_site(
    a: AdapterSettings, trained: Path, keep_dir: Path, number: int, held_out: Path, base_model: str
) -> dict[str, Any]:
    """`perSite`: keep the trained adapter on the site, write the form the edge loads, and measure it on the
    site's held-out text. Returns the metrics that leave the site (digests and perplexities, no weights)."""
    keep = keep_dir / f"round-{number:04d}"
    keep.parent.mkdir(parents=True, exist_ok=True)
    if keep.exists():
        import shutil

        shutil.rmtree(keep)  # a retried round replaces what its failed attempt kept
    trained.replace(keep)
    base = adapters.perplexity(Path(base_model), held_out, seq_len=a.seq_len)
    mine = adapters.perplexity(Path(base_model), held_out, keep, seq_len=a.seq_len)
    metrics: dict[str, Any] = {"heldout-base-ppl": base.perplexity, "heldout-adapter-ppl": mine.perplexity}
    if a.serve_layout:
        served = export_served(a.serve_layout, keep, keep_dir / f"round-{number:04d}.onnx_adapter")
        metrics.update(
            {
                "adapter-file": Path(served.path).name,
                "adapter-sha256": served.sha256,
                "adapter-bytes": served.bytes,
            }
        )
    return metrics


def train_on_site(
    a: AdapterSettings,
    config: dict[str, Any],
    parameters: list[np.ndarray],
    data: Path,
    work_dir: Path,
    base_model: str,
    *,
    seed: int,
    learning_rate: float,
    batch_size: int,
    kept: Path | None = None,
) -> tuple[list[np.ndarray], dict[str, Any], Path]:
    """The site's side: the round's adapter (checked), trained on the site's text; the averaged factors back.
    A perSite round sends no factors: the site starts from its own `kept` adapter, else the round's."""
    data_bytes, sha = config.get(KEY_BASE), str(config.get(KEY_BASE_SHA, ""))
    if not isinstance(data_bytes, bytes) or hashlib.sha256(data_bytes).hexdigest() != sha:
        raise LearningError("the round's adapter does not match its sha256; refusing to train")
    start = work_dir / f"adapter-{sha[:16]}"
    start.mkdir(parents=True, exist_ok=True)
    (start / adapters.ADAPTER_WEIGHTS).write_bytes(data_bytes)
    (start / adapters.ADAPTER_CONFIG).write_text(str(config.get(KEY_ADAPTER_CONFIG, "{}")))
    init = adapters.read_weights(start)
    names = adapters.b_names(init) if a.ffa else sorted(init)
    if parameters:
        if len(names) != len(parameters):
            raise LearningError(
                f"the round sent {len(parameters)} tensors, this adapter averages {len(names)}"
            )
        init.update({n: np.asarray(p, dtype=np.float32) for n, p in zip(names, parameters, strict=True)})
    elif kept is not None:
        init = adapters.read_weights(kept)
    rank = int(json.loads((start / adapters.ADAPTER_CONFIG).read_text()).get("r", a.rank))
    out = Path(tempfile.mkdtemp(prefix="trained-", dir=work_dir))
    result = adapters.train_adapter(
        Path(base_model),
        data,
        out,
        rank=rank,
        steps=a.steps,
        seed=seed,
        targets=a.targets,
        learning_rate=learning_rate,
        batch_size=batch_size,
        seq_len=a.seq_len,
        a_seed=int(str(config.get(KEY_A_SEED, a.a_seed))),
        freeze_a=a.ffa,
        init=init,
    )
    trained = adapters.read_weights(out)
    metrics = {
        "samples": result.windows,
        "loss-before": result.loss_before,
        "loss-after": result.loss_after,
        "adapter-bytes": result.adapter_bytes,
    }
    return [trained[n] for n in names], metrics, out
