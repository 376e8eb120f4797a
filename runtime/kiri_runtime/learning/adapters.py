"""LoRA adapters for a causal language model: trained on one site's text, read and written as named arrays, and
judged by held-out perplexity. This is the trainer that `kiri train-adapter` and Flower's ClientApp call; only the
adapter (`adapter_model.safetensors`, a few kilobytes to megabytes) ever leaves the site.

The base model is a Hugging Face checkpoint directory (config.json, weights, tokenizer with its chat template);
the adapter is peft's own layout (adapter_config.json + adapter_model.safetensors), so peft, transformers and
onnxruntime-genai's model builder (`adapter_path`) all read it (adapter_files.py). Site text is JSON Lines
(site_texts.py), packed into windows of `seq_len` tokens; training draws windows at random (seeded), the loss covers
every token. The form `kiri serve` loads is onnx_adapters.py's.

Named arrays (`read_weights`, `write_adapter`): peft's tensor names as stored, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ([rank, in]) and `...lora_B.weight`
([out, rank]); the effective update of that Linear is (alpha / rank) * B @ A. FedAvg averages both factors;
FFA-LoRA (`freeze_a=True`) keeps every A at the value drawn from `a_seed`, equal on every site, and trains
only B, so averaging B (`b_names`) averages the dense updates exactly.

The upload is bounded: `max_fraction` (default 1 %) of the base model's weight bytes; a rank or target set that
would exceed it is refused before any training, with the sizes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiri_runtime.learning.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    a_names,
    b_names,
    check_names,
    read_config,
    read_weights,
    sha256_file,
    write_adapter,
)
from kiri_runtime.learning.errors import LearningError
from kiri_runtime.learning.site_texts import chat_renderer, load_documents, token_stream, tokenizer, windows

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterResult",
    "AdapterSettings",
    "Perplexity",
    "a_names",
    "b_names",
    "get_weights",
    "initial_adapter",
    "load_documents",
    "perplexity",
    "read_config",
    "read_weights",
    "set_weights",
    "train_adapter",
    "write_adapter",
]

if TYPE_CHECKING:
    import torch

# Every attention and MLP projection of a LLaMA-family decoder (what QLoRA adapts); `DEFAULT_TARGETS` is the
# subset trained unless told otherwise (see docs/learning.md, "Adapters": measured on the tiny LLaMA).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ("q_proj", "v_proj")
MAX_FRACTION = 0.01
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class AdapterSettings:
    """What to train and how. `alpha` None: 2 x rank (scaling 2, peft's common choice)."""

    rank: int = 8
    alpha: int | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 100
    learning_rate: float = 3e-3
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    # Seeds every lora_A; sites of one federation share it, so FFA-LoRA's frozen A is the same everywhere.
    a_seed: int = 0
    freeze_a: bool = False
    max_fraction: float = MAX_FRACTION
    threads: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= 1024:
            raise LearningError(f"LoRA rank {self.rank} is out of range [1, 1024]")
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 2:
            raise LearningError(
                f"need steps >= 0, batch size >= 1, seq_len >= 2 (got {self.steps}, {self.batch_size}, "
                f"{self.seq_len})"
            )
        if not self.learning_rate > 0:
            raise LearningError(f"learning rate must be > 0, got {self.learning_rate}")
        if not self.targets:
            raise LearningError("no target modules: name at least one projection, e.g. q_proj")
        if not 0 < self.max_fraction <= 1:
            raise LearningError(f"max_fraction must be in (0, 1], got {self.max_fraction}")

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.rank


@dataclass
class AdapterResult:
    """A trained adapter on disk and what it cost."""

    adapter_dir: Path
    adapter_bytes: int  # the size of adapter_model.safetensors: what is uploaded
    base_bytes: int  # the base checkpoint's weight files
    sha256: str  # of adapter_model.safetensors
    tokens: int  # site tokens in the packed stream
    windows: int
    steps: int
    loss_before: float  # mean loss on the site's windows with the adapter's starting weights
    loss_after: float
    names: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.adapter_bytes / self.base_bytes if self.base_bytes else math.inf


@dataclass(frozen=True)
class Perplexity:
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


# --------------------------------------------------------------------------------------------- model


def base_weight_bytes(base: Path) -> int:
    """The bytes of the base checkpoint's weight files (what 'the base model's bytes' means for the budget)."""
    if not base.is_dir():
        raise LearningError(f"base model {base} is not a directory")
    total = sum(
        p.stat().st_size
        for p in base.iterdir()
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("adapter_")
    )
    if not total:
        raise LearningError(f"base model {base} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return total


def _load_base(base: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    except Exception as e:
        raise LearningError(f"{base}: not a causal LM checkpoint: {type(e).__name__}: {e}") from None
    model.config.use_cache = False
    return model


def _target_linears(model: Any, targets: Sequence[str]) -> dict[str, Any]:
    import torch

    found = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] in targets
    }
    missing = sorted(set(targets) - {n.rpartition(".")[2] for n in found})
    if missing:
        raise LearningError(f"target modules {missing} are not Linear layers of this model")
    return found


def planned_bytes(model: Any, settings: AdapterSettings) -> int:
    """float32 bytes of the adapter's tensors: rank x (in + out) per targeted Linear."""
    linears = _target_linears(model, settings.targets)
    return sum(4 * settings.rank * (m.in_features + m.out_features) for m in linears.values())


def _check_budget(adapter_bytes: int, base_bytes: int, settings: AdapterSettings) -> None:
    limit = settings.max_fraction * base_bytes
    if adapter_bytes > limit:
        raise LearningError(
            f"a rank-{settings.rank} adapter on {','.join(settings.targets)} is {adapter_bytes} bytes, "
            f"{100 * adapter_bytes / base_bytes:.2f}% of the base's {base_bytes}; the limit is "
            f"{100 * settings.max_fraction:g}%: lower the rank or target fewer modules"
        )


def _peft_model(model: Any, settings: AdapterSettings) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.lora_alpha,
        target_modules=list(settings.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    _seed_a(peft_model, settings.a_seed)
    return peft_model


def _seed_a(peft_model: Any, seed: int) -> None:
    """Every lora_A drawn as peft draws it (kaiming-uniform, a = sqrt(5)), from a generator seeded by `seed` and
    the tensor's name: the same A on every site that shares `seed`, whatever else the process drew before."""
    import torch

    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_A." not in name:
                continue
            digest = hashlib.sha256(f"{seed}:{_stored_name(name)}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            bound = 1.0 / math.sqrt(p.shape[1])  # kaiming_uniform_(a=sqrt(5)) on [rank, in]
            p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)


def _stored_name(param_name: str) -> str:
    """peft's parameter name without the adapter name: the key saved in adapter_model.safetensors."""
    return param_name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def _lora_params(peft_model: Any) -> dict[str, torch.nn.Parameter]:
    return {
        _stored_name(n): p for n, p in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n
    }


def set_weights(peft_model: Any, weights: Mapping[str, np.ndarray]) -> None:
    """Load named arrays (`read_weights`' names) into a peft model's LoRA factors; names and shapes must match."""
    import torch

    params = _lora_params(peft_model)
    check_names(weights, {n: tuple(p.shape) for n, p in params.items()})
    with torch.no_grad():
        for name, array in weights.items():
            params[name].copy_(torch.as_tensor(np.asarray(array, dtype=np.float32)))


def get_weights(peft_model: Any) -> dict[str, np.ndarray]:
    """A peft model's LoRA factors as named float32 arrays, sorted by name."""
    params = _lora_params(peft_model)
    return {n: params[n].detach().cpu().numpy().astype(np.float32) for n in sorted(params)}


# --------------------------------------------------------------------------------------------- training


def _mean_loss(model: Any, data: torch.Tensor, batch_size: int) -> Perplexity:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x = data[i : i + batch_size]
            logits = model(input_ids=x).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += x[:, 1:].numel()
    return Perplexity(total / count, count)


class _Threads:
    """torch's intra-op threads for the duration of a call (the machine's other users keep their cores)."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.before = 0

    def __enter__(self) -> None:
        import torch

        self.before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.before)


def train_adapter(
    base_model_dir: Path,
    data_path: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    steps: int = 100,
    seed: int = 0,
    alpha: int | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    learning_rate: float = 3e-3,
    batch_size: int = 8,
    seq_len: int = 128,
    a_seed: int = 0,
    freeze_a: bool = False,
    init: Mapping[str, np.ndarray] | None = None,
    max_fraction: float = MAX_FRACTION,
    threads: int | None = None,
) -> AdapterResult:
    """Train a LoRA adapter for the causal LM in `base_model_dir` on the JSON Lines text in `data_path`, and write
    it to `out_dir` (peft's layout). `init`: named arrays to start from (a round's global adapter), else A from
    `a_seed` and B zero. `freeze_a`: FFA-LoRA (only B trained). Refused before training if the adapter would be
    over `max_fraction` of the base's weight bytes."""
    import torch

    settings = AdapterSettings(
        rank=rank,
        alpha=alpha,
        targets=tuple(targets),
        steps=steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
        a_seed=a_seed,
        freeze_a=freeze_a,
        max_fraction=max_fraction,
        threads=threads,
    )
    base_bytes = base_weight_bytes(base_model_dir)
    tok = tokenizer(base_model_dir)
    stream = token_stream(tok, load_documents(data_path, chat_renderer(tok)))
    data = torch.as_tensor(windows(stream, seq_len))
    with _Threads(threads):
        torch.manual_seed(seed)
        model = _load_base(base_model_dir)
        for p in model.parameters():
            p.requires_grad_(False)
        _check_budget(planned_bytes(model, settings), base_bytes, settings)
        peft_model = _peft_model(model, settings)
        if init is not None:
            set_weights(peft_model, init)
        trained = [
            p
            for n, p in peft_model.named_parameters()
            if ".lora_B." in n or (".lora_A." in n and not freeze_a)
        ]
        for p in peft_model.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        probe = data[: max(1, min(len(data), 4 * batch_size))]
        before = _mean_loss(peft_model, probe, batch_size)
        optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        peft_model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(data), (min(batch_size, len(data)),), generator=gen)
            x = data[idx]
            loss = peft_model(input_ids=x, labels=x).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = _mean_loss(peft_model, probe, batch_size)
        weights = get_weights(peft_model)
        for name, t in weights.items():
            if not np.isfinite(t).all():
                raise LearningError(f"training diverged: {name} holds NaN or infinite values; lower the rate")
        out_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    weights_file = out_dir / ADAPTER_WEIGHTS
    adapter_bytes = weights_file.stat().st_size
    _check_budget(adapter_bytes, base_bytes, settings)
    return AdapterResult(
        adapter_dir=out_dir,
        adapter_bytes=adapter_bytes,
        base_bytes=base_bytes,
        sha256=sha256_file(weights_file),
        tokens=len(stream),
        windows=len(data),
        steps=steps,
        loss_before=before.nll,
        loss_after=after.nll,
        names=tuple(weights),
        settings={
            "rank": rank,
            "alpha": settings.lora_alpha,
            "targets": list(settings.targets),
            "freezeA": freeze_a,
            "aSeed": a_seed,
        },
    )


def initial_adapter(
    base_model_dir: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: int | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    a_seed: int = 0,
    max_fraction: float = MAX_FRACTION,
) -> dict[str, np.ndarray]:
    """The untrained adapter a federation starts from (A drawn from `a_seed`, B zero: the base's own output),
    written to `out_dir` and returned as named arrays; what a ServerApp hands out as round 1's parameters."""
    import torch

    settings = AdapterSettings(
        rank=rank, alpha=alpha, targets=tuple(targets), a_seed=a_seed, max_fraction=max_fraction
    )
    base_bytes = base_weight_bytes(base_model_dir)
    model = _load_base(base_model_dir)
    _check_budget(planned_bytes(model, settings), base_bytes, settings)
    with torch.no_grad():
        peft_model = _peft_model(model, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return get_weights(peft_model)


def perplexity(
    base_model_dir: Path,
    data_path: Path,
    adapter_dir: Path | None = None,
    *,
    seq_len: int = 128,
    batch_size: int = 8,
    threads: int | None = None,
) -> Perplexity:
    """Held-out perplexity of the text in `data_path` under the base model, or the base with `adapter_dir`."""
    import torch

    tok = tokenizer(base_model_dir)
    data = torch.as_tensor(windows(token_stream(tok, load_documents(data_path, chat_renderer(tok))), seq_len))
    with _Threads(threads):
        model = _load_base(base_model_dir)
        if adapter_dir is not None:
            from peft import PeftModel

            read_config(adapter_dir)
            try:
                model = PeftModel.from_pretrained(model, str(adapter_dir))
            except Exception as e:
                raise LearningError(f"{adapter_dir}: does not fit {base_model_dir}: {e}") from None
        return _mean_loss(model, data, batch_size)
